"""The one typed config of the trainer.

Loaded from YAML (``configs/default.yaml`` unless ``--config`` names another file), then dotted
command-line overrides are applied (``rollout.group_size=4 cluster.reward_workers=2``), then the whole
tree is validated by pydantic. A bad value fails at start with one message naming the field, e.g.
``config error: rollout.group_size: Input should be greater than or equal to 2 (got 1)``.

Every field carries its meaning in ``description``; ``python config.py`` prints them all as the table
that README.md shows.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal, Optional, Union

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


class Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML or an override must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    policy_path: Optional[str] = Field(
        None, description="Local HF directory of a Qwen2.5-VL or Qwen3-VL policy (e.g. Qwen3-VL-8B-Instruct; "
        "`python -m policy.build` writes random-weight ones). "
        "Empty: build the tiny embedded policy below into `train.output_dir/tiny_policy`.")
    image_size: int = Field(
        112, ge=28, description="Images are resized to image_size x image_size before the policy sees "
        "them; answer coordinates live in that space (Seg-Zero: 840). A multiple of the family's patch x merge: "
        "28 for Qwen2.5-VL, 32 for Qwen3-VL.")
    tiny_hidden_size: int = Field(128, ge=64, description="Tiny policy: hidden size of the language model.")
    tiny_layers: int = Field(2, ge=1, description="Tiny policy: number of decoder layers.")
    tiny_heads: int = Field(
        2, ge=1, description="Tiny policy: attention heads (head_dim = hidden/heads must be 64 "
        "or more for vLLM CPU).")
    tiny_vision_hidden_size: int = Field(
        128, ge=16, description="Tiny policy: hidden size of the vision tower (>= 80 with tiny_position_reader).")
    tiny_vision_layers: int = Field(1, ge=1, description="Tiny policy: depth of the vision tower.")
    tiny_number_code: bool = Field(
        True, description="Tiny policy: start the number tokens' embeddings from a Fourier code of their value "
        "(nearby numbers similar), instead of noise.")
    tiny_position_reader: bool = Field(
        True, description="Tiny policy: start the vision tower as a reader of the synthetic images' position "
        "barcodes (data.synthetic_barcodes) and of each cell's colour, and two attention heads as a grounding "
        "circuit (the query's colour word selects the image token to copy the position from); needs tiny_layers "
        ">= 2; see docs/learnability.md.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights dtype on learner and rollout: auto = bfloat16 on GPU, float32 on CPU.")

    @model_validator(mode="after")
    def _check(self):
        if self.policy_path is None and self.image_size % 28:  # the tiny Qwen2.5-VL; a checkpoint's family
            # is checked against image_size at start (policy/family.py: 28 for Qwen2.5-VL, 32 for Qwen3-VL)
            raise ValueError(f"image_size must be a multiple of 28 (patch 14 x merge 2), got {self.image_size}")
        if self.tiny_hidden_size % self.tiny_heads or self.tiny_hidden_size // self.tiny_heads < 64:
            raise ValueError("tiny_hidden_size / tiny_heads must be an integer >= 64 (vLLM CPU attention)")
        if self.tiny_position_reader and self.tiny_vision_hidden_size < 80:
            raise ValueError("tiny_vision_hidden_size must be >= 80 with tiny_position_reader "
                             "(64 dims carry the position)")
        if self.tiny_position_reader and self.tiny_layers < 2:
            raise ValueError("tiny_layers must be >= 2 with tiny_position_reader "
                             "(its grounding circuit spans two layers)")
        return self


class DataConfig(Section):
    train_path: Optional[str] = Field(
        None, description="Parquet file or directory of training rows (schema in README). Empty: "
        "generate the synthetic shapes dataset into `train.output_dir/data`.")
    val_path: Optional[str] = Field(
        None, description="Parquet of the validation split: everything that selects (eval.keep_best's best policy) "
        "reads it and nothing reports it (val/* metrics). Empty: synthetic when the training rows are.")
    eval_path: Optional[str] = Field(
        None, description="Parquet of the test split: reported (eval/* metrics), never used to select. Empty: "
        "synthetic when the training rows are.")
    ood_path: Optional[str] = Field(
        None, description="Parquet of an out-of-distribution split, reported (ood/* metrics). Empty: synthetic when "
        "the training rows are: one or two shapes more per image than synthetic_shapes' max (as the grid allows), "
        "and the query kind 'shape' ('the triangle') beside synthetic_kinds.")
    synthetic_train_size: int = Field(512, ge=1, description="Synthetic dataset: number of training rows.")
    synthetic_eval_size: int = Field(
        64, ge=1, description="Synthetic dataset: rows of each held-out split (val, test, OOD). The three never ask "
        "a training row's query about its target mask (data/splits.py).")
    synthetic_seed: int = Field(0, description="Synthetic dataset: generator seed (same seed, same bytes).")
    synthetic_barcodes: Literal["off", "objects", "all"] = Field(
        "objects", description="Synthetic dataset: write a 14-px patch's position into its top two pixel rows "
        "(data/position_code.py), what model.tiny_position_reader reads: in the patches shapes touch, in all, or off.")
    synthetic_kinds: Union[list[Literal["colour_shape", "colour", "shape", "relation", "extreme", "size",
                                        "all_colour", "all_shape"]], Literal["auto"]] = Field(
        "auto", description="Synthetic dataset: query kinds drawn from (data/synthetic.py), e.g. 'the red circle', "
        "'the blue shape', 'the triangle', 'the shape left of the green square', 'the topmost shape', 'the largest "
        "shape'; multi-object (reward.rules=multi_object only): 'all the red shapes', 'all the circles'. auto: "
        "[colour_shape, colour], plus all_colour under multi_object.")
    synthetic_shapes: Union[tuple[int, int], Literal["auto"]] = Field(
        "auto", description="Synthetic dataset: min and max number of shapes per image. auto: [1, 2], [1, 3] under "
        "multi_object (so 'all the red shapes' has 1-3 targets).")
    shuffle: bool = Field(True, description="Shuffle rows each epoch (seeded by train.seed).")

    @field_validator("synthetic_barcodes", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML 1.1 (OmegaConf) reads a bare `off` as false

    @model_validator(mode="after")
    def _check(self):
        if self.synthetic_shapes != "auto":
            low, high = self.synthetic_shapes
            if not 1 <= low <= high:
                raise ValueError("synthetic_shapes: must be [min, max] with 1 <= min <= max, "
                                 f"got {list(self.synthetic_shapes)}")
        if not self.synthetic_kinds:
            raise ValueError("synthetic_kinds: must name at least one query kind")
        return self

    def resolve_synthetic(self, rules: str) -> None:
        """Turns the ``auto`` settings into the rule set's defaults; refuses multi-object kinds under
        single-object rules."""
        multi = rules == "multi_object"
        if self.synthetic_kinds == "auto":
            self.synthetic_kinds = ["colour_shape", "colour"] + (["all_colour"] if multi else [])
        if self.synthetic_shapes == "auto":
            self.synthetic_shapes = (1, 3) if multi else (1, 2)
        several = sorted({"all_colour", "all_shape"} & set(self.synthetic_kinds))
        if several and not multi:
            raise ValueError(f"synthetic_kinds: {several} name several shapes: they need reward.rules=multi_object")


class RolloutConfig(Section):
    @model_validator(mode="before")
    @classmethod
    def _no_truncation(cls, data):
        for name in ("top_p", "top_k", "min_p"):
            if isinstance(data, dict) and name in data:
                raise ValueError(f"{name}: truncated sampling is not supported: the learner scores every token under "
                                 "the full distribution at rollout.temperature (policy/sampling.py), and a truncated "
                                 "one would bias the PPO ratio and the KL; remove the setting")
        return data

    prompts_per_step: int = Field(4, ge=1, description="Prompts sampled per training step (Seg-Zero: 16).")
    group_size: int = Field(4, ge=2, description="Answers sampled per prompt, G (Seg-Zero: 8).")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature. GRPO's learner scores tokens with logits / T (ratio, KL), "
        "so what is trained is the distribution vLLM samples from; the warm start fits the logits at T = 1.")
    max_new_tokens: int = Field(96, ge=1, description="Maximum response length in tokens (Seg-Zero: 1300).")
    min_new_tokens: int = Field(
        0, ge=0, description="Minimum response length: end-of-answer tokens are suppressed until this many "
        "tokens (benchmarks set it to max_new_tokens for a fixed length; 0: off).")
    max_model_len: int = Field(1024, ge=64, description="vLLM context length (prompt + image tokens + response).")
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallel size TP per rollout worker. On GPUs (cluster.rollout.num_gpus=1) "
        "with TP > 1 each worker gets its own Ray placement group of TP bundles {GPU: 1, CPU: "
        "cluster.rollout.num_cpus} on one node (STRICT_PACK); vLLM runs its TP workers there as Ray actors.")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="vLLM memory fraction on GPU. On CPU the KV cache size is kv_cache_gib instead.")
    kv_cache_gib: float = Field(
        1.0, gt=0, description="CPU only: GiB of RAM for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE).")
    enforce_eager: bool = Field(True, description="Run vLLM eagerly: no torch.compile or CUDA graphs. On CPU the "
                                "compiled path decodes faster but starts ~17-25 s later; the default run took 1.24x "
                                "as long compiled (docs/benchmarks.md). The GPU recipes set false.")
    engine_in_process: bool = Field(
        True, description="Run vLLM's engine and (with tensor_parallel_size 1) its worker inside the rollout "
        "process (VLLM_ENABLE_V1_MULTIPROCESSING=0): faster start, no extra processes, weights passed by "
        "reference. False: vLLM's own processes; weights then travel as safetensors bytes.")
    weight_sync: Literal["rpc", "collective"] = Field(
        "rpc", description="How learner weights reach vLLM after each step: rpc = learner rank 0 puts each bucket "
        "in Ray's object store once and every rollout worker fetches and loads it; collective = learner rank 0 "
        "broadcasts each bucket to every vLLM worker process (tensor-parallel ranks included) in one process "
        "group, gloo on CPU and NCCL on GPU, with a checksum per bucket (weight_sync/). Learner and "
        "rollout workers must then be both on GPUs or both on CPUs.")
    dynamic_sampling: bool = Field(
        False, description="DAPO dynamic sampling: drop groups whose G rewards are all equal (no signal) and "
        "refill the batch with new prompts (metrics batch/dropped_groups, batch/refills).")
    max_refills: int = Field(3, ge=0, description="Dynamic sampling: at most this many refill rounds per step.")
    stream_rewards: bool = Field(
        True, description="Score each group in the reward pool as soon as it is generated (overlaps "
        "generation). False: the plain synchronous loop, scoring starts after all generation (a baseline "
        "for benchmarks/pipelining.py).")
    off_policy: bool = Field(
        False, description="One-step off-policy: rollouts for step t+1 run while the learner trains step t "
        "(staleness bounded to one weight version; the PPO ratio uses the sampling logprobs).")


class RewardConfig(Section):
    rules: Literal["segzero", "segzero_soft", "multi_object"] = Field(
        "segzero", description="Rule set: Seg-Zero strict answer format, soft format, or VisionReasoner multi-object.")
    coordinates: Literal["auto", "pixels", "relative_1000"] = Field(
        "auto", description="How the policy writes boxes and points: absolute pixels of the resized image "
        "(Qwen2.5-VL) or relative 0..1000 across its width and height (Qwen3-VL); auto: the policy family's "
        "(config.json model_type). The prompt, the warm start's reference answers and the conversion to "
        "pixels before the rules and the segmenter follow it (policy/family.py).")
    weights: dict[str, float] = Field(
        default_factory=dict, description="Per-term weights, e.g. {bbox_iou: 1.0, mask_iou: 2.0}; "
        "unnamed terms weigh 1.")
    mask_iou: Literal["off", "continuous", "threshold", "tiered"] = Field(
        "continuous", description="Mask-IoU term from the segmenter's mask: IoU itself, 1 if IoU > mask_threshold, "
        "or tiers (see README).")
    mask_threshold: float = Field(0.5, ge=0, le=1, description="IoU threshold for mask_iou=threshold.")
    segmenter: Literal["grabcut", "sam2"] = Field(
        "grabcut", description="Mask source: SAM2 (production) or OpenCV GrabCut (weight-free, embedded default).")
    sam2_config: str = Field("configs/sam2.1/sam2.1_hiera_t.yaml", description="SAM2 Hydra config name (t/s/b+/l).")
    sam2_checkpoint: Optional[str] = Field(
        None, description="Local SAM2 checkpoint (.pt). Required for segmenter=sam2 unless sam2_allow_random_weights.")
    sam2_allow_random_weights: bool = Field(
        False, description="Tests only: build SAM2 with random weights when no checkpoint is given.")
    embedding_cache_size: int = Field(
        64, ge=0, description="LRU cache of image embeddings per reward worker (entries).")

    @field_validator("mask_iou", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML 1.1 (OmegaConf) reads a bare `off` as false

    @model_validator(mode="after")
    def _check(self):
        if self.segmenter == "sam2" and not self.sam2_checkpoint and not self.sam2_allow_random_weights:
            raise ValueError("segmenter=sam2 needs sam2_checkpoint=PATH (or sam2_allow_random_weights=true for tests)")
        return self


class LearnerConfig(Section):
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (Seg-Zero: 1e-6).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="GRPO learning rate over train.steps: constant, or a cosine decay to "
        "learner.min_lr_ratio x learner.lr after the last step (the warm start keeps train.sft_lr).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="learner.lr_schedule=cosine: the last GRPO step's "
                                "learning rate as a fraction of learner.lr.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    clip_low: float = Field(0.2, ge=0, description="PPO ratio clip below: ratio >= 1 - clip_low.")
    clip_high: float = Field(
        0.2, ge=0, description="PPO ratio clip above: ratio <= 1 + clip_high (clip-higher when > clip_low).")
    kl_coef: float = Field(
        5e-3, ge=0, description="KL-to-reference coefficient (0 skips the reference model). The reference is the "
        "policy GRPO starts from: the warm-started one when train.sft_steps > 0.")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (Seg-Zero: 1e-3).")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="Loss aggregation (see learner/grpo.py).")
    adv_scale: Literal["std", "none"] = Field(
        "std", description="Group advantage scaling: std (GRPO) or none (Dr. GRPO).")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward micro-batch.")
    shared_prompt: bool = Field(
        True, description="Run each distinct prompt (and its image) of a micro-batch once and its G answers on top "
        "of its cached keys/values, instead of every row's whole prompt + answer: same logprobs and gradients, "
        "several times fewer tokens when prompts are long and answers short. With gradient_checkpointing the "
        "policy's training forward runs whole rows (transformers' checkpointed layers drop the cache); the "
        "reference and logprob forwards still share.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    logprob_chunk_tokens: int = Field(
        1024, ge=0, description="Token logprobs, entropy and KL from the final hidden states in chunks of about this "
        "many tokens: the LM head, log-softmax and gather run per chunk and are recomputed in backward, so at most "
        "one chunk's [tokens, vocabulary] logits exist at a time (with a 151,936-token vocabulary the whole "
        "micro-batch's fp32 logits are gigabytes). 0: the whole micro-batch's logits at once, kept for backward.")
    freeze_vision: bool = Field(False, description="Train (and sync) only the language model.")
    clip_ratio_c: Optional[float] = Field(
        None, gt=1, description="Dual-clip bound c (> 1): for negative advantages the token loss is capped at -A*c. "
        "Empty: off.")
    zero3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3: parameters with fewer elements stay whole on every rank instead of "
        "being partitioned (DeepSpeed stage3_param_persistence_threshold); 0 partitions all.")


class TrainConfig(Section):
    steps: int = Field(20, ge=1, description="GRPO steps.")
    sft_steps: int = Field(
        0, ge=0, description="Supervised warm-start steps on the dataset's reference answers before GRPO "
        "(0: none). The warm-started policy is written to train.output_dir/warm_start_policy: Seg-Zero's SFT "
        "baseline (evaluate.py --checkpoint) and GRPO's KL reference.")
    sft_batch_size: int = Field(16, ge=1, description="Sequences per warm-start step.")
    sft_lr: float = Field(1e-3, gt=0, description="Learning rate of the warm start (GRPO uses learner.lr).")
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    output_dir: str = Field("runs/default", description="Where the tiny policy, data, checkpoints and plots go.")
    checkpoint_every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest deleted first).")


class EvalConfig(Section):
    every_n_steps: int = Field(
        0, ge=0, description="Evaluate on the held-out splits (val, test, OOD) every N GRPO steps (0: only before "
        "GRPO and at the end).")
    num_samples: int = Field(32, ge=1, description="Rows of each held-out split per evaluation (its first N).")
    overlays: int = Field(4, ge=0, description="Overlay pictures logged to MLflow per evaluation.")
    enabled: bool = Field(True, description="Run evaluations during training at all.")
    keep_best: bool = Field(
        True, description="Export the policy of the evaluation with the highest validation gIoU (data.val_path; "
        "segzero convention; the warm start's included) to train.output_dir/best_policy, with its step, its val "
        "score and its test and OOD scores in best.json.")


class ResourcesConfig(Section):
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs per actor.")
    num_gpus: float = Field(
        0.0, ge=0, description="Ray GPUs per actor: fractions below 1 share a GPU (0.25: four reward workers "
        "per GPU), above 1 whole numbers only.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads inside the actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor (learner: per rank's bundle), e.g. "
        "{rollout_node: 1}: the actors go only to nodes started with that resource (`ray start --resources`).")

    @model_validator(mode="after")
    def _check(self):
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError(f"num_gpus above 1 must be a whole number (Ray), got {self.num_gpus}")
        return self


class RewardAutoscaleConfig(Section):
    enabled: bool = Field(
        False, description="Between steps, add a reward worker when the reward tail (last group generated -> its "
        "reward) exceeds up_tail_fraction of the step while groups queued behind each other; remove one when the "
        "tail stays below down_tail_fraction, or a worker scored nothing, for cooldown_steps steps. Overrides "
        "cluster.reward_workers' size afterwards; requests go to Ray (its autoscaler adds nodes when configured).")
    min_workers: int = Field(1, ge=1, description="Fewest reward workers the autoscaler keeps.")
    max_workers: int = Field(4, ge=1, description="Most reward workers the autoscaler starts.")
    up_tail_fraction: float = Field(
        0.25, gt=0, lt=1, description="Add a worker when the reward tail exceeds this fraction of the step.")
    down_tail_fraction: float = Field(
        0.05, ge=0, lt=1, description="Remove a worker when the tail stays below this fraction of the step.")
    cooldown_steps: int = Field(3, ge=1, description="Steps after a decision before the next one, and the window a "
                                "scale-down looks back over.")

    @model_validator(mode="after")
    def _check(self):
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers: must be >= min_workers ({self.min_workers}), got {self.max_workers}")
        if self.down_tail_fraction >= self.up_tail_fraction:
            raise ValueError(f"down_tail_fraction: must be below up_tail_fraction ({self.up_tail_fraction}), "
                             f"got {self.down_tail_fraction}")
        return self


class ClusterConfig(Section):
    address: Optional[str] = Field(
        None, description="Ray address. Empty: join the cluster the job was submitted to, else start a local one.")
    job_name: str = Field(
        "seg-grpo", description="Name of the job's controller actor (cluster.scale / cluster.status --job).")
    rollout_workers: int = Field(1, ge=1, description="Number of vLLM rollout actors.")
    reward_workers: int = Field(1, ge=1, description="Number of reward (segmenter) actors.")
    learner_ranks: int = Field(1, ge=1, description="Number of DeepSpeed learner ranks (one actor each).")
    rollout: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Resources per rollout actor (one vLLM engine); with "
        "rollout.tensor_parallel_size > 1 on GPUs, per bundle of the engine's placement group (num_gpus 1).")
    reward: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Resources per reward actor.")
    learner: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Resources per learner rank.")
    learner_update_threads: int = Field(
        0, ge=0, description="CPU only: torch threads of each learner rank during an update that nothing else "
        "computes beside (an on-policy GRPO step or a warm-start step: the rollout workers wait for it), e.g. the "
        "cores the rollout actors use while generating. 0: cluster.learner.torch_threads. Off-policy GRPO steps "
        "keep torch_threads (the next round generates meanwhile).")
    max_learner_restarts: int = Field(
        2, ge=0, description="When a learner rank dies, the learner group restarts in the same job from the latest "
        "checkpoint (at most train.checkpoint_every steps redone), up to this many times; 0: the job stops.")
    reward_autoscale: RewardAutoscaleConfig = Field(
        default_factory=RewardAutoscaleConfig, description="The reward pool sizing itself between steps.")
    call_timeout_s: float = Field(
        600.0, gt=0, description="Timeout of any remote call (generation, scoring, a learner step).")
    startup_timeout_s: float = Field(600.0, gt=0, description="Timeout for actors to start (vLLM engines, models).")
    sync_timeout_s: float = Field(
        300.0, gt=0, description="Timeout of one weight sync to all rollout workers (rollout.weight_sync=collective: "
        "each collective operation times out after half of it; a worker still silent at the end is restarted).")
    sync_parity_check: bool = Field(
        False, description="After every weight sync, compare learner and vLLM logprobs of a fixed probe "
        "(held-out prompt + its reference answer); fail the job when they differ by more than the tolerance.")
    sync_parity_tolerance: float = Field(
        1e-3, gt=0, description="Max |learner - vLLM| logprob on the probe (fp32 CPU measures ~2e-6; "
        "bf16 GPUs need ~0.1).")
    max_logprob_drift: Optional[float] = Field(
        None, gt=0, description="Stop the job when the learner's logprobs of the tokens sampled with its current "
        "weights differ from vLLM's sampling logprobs by more than this, per token on average (metric "
        "logprob_drift_current): the two sides score different distributions (a sampling setting, stale or "
        "misnamed weights). Empty: 1e-3 when the policy runs in float32 (CPU measures ~1e-5), 0.05 in bfloat16.")
    sync_bucket_mb: int = Field(64, ge=1, description="Weight sync bucket size in MiB (tensors sent per transfer).")
    gpu_memory_gb: float = Field(
        80.0, gt=0, description="Memory of one GPU in GB, for the start-up plan's checks (python -m cluster.plan): "
        "a learner rank or vLLM engine that cannot fit stops the job before any actor starts.")


class TrackingConfig(Section):
    mlflow_uri: Optional[str] = Field(
        None, description="MLflow tracking URI. Empty: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db.")
    experiment: str = Field("seg-grpo", description="MLflow experiment name.")
    run_name: Optional[str] = Field(
        None, description="MLflow run name. Empty: the config file's name and the seed, e.g. default-seed0.")
    log_model: bool = Field(True, description="Export the final policy to train.output_dir/final_policy (HF "
                            "directory) and log it, and best_policy, as MLflow artifacts.")
    system_metrics: bool = Field(True, description="Log MLflow system metrics (CPU, memory, GPU) of the driver's node.")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    _source: str = PrivateAttr("config")  # the YAML file's name without .yaml (load_config sets it)

    @property
    def run_name(self) -> str:
        """The MLflow run's name: tracking.run_name, else the config file's name and the seed."""
        return self.tracking.run_name or f"{self._source}-seed{self.train.seed}"

    @property
    def max_logprob_drift(self) -> float:
        """cluster.max_logprob_drift, or its default for the learner's dtype."""
        if self.cluster.max_logprob_drift is not None:
            return self.cluster.max_logprob_drift
        bf16 = self.model.dtype == "bfloat16" or (self.model.dtype == "auto" and self.cluster.learner.num_gpus > 0)
        return 0.05 if bf16 else 1e-3

    @model_validator(mode="after")
    def _across_sections(self):
        try:
            self.data.resolve_synthetic(self.reward.rules)
        except ValueError as exc:
            raise ValueError(f"data.{exc}") from None
        d = self.data
        if d.train_path and self.eval.enabled and not (d.val_path or d.eval_path or d.ood_path):
            raise ValueError("data.eval_path: evaluations need a held-out split besides a given data.train_path "
                             "(data.val_path, data.eval_path or data.ood_path), or eval.enabled=false")
        if d.train_path and self.eval.enabled and self.eval.keep_best and not d.val_path:
            raise ValueError("data.val_path: eval.keep_best selects the best policy on the validation split; set "
                             "data.val_path (never the test split) or eval.keep_best=false")
        if self.rollout.weight_sync == "collective" and \
                (self.cluster.learner.num_gpus > 0) != (self.cluster.rollout.num_gpus > 0):
            raise ValueError("rollout.weight_sync: collective needs the learner and the rollout workers on the same "
                             "kind of device (one NCCL or one gloo group), got cluster.learner.num_gpus="
                             f"{self.cluster.learner.num_gpus} and cluster.rollout.num_gpus="
                             f"{self.cluster.rollout.num_gpus}")
        if self.rollout.weight_sync == "collective" and self.cluster.learner.num_gpus > 0 and \
                min(self.cluster.learner.num_gpus, self.cluster.rollout.num_gpus) < 1:
            raise ValueError("rollout.weight_sync: collective on GPUs is one NCCL group, and NCCL puts no two ranks of "
                             "a group on one GPU: cluster.learner.num_gpus and cluster.rollout.num_gpus must be whole "
                             "GPUs (got fractions); use rpc to share GPUs")
        return self


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (default configs/default.yaml) + dotted overrides -> validated Config."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config error: --config: file not found: {path}")
    try:
        tree = OmegaConf.load(path)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"config error: override {bad[0]!r} must look like section.field=value")
        tree = OmegaConf.merge(tree, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(tree, resolve=True) or {}
    except ConfigError:
        raise
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"config error: {path}: {exc}") from exc
    try:
        cfg = Config.model_validate(data)
        cfg._source = path.stem
        return cfg
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across sections: its message starts with the field it names
            raise ConfigError(f"config error: {msg}") from None
        field = ".".join(str(p) for p in err["loc"])
        named = re.match(r"(\w+): (.*)", msg, re.DOTALL)  # a section's check naming one of its fields
        section = Config
        for part in err["loc"]:
            annotation = section.model_fields[part].annotation if part in section.model_fields else None
            section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if section is None:
                break
        given = err.get("input") if isinstance(err.get("input"), dict) else {}
        if named and section is not None and (named.group(1) in section.model_fields or named.group(1) in given):
            field, msg = f"{field}.{named.group(1)}", named.group(2)
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        raise ConfigError(f"config error: {field}: {msg}{got}") from None


def load_config_or_exit(path: str | Path | None, overrides) -> Config:
    """load_config for command-line entry points: a bad config prints its one-line message and exits 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def field_table(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every leaf field: the config reference (docs/config.md)."""
    rows = []
    for name, f in model.model_fields.items():
        sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
        if sub is not None:
            rows += field_table(sub, f"{prefix}{name}.")
        else:
            default = f.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", "" if default is None else repr(default), f.description or ""))
    return rows


def reference_page() -> str:
    """docs/config.md, generated from the fields' descriptions (``python config.py > docs/config.md``;
    tests/test_config.py checks the committed page is current)."""
    lines = ["# Config reference", "",
             "Generated by `python config.py > docs/config.md` from `config.py`; do not edit by hand.",
             "YAML (`--config`) plus dotted overrides on the command line (`python launch.py "
             "rollout.group_size=4`); unknown keys and bad values fail at start with one message naming "
             "the field.", "", "| field | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{default}` | {desc} |" for name, default, desc in field_table()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_page())
    sys.exit(0)
