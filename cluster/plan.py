"""What a job will take, before anything starts: ``python -m cluster.plan --config CONFIG [overrides]``.

    python -m cluster.plan --config configs/segzero_7b.yaml --gpus-per-node 8 --nodes 1 [--json]
                           [--storage-gbps X | --measure-storage DIR] [overrides]

No GPU, no Ray, no weights: the policy's shape comes from its ``config.json`` (``model.policy_path``, or
``configs/models/<its directory name>/`` for the published Qwen2.5-VL and Qwen3-VL models), built on PyTorch's meta
device to count parameters exactly; its family (policy/family.py) checks the image size. Printed: every
actor with its GPUs and CPUs; the total against the
cluster given; per learner GPU the model states (DeepSpeed's own ZeRO-2/3 estimators), the reference
model, the logits of one micro-batch and the activations (with and without gradient checkpointing); per
vLLM GPU the weights and the KV cache of the configured batch; bytes per checkpoint and on disk; bytes
per weight sync. GPUs hold ``cluster.gpu_memory_gb`` each. Problems (a plan that cannot run: more GPUs
than the cluster has, memory over a GPU, no prompt fitting ``rollout.max_model_len``) make the exit code
1; warnings flag waste (GPUs reserved and unused) and cut answers. ``launch.py`` runs the same checks at
start (``check``) and stops with their message.

Formulas (bytes; P = parameters, N = learner ranks, w = 2 for bf16, 4 for fp32):
    model states   bf16: DeepSpeed estimate_zero{2,3}_model_states_mem_needs (no offload): ZeRO-2
                   2 P + 18 P / N; ZeRO-3 4 x largest layer + 18 P / N (18 = 16-bit grads 2 + fp32 grads 4
                   + fp32 master 4 + Adam 8). fp32 (CPU): 4 P + 12 P / N (ZeRO-2: the weights are the master
                   copy), 20 P / N (ZeRO-3), as measured. Frozen parameters (learner.freeze_vision) count
                   their weights only.
    reference      w P (ZeRO-2: a full copy per rank), w P / N (ZeRO-3), when learner.kl_coef > 0
    logits         min(micro_batch x response tokens, learner.logprob_chunk_tokens) x vocabulary x 4 bytes x 3
                   (one chunk's fp32 logits, their log-softmax, its gradient; the LM head runs on response
                   positions only; chunk 0: the whole micro-batch's)
    activations    per decoder layer and token 34 x hidden bytes (bf16, flash/SDPA attention: Korthikanti
                   et al. 2022 without the attention-score term); gradient checkpointing keeps 2 x hidden
                   per layer and token plus one layer's 34 x hidden; the vision tower alike on its patches
                   when it is trained
    KV cache       2 x layers x KV heads x head dim x w per token, for the sequences one engine holds at
                   once (prompts_per_step x G / rollout workers) at image + prompt + max_new_tokens tokens
    checkpoint     12 P_trainable (fp32 master + Adam) + w P (ZeRO-2: the module's weights; ZeRO-3: only
                   the frozen ones) per save, times train.keep_checkpoints + 1 on disk while one is written;
                   its write time per rank at --storage-gbps, warned about above half cluster.call_timeout_s
    sync           w x trainable parameters, to every rollout worker at every step
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from config import REPO, Config
from policy.family import family_of

GB = 1e9
MODELS = REPO / "configs" / "models"
SAM2_GB = {"hiera_t": 1.0, "hiera_s": 1.2, "hiera_b+": 1.8, "hiera_l": 3.0}  # weights + one 1024-px image's activations


@dataclass
class Shape:
    params: int
    vision: int                  # vision tower incl. merger
    largest_layer: int           # the largest single parameter tensor (ZeRO-3 gathers at least this)
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    patch: int
    merge: int


@dataclass
class Plan:
    actors: list[tuple[str, int, float, float]] = field(default_factory=list)  # (role, count, GPUs, CPUs) each
    learner: dict[str, float] = field(default_factory=dict)   # bytes per learner GPU (or host, on CPU)
    rollout: dict[str, float] = field(default_factory=dict)   # bytes per vLLM engine
    other: dict[str, float] = field(default_factory=dict)     # checkpoint, sync, tokens
    problems: list[str] = field(default_factory=list)         # the job cannot run as configured
    warnings: list[str] = field(default_factory=list)         # it runs, but wastes or risks something


def model_config_dir(policy_path: str) -> Path:
    path = Path(policy_path)
    if (path / "config.json").exists():
        return path
    known = MODELS / path.name
    if (known / "config.json").exists():
        return known
    raise FileNotFoundError(f"model.policy_path: no config.json in {path}, and {path.name!r} is not one of the "
                            f"shapes in {MODELS} ({', '.join(sorted(p.name for p in MODELS.iterdir()))})")


def model_shape(policy_path: str) -> Shape:
    """Exact parameter counts from the model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_config_dir(policy_path))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text, vision = config.text_config, config.vision_config
    return Shape(params=sum(p.numel() for p in model.parameters()),
                 vision=sum(p.numel() for p in model.model.visual.parameters()),
                 largest_layer=max(p.numel() for p in model.parameters()),
                 layers=text.num_hidden_layers, hidden=text.hidden_size, kv_heads=text.num_key_value_heads,
                 head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                 vocab=text.vocab_size, vision_hidden=vision.hidden_size, vision_layers=vision.depth,
                 patch=vision.patch_size, merge=vision.spatial_merge_size)


