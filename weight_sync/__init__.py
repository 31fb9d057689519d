"""Weight sync: how the learner's weights reach every vLLM engine after an update. The contract:

- **Name.** Every tensor travels under its Hugging Face checkpoint name, the name ``save_pretrained``
  writes (``buckets.checkpoint_names``: transformers 5 saves ``model.language_model.*`` as ``model.*``
  and ``model.visual.*`` as ``visual.*``); vLLM's ``load_weights`` and ``from_pretrained`` take these.
- **Bucket.** The synced parameters (the trainable ones; the vision tower is left out when frozen) in
  module order, cut into consecutive buckets of at most ``cluster.sync_bucket_mb`` (a larger
  parameter is a bucket alone; ``buckets.plan_buckets``). A bucket's plan is ``[(name, dtype name,
  full shape)]`` (``BucketPlan``), known to both sides before anything moves. Under ZeRO-3 the ranks
  gather one bucket at a time, so no rank holds more than one bucket of gathered weights.
- **Dtype.** The learner's parameter dtype (fp32 on CPU, bf16 on GPU); the engine loads as given.
- **Update session.** A receiver opens one vLLM layer-wise reload session per sync, loads the buckets
  in order and commits: every decoder layer gets all its tensors in the session or none (pushing whole
  sub-models is always safe). Commit drops the prefix (KV), encoder and multimodal caches.
- **Version.** The learner's weight version = optimizer steps so far (warm start and GRPO); 0 is the
  weights an engine starts from. A commit names its version; each engine reports it and stamps every
  answer it samples with it (``trajectory.Answer.weight_version``).
- **Checksum.** On the collective path each bucket travels as one flat, page-padded byte buffer
  (``buckets.layout``/``pack``/``unpack``) and its ``checksum`` is computed by the sender and by every
  receiving process; the driver compares them before the engine generates.

Two paths (``rollout.weight_sync``): ``rpc``, every bucket put once in Ray's object store and loaded
by each rollout worker; ``collective``, one broadcast group (gloo on CPU, NCCL on GPU) from learner
rank 0 into every vLLM worker process. Here, plain Python: the learner's side (``sender``, mixed into
``learner.Learner``), the engine's (``vllm_receiver``, mixed into vLLM's worker), what both share
(``buckets``, ``group``). The driver's side, which needs Ray, is cluster/weight_sync.py.
"""
