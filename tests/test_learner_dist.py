"""Learner ranks as real processes (gloo on CPU): 2 ranks == 1 rank, ZeRO-3 bucket gathering, export, checkpoint.

The same 5-sample batch is trained by 1 rank (all samples) and by 2 ranks (4 + 1 samples, so rank 1 runs a
zero-weight filler micro-batch). Gradient tolerance: everything is fp32; the two runs differ only in how
sums are associated (micro-batch padding shapes, the order of the cross-rank reduction), which moves a
gradient by ~1e-6 of its scale (measured: 1.6e-6 between 1-rank ZeRO-3 and plain PyTorch). We allow
1e-4 of each tensor's max |grad|: a lost sample, a filler with weight, or a wrong world-size scale shows
up as O(1) relative errors.
"""
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from test_learner import _free_port, hf_logprobs, learner_config, make_samples

from trajectory import LearnerBatch

pytestmark = pytest.mark.slow
N_SAMPLES = 5
BUCKET_BYTES = 50_000


def _shard(samples, rank, world_size):
    return samples if world_size == 1 else (samples[:4] if rank == 0 else samples[4:])


def _rank_main(rank, world_size, port, policy_dir, out_dir):
    torch.set_num_threads(1)
    import deepspeed.runtime.zero
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_grad

    import learner.learner as ll

    samples = make_samples(N_SAMPLES, seed=11)
    shard = _shard(samples, rank, world_size)
    num_tokens, num_seqs = LearnerBatch(samples).totals()
    result = {}

    # ---- ZeRO-3: gradients of one GRPO step, captured just before the optimizer consumes them.
    # Logprobs in chunks of 8 tokens: the partitioned LM head is gathered once per chunk, and again
    # per chunk as backward recomputes it; the plain-PyTorch comparison uses the whole logits.
    zero3 = ll.Learner(learner_config(3, logprob_chunk_tokens=8), policy_dir, rank, world_size, master_port=port)
    grads = {}
    real_step = zero3.engine.step

    def step_with_capture(*args, **kwargs):
        for name, p in zero3.model.named_parameters():  # collective under ZeRO-3: same order on all ranks
            grads[name] = safe_get_full_grad(p).clone()
        return real_step(*args, **kwargs)

    zero3.engine.step = step_with_capture
    result["metrics3"] = zero3.train_step(LearnerBatch(shard, num_tokens, num_seqs))
    zero3.engine.step = real_step
    result["grads"] = grads

    # ---- ZeRO-3 weight buckets: count the bytes gathered at once while they are produced.
    def gathered_bytes():
        return sum(p.ds_numel * p.element_size() for p in zero3.model.parameters()
                   if p.ds_status == ZeroParamStatus.AVAILABLE)

    peaks = []
    real_gather = deepspeed.runtime.zero.GatheredParameters

    class RecordingGather:
        def __init__(self, params, **kwargs):
            self.inner = real_gather(params, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            peaks.append(gathered_bytes())

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    deepspeed.runtime.zero.GatheredParameters = RecordingGather  # what weight_sync.sender gathers with
    before = gathered_bytes()
    buckets = list(zero3.weight_buckets(BUCKET_BYTES, trainable_only=False))
    deepspeed.runtime.zero.GatheredParameters = real_gather
    result.update(gathered_before=before, gathered_after=gathered_bytes(), gathered_peaks=peaks,
                  bucket_sizes=[len(b) for b in buckets],
                  model_bytes=sum(p.ds_numel * p.element_size() for p in zero3.model.parameters()),
                  largest_param=max(p.ds_numel * p.element_size() for p in zero3.model.parameters()))
    if rank == 0:
        result["weights"] = {k: v for b in buckets for k, v in b}
    result["metadata"] = zero3.weight_plan(BUCKET_BYTES, trainable_only=False)

    # ---- ZeRO-3 export and checkpoint round trip (both collective).
    zero3.export_hf(os.path.join(out_dir, f"hf{world_size}"))
    result["logprobs"] = zero3.logprobs(shard, sampled=False)
    ckpt = os.path.join(out_dir, f"ckpt{world_size}")
    zero3.save_checkpoint(ckpt, {"rank_seen": rank})
    zero3.train_step(LearnerBatch(shard))
    result["client_state"] = zero3.load_checkpoint(ckpt)
    result["reloaded_logprobs"] = zero3.logprobs(shard, sampled=False)
    zero3 = None  # freed before the ZeRO-2 engine starts

    # ---- ZeRO-2 on the same ranks: whole-batch metrics must not depend on the split either.
    learner2 = ll.Learner(learner_config(2, logprob_chunk_tokens=8), policy_dir, rank, world_size, master_port=port)
    result["metrics2"] = learner2.train_step(LearnerBatch(shard, num_tokens, num_seqs))
    del learner2
    torch.save(result, os.path.join(out_dir, f"world{world_size}_rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from policy.tiny import build_tiny_policy

    policy_dir = str(build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", layers=3))
    out = tmp_path_factory.mktemp("runs")
    two_ranks = mp.start_processes(_rank_main, args=(2, _free_port(), policy_dir, str(out)), nprocs=2,
                                   join=False, start_method="spawn")
    # The 1-rank reference runs here meanwhile (spares a process start and its imports), on one
    # thread like each of the two ranks, so the three processes do not oversubscribe the cores.
    threads = torch.get_num_threads()
    try:
        _rank_main(0, 1, _free_port(), policy_dir, str(out))
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 600  # a hung rank fails the test instead of hanging the suite (~90 s)
    while not two_ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in two_ranks.processes:
                process.kill()
            raise TimeoutError("the two learner ranks did not finish within 600 s")
    load = lambda name: torch.load(out / name, weights_only=False)  # noqa: E731
    return policy_dir, out, load("world1_rank0.pt"), load("world2_rank0.pt"), load("world2_rank1.pt")


def test_two_ranks_zero3_give_the_gradient_of_one_rank(runs):
    _, _, one, two, two_b = runs
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 0
    for name, g1 in one["grads"].items():
        scale = g1.abs().max().item()
        assert scale > 0, name
        assert (two["grads"][name] - g1).abs().max().item() <= 1e-4 * scale, name
        assert torch.equal(two["grads"][name], two_b["grads"][name])  # both ranks assembled the same
    for key in ("metrics3", "metrics2"):
        for metric in ("loss", "pg_loss", "grad_norm", "entropy", "tokens", "seqs", "logprob_drift"):
            assert two[key][metric] == pytest.approx(one[key][metric], rel=1e-5), (key, metric)
        assert two[key] == two_b[key]  # every rank reports the same whole-batch metrics


def test_one_rank_zero3_gradient_equals_plain_pytorch(runs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from learner.batch import MODEL_KEYS, collate
    from learner.grpo import policy_loss
    from learner.logprobs import token_logprobs
    from policy.sampling import SamplingRule

    policy_dir, _, one, _, _ = runs
    model = AutoModelForImageTextToText.from_pretrained(policy_dir)
    processor = AutoProcessor.from_pretrained(policy_dir)
    samples = make_samples(N_SAMPLES, seed=11)
    batch = collate(processor, samples, processor.tokenizer.pad_token_id)
    # Plain transformers: every row's own image as pixel values through the model's own vision path.
    assert batch["image_index"] == list(range(len(samples)))  # the samples' images are all distinct
    logits = model(**{k: batch[k] for k in MODEL_KEYS}, pixel_values=batch["pixel_values"]).logits
    # the distribution the learner trains: the sampled one (policy/sampling.py), here at T = 1
    rule = SamplingRule.of(processor.tokenizer, policy_dir, temperature=1.0, min_new_tokens=0)
    logp, _ = token_logprobs(logits, batch["response_ids"], rule)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([s.advantage for s in samples]),
                          batch["response_mask"], ref_logp=logp.detach(), kl_coef=0.05)
    loss.backward()
    assert loss.item() == pytest.approx(one["metrics3"]["loss"], rel=1e-5)
    names = {n for n, _ in model.named_parameters()}
    assert names == one["grads"].keys()
    for name, p in model.named_parameters():
        assert (one["grads"][name] - p.grad).abs().max().item() <= 1e-4 * p.grad.abs().max().item(), name


def test_zero3_weight_buckets_gather_one_bucket_at_a_time(runs):
    policy_dir, _, one, two, two_b = runs
    from safetensors import safe_open

    for r in (one, two, two_b):
        assert r["gathered_before"] == 0 and r["gathered_after"] == 0  # everything partitioned again
        bound = max(BUCKET_BYTES, r["largest_param"])
        assert len(r["gathered_peaks"]) == len(r["bucket_sizes"]) > 3
        assert 0 < max(r["gathered_peaks"]) <= bound < r["model_bytes"] / 4
    assert all(n == 0 for n in two_b["bucket_sizes"])  # rank 1 iterates in step but receives nothing
    assert two["bucket_sizes"] == one["bucket_sizes"]
    # Rank 0 of both runs received every weight, named as in the checkpoint, equal across runs.
    with safe_open(policy_dir + "/model.safetensors", "pt") as f:
        assert set(two["weights"]) == set(f.keys())
    for k, v in one["weights"].items():
        assert torch.allclose(two["weights"][k], v, atol=1e-5), k
    # The plan a broadcast receiver needs (buckets of full shapes), known on every rank without gathering.
    want = [(k, str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in two["weights"].items()]
    assert two["metadata"] == two_b["metadata"]
    assert [entry for bucket in two["metadata"] for entry in bucket] == want
    assert [len(bucket) for bucket in two["metadata"]] == two["bucket_sizes"]


def test_zero3_export_and_checkpoint(runs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, out, _, two, two_b = runs
    samples = make_samples(N_SAMPLES, seed=11)
    model = AutoModelForImageTextToText.from_pretrained(str(out / "hf2")).eval()
    processor = AutoProcessor.from_pretrained(str(out / "hf2"))
    learner_logprobs = two["logprobs"] + two_b["logprobs"]  # rank 0 held samples[:4], rank 1 the last
    for s, got in zip(samples, learner_logprobs):
        if s.response_ids:
            assert torch.allclose(hf_logprobs(model, processor, s), torch.tensor(got), atol=1e-5)
    for r, rank in ((two, 0), (two_b, 1)):
        assert r["client_state"]["rank_seen"] == rank  # each rank gets back the client state it saved
        assert r["reloaded_logprobs"] == r["logprobs"]  # a step after saving, then load: back exactly