def prompt_tokens(cfg: Config, policy_path: str) -> int:
    """Text tokens of the chat prompt around a typical query (the policy's tokenizer when it is here,
    else 1 token per 3 characters, which overestimates Qwen's ~4)."""
    from policy.prompt import chat_prompt

    text = chat_prompt("the small object on the left of the table, next to the cup", cfg.reward.rules,
                       cfg.reward.coordinates)
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(policy_path).encode(text, add_special_tokens=False))
    except (OSError, ValueError):
        return math.ceil(len(text) / 3)


def model_states_bytes(cfg: Config, shape: Shape, width: int) -> float:
    """Per learner rank: weights, gradients, fp32 master and Adam states (DeepSpeed's estimators for bf16)."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise probes for one and warns
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n, stage = cfg.cluster.learner_ranks, cfg.learner.zero_stage
    frozen = shape.vision if cfg.learner.freeze_vision else 0
    trained = shape.params - frozen
    frozen_bytes = width * frozen / (n if stage == 3 else 1)
    if width == 2:
        if stage == 2:
            return estimate_zero2_model_states_mem_needs(trained, n, 1, cpu_offload=False)[1] + frozen_bytes
        return estimate_zero3_model_states_mem_needs(trained, shape.largest_layer, n, 1, cpu_offload=False,
                                                     cpu_offload_params=False)[1] + frozen_bytes
    # fp32 (measured on the tiny policy, one rank: ZeRO-2 16 P, ZeRO-3 20 P): under ZeRO-2 the fp32
    # weights are the master copy; ZeRO-3 keeps a separate fp32 partition
    if stage == 2:
        return 4 * trained + 12 * trained / n + frozen_bytes
    return 20 * trained / n + frozen_bytes


def make_plan(cfg: Config, policy_path: str, gpus_per_node: int | None = None, nodes: int = 1,
              storage_gbps: float = 0.5) -> Plan:
    """The plan of ``cfg`` for the policy at ``policy_path`` (its config.json is enough), against a
    cluster of ``nodes`` x ``gpus_per_node`` GPUs of ``cluster.gpu_memory_gb`` each (None: not checked),
    whose checkpoint storage takes ``storage_gbps`` GB/s per learner rank."""
    shape, plan = model_shape(policy_path), Plan()
    on_gpu = cfg.cluster.learner.num_gpus > 0
    width = 2 if cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and on_gpu) else 4
    plan_actors(plan, cfg, gpus_per_node, nodes)
    plan_tokens(plan, cfg, shape, policy_path)
    plan_memory(plan, cfg, shape, width)
    if on_gpu:
        check_gpu_memory(plan, cfg)
    plan_checkpoints(plan, cfg, shape, width, storage_gbps)
    return plan


def plan_actors(plan: Plan, cfg: Config, gpus_per_node: int | None, nodes: int) -> None:
    """The actors and the GPUs they reserve, against the cluster's when it is given."""
    c, r = cfg.cluster, cfg.rollout
    plan.actors = [("learner rank", c.learner_ranks, c.learner.num_gpus, c.learner.num_cpus),
                   ("rollout engine", c.rollout_workers, c.rollout.num_gpus * r.tensor_parallel_size,
                    c.rollout.num_cpus * r.tensor_parallel_size),
                   ("reward worker", c.reward_workers, c.reward.num_gpus, c.reward.num_cpus)]
    total = sum(n * g for _, n, g, _ in plan.actors)
    plan.other["gpus"] = total
    if gpus_per_node is not None:
        have = gpus_per_node * nodes
        plan.other["gpus_available"] = have
        if total > have:
            plan.problems.append(f"the actors reserve {total:g} GPUs; the cluster has {have}")
        elif total < have:
            plan.warnings.append(f"{have - total:g} of the cluster's {have} GPUs are not used by any actor")
    if c.reward.num_gpus and cfg.reward.mask_iou == "off":
        plan.warnings.append(f"{c.reward_workers} reward workers reserve {c.reward_workers * c.reward.num_gpus:g} "
                             "GPUs, but reward.mask_iou is off: no segmenter is loaded on them (set "
                             "cluster.reward.num_gpus=0, or turn the mask-IoU reward on)")


def plan_tokens(plan: Plan, cfg: Config, shape, policy_path: str) -> None:
    """Tokens of one sequence: image + prompt + response, against rollout.max_model_len."""
    r = cfg.rollout
    family = family_of(model_config_dir(policy_path))
    try:
        family.check_image_size(cfg.model.image_size)
    except ValueError as exc:
        plan.problems.append(str(exc))
    if cfg.reward.coordinates == "auto":  # the prompt in the family's convention, as the job writes it
        cfg = cfg.model_copy(deep=True)
        cfg.reward.coordinates = family.coordinates
    image_tokens = (cfg.model.image_size // (shape.patch * shape.merge)) ** 2
    prompt = prompt_tokens(cfg, policy_path)
    sequence = image_tokens + prompt + r.max_new_tokens
    plan.other.update(image_tokens=image_tokens, prompt_tokens=prompt, sequence_tokens=sequence,
                      patches=image_tokens * shape.merge ** 2)
    if image_tokens + prompt >= r.max_model_len:
        plan.problems.append(f"rollout.max_model_len={r.max_model_len} <= image {image_tokens} + prompt ~{prompt} "
                             "tokens: no prompt fits")
    elif sequence > r.max_model_len:
        plan.warnings.append(f"rollout.max_model_len={r.max_model_len} < image {image_tokens} + prompt ~{prompt} + "
                             f"rollout.max_new_tokens {r.max_new_tokens} = {sequence} tokens: long answers are cut")


def logit_tokens(tokens: int, chunk_tokens: int) -> int:
    """Response tokens whose logits exist at once: one chunk (learner/logprobs.py), or all of them (0)."""
    return min(tokens, chunk_tokens) if chunk_tokens else tokens


def plan_memory(plan: Plan, cfg: Config, shape, width: int) -> None:
    """Memory of one learner rank (model states, reference, logits, activations of one micro-batch) and
    of one vLLM engine (tensor parallelism splits weights and cache over its GPUs)."""
    c, r, lc = cfg.cluster, cfg.rollout, cfg.learner
    mb, sequence, patches = lc.micro_batch_size, plan.other["sequence_tokens"], plan.other["patches"]

    def activations(checkpointing: bool) -> tuple[float, float]:
        """(text, vision) activation bytes of one micro-batch."""
        def tower(layers, hidden, tokens):
            per_layer = 34 * hidden * width / 2
            return (((layers * 2 * hidden * width / 2 + per_layer) if checkpointing else layers * per_layer)
                    * tokens * mb)
        vision = 0.0 if lc.freeze_vision else tower(shape.vision_layers, shape.vision_hidden, patches)
        return tower(shape.layers, shape.hidden, sequence), vision

    text_acts, vision_acts = activations(lc.gradient_checkpointing)
    plan.other["activations, other checkpointing setting"] = sum(activations(not lc.gradient_checkpointing))
    plan.learner = {
        "model states": model_states_bytes(cfg, shape, width),
        "reference model": ((width * shape.params / (c.learner_ranks if lc.zero_stage == 3 else 1))
                            if lc.kl_coef > 0 else 0),
        "logits (one micro-batch)": logit_tokens(mb * r.max_new_tokens, lc.logprob_chunk_tokens) * shape.vocab * 4 * 3,
        "activations, text": text_acts,
        "activations, vision": vision_acts,
    }
    concurrent = math.ceil(r.prompts_per_step * r.group_size / c.rollout_workers)
    plan.other["concurrent sequences"] = concurrent
    tp = r.tensor_parallel_size
    plan.rollout = {
        "weights": width * shape.params / tp,
        "KV cache of the batch": (2 * shape.layers * shape.kv_heads * shape.head_dim * width * sequence * concurrent
                                  / tp),
    }


def check_gpu_memory(plan: Plan, cfg: Config) -> None:
    """Each actor's memory against its GPU share of cluster.gpu_memory_gb."""
    c, r = cfg.cluster, cfg.rollout
    gpu_gb = c.gpu_memory_gb
    budget = gpu_gb * GB
    learner_total = sum(plan.learner.values())
    if learner_total > 0.95 * budget:
        plan.problems.append(f"a learner GPU needs ~{learner_total / GB:.1f} GB of {gpu_gb:g} GB")
    vllm_need = sum(plan.rollout.values())
    if vllm_need > r.gpu_memory_utilization * budget:
        plan.problems.append(f"a vLLM engine needs ~{vllm_need / GB:.1f} GB (weights + KV cache of "
                             f"{plan.other['concurrent sequences']} sequences) > rollout.gpu_memory_utilization x "
                             f"{gpu_gb:g} GB")
    reward_gb = SAM2_GB.get(_sam2_size(cfg.reward.sam2_config), 3.0) if cfg.reward.mask_iou != "off" else 0.0
    plan.other["reward worker GB"] = reward_gb
    if c.reward.num_gpus and reward_gb > c.reward.num_gpus * gpu_gb:
        plan.problems.append(f"a reward worker needs ~{reward_gb:g} GB > its {c.reward.num_gpus:g} GPU share")


def plan_checkpoints(plan: Plan, cfg: Config, shape, width: int, storage_gbps: float) -> None:
    """Checkpoint bytes (in memory and on disk) and write time, and the bytes of one weight sync."""
    c, lc = cfg.cluster, cfg.learner
    trained = shape.params - (shape.vision if lc.freeze_vision else 0)
    # ZeRO-2 saves the module's weights and the fp32 master + Adam states; ZeRO-3 the partitioned states only
    plan.other["checkpoint bytes"] = (12 * trained
                                      + width * (shape.params if lc.zero_stage == 2 else shape.params - trained))
    plan.other["checkpoint disk bytes"] = plan.other["checkpoint bytes"] * (cfg.train.keep_checkpoints + 1)
    # Every rank writes its own part at once, within one learner call (cluster.call_timeout_s).
    per_rank = plan.other["checkpoint bytes"] / (c.learner_ranks if lc.zero_stage == 3 else 1)
    plan.other["checkpoint seconds"] = per_rank / (storage_gbps * GB)
    if plan.other["checkpoint seconds"] > 0.5 * c.call_timeout_s:
        plan.warnings.append(f"a checkpoint writes ~{per_rank / GB:.0f} GB per learner rank: ~"
                             f"{plan.other['checkpoint seconds']:.0f} s at {storage_gbps:g} GB/s, over half of "
                             f"cluster.call_timeout_s={c.call_timeout_s:g}")
    plan.other["sync bytes"] = width * trained
    plan.other.update(params=shape.params, trained_params=trained, vision_params=shape.vision)


def _sam2_size(sam2_config: str) -> str:
    return next((size for size in SAM2_GB if size in sam2_config), "hiera_l")


def measure_storage(directory: str | Path, n_bytes: int = 256 << 20) -> float:
    """Write speed of ``directory``'s storage in GB/s: one file of n_bytes written and fsync'ed, removed."""
    import os
    import tempfile
    import time

    block = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        start = time.perf_counter()
        for _ in range(n_bytes >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        return n_bytes / (time.perf_counter() - start) / GB


def check(cfg: Config, policy_path: str) -> Plan:
    """The plan (cluster size not checked: Ray's autoscaler may add nodes); RuntimeError naming every
    problem when it cannot run. launch.py calls this at start, before any actor."""
    plan = make_plan(cfg, policy_path)
    if plan.problems:
        raise RuntimeError("the job cannot run as configured (python -m cluster.plan shows the whole plan): "
                           + "; ".join(plan.problems))
    return plan


def format_plan(cfg: Config, plan: Plan, policy_path: str) -> str:
    o, lines, gpu_gb = plan.other, [], cfg.cluster.gpu_memory_gb
    lines.append(f"policy {policy_path}: {o['params'] / 1e9:.2f}B parameters, {o['trained_params'] / 1e9:.2f}B "
                 f"trained; a sequence = {o['image_tokens']} image + ~{o['prompt_tokens']} prompt + "
                 f"{cfg.rollout.max_new_tokens} response = {o['sequence_tokens']} tokens "
                 f"(rollout.max_model_len {cfg.rollout.max_model_len})")
    lines.append(f"{'actor':<16} {'count':>5} {'GPUs each':>9} {'CPUs each':>9} {'GPUs':>6}")
    for role, n, gpus, cpus in plan.actors:
        lines.append(f"{role:<16} {n:>5} {gpus:>9g} {cpus:>9g} {n * gpus:>6g}")
    available = f" of {o['gpus_available']}" if "gpus_available" in o else ""
    lines.append(f"{'total':<16} {'':>5} {'':>9} {'':>9} {o['gpus']:>6g}{available}")
    device = "GPU" if cfg.cluster.learner.num_gpus else "host"
    checkpointing = "on" if cfg.learner.gradient_checkpointing else "off"
    for title, part in ((f"per learner {device} (ZeRO-{cfg.learner.zero_stage}, {cfg.cluster.learner_ranks} ranks, "
                         f"gradient checkpointing {checkpointing})", plan.learner),
                        (f"per vLLM engine (TP {cfg.rollout.tensor_parallel_size})", plan.rollout)):
        lines.append(f"{title}:")
        for name, value in part.items():
            lines.append(f"  {name:<28} {value / GB:>8.2f} GB")
        lines.append(f"  {'total':<28} {sum(part.values()) / GB:>8.2f} GB")
        if part is plan.learner:
            other = "off" if cfg.learner.gradient_checkpointing else "on"
            lines.append(f"  (activations with gradient checkpointing {other}: "
                         f"{o['activations, other checkpointing setting'] / GB:.2f} GB)")
    if cfg.cluster.learner.num_gpus:
        lines.append(f"  vLLM budget: rollout.gpu_memory_utilization {cfg.rollout.gpu_memory_utilization} "
                     f"x {gpu_gb:g} GB = "
                     f"{cfg.rollout.gpu_memory_utilization * gpu_gb:.1f} GB; learner margin "
                     f"{gpu_gb - sum(plan.learner.values()) / GB:.1f} GB")
        lines.append(f"per reward worker: ~{o['reward worker GB']:g} GB")
    lines.append(f"checkpoint: {o['checkpoint bytes'] / GB:.2f} GB per save (~{o['checkpoint seconds']:.0f} s), "
                 f"{o['checkpoint disk bytes'] / GB:.2f} GB on disk (train.keep_checkpoints "
                 f"{cfg.train.keep_checkpoints} + the one being written)")
    lines.append(f"weight sync: {o['sync bytes'] / GB:.2f} GB to each of {cfg.cluster.rollout_workers} rollout engines "
                 f"per step ({cfg.rollout.weight_sync})")
    lines += [f"WARNING: {w}" for w in plan.warnings] + [f"PROBLEM: {p}" for p in plan.problems]
    lines.append("plan: " + ("cannot run" if plan.problems else "ok"))
    return "\n".join(lines)


def main(argv=None) -> int:
    from config import load_config_or_exit
    from policy.prepare import prepare_policy

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="the cluster to plan for (default: not checked)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--storage-gbps", type=float, default=0.5,
                   help="checkpoint write speed per learner rank in GB/s (default 0.5, shared storage)")
    p.add_argument("--measure-storage", metavar="DIR", default=None,
                   help="measure the write speed of DIR (e.g. the shared train.output_dir) and use it")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.zero_stage=2")
    args = p.parse_args(argv)
    cfg = load_config_or_exit(args.config, args.overrides)
    # model.policy_path, else the tiny policy the job would build (into train.output_dir, as the job does)
    policy_path = cfg.model.policy_path or prepare_policy(cfg)
    if args.measure_storage:
        args.storage_gbps = measure_storage(args.measure_storage)
        print(f"storage {args.measure_storage}: {args.storage_gbps:.2f} GB/s (256 MB written, fsync'ed)")
    plan = make_plan(cfg, policy_path, args.gpus_per_node, args.nodes, args.storage_gbps)
    print(json.dumps(plan.__dict__, indent=2) if args.json else format_plan(cfg, plan, policy_path))
    return 1 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())
