"""GRPO learner step throughput and memory: ZeRO-2 vs ZeRO-3, 1 vs 2 ranks (tiny policy unless --policy).

    python benchmarks/learner_step.py [--seqs 16] [--response-len 96] [--steps 3] [--ranks 1,2] [--stages 2,3]

Each (stage, ranks) runs in fresh processes (gloo on CPU, NCCL on GPU). One warm-up step, then --steps
timed steps over the same batch, split evenly over the ranks. Reported: response tokens/s and all
tokens/s (prompt + response, what the model forwards), wall and CPU seconds per step (CPU time of
rank 0: robust when other jobs share the machine), peak RSS of rank 0 (whole process life, model
loading included) and RSS growth over the timed steps. Each rank runs --threads torch threads
(default 1: on a shared 2-core machine two OpenMP threads per rank mostly wait on each other, and one
thread per rank makes 1 vs 2 ranks a like-for-like comparison).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_batch(n: int, response_len: int, image_size: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    from policy.prompt import chat_prompt

    rng = np.random.default_rng(0)
    return [{"sample_id": str(i), "prompt": chat_prompt(f"the object number {i}"),
             "image": Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)),
             "response_ids": rng.integers(300, 1300, response_len).tolist(),
             "logprobs": [-7.0] * response_len, "advantage": float(rng.normal())} for i in range(n)]


def run_rank(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch

    from config import Config
    from learner.learner import Learner

    torch.set_num_threads(args.threads)
    cfg = Config()
    cfg.learner.zero_stage = args.stage
    cfg.learner.micro_batch_size = args.micro_batch
    cfg.model.image_size = args.image_size
    learner = Learner(cfg, args.policy, rank, world_size, master_port=port)
    batch = make_batch(args.seqs, args.response_len, args.image_size)
    shard = batch[rank::world_size]
    num_tokens = args.seqs * args.response_len
    learner.train_step(shard, num_tokens, args.seqs)  # warm-up
    rss_before = rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        learner.train_step(shard, num_tokens, args.seqs)
    seconds = (time.perf_counter() - start) / args.steps
    cpu_seconds = (time.process_time() - cpu_start) / args.steps
    if rank == 0:
        prompt_tokens = sum(learner.processor(text=[s["prompt"]], images=[s["image"]])["input_ids"][0].__len__()
                            for s in batch)
        result = {"stage": args.stage, "ranks": world_size, "s_per_step": seconds, "cpu_s_per_step": cpu_seconds,
                  "response_tok_s": num_tokens / seconds, "all_tok_s": (num_tokens + prompt_tokens) / seconds,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_growth_mib": rss_mib() - rss_before}
        Path(out).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="HF policy directory (default: build the tiny policy)")
    p.add_argument("--seqs", type=int, default=16, help="sequences per step (whole batch)")
    p.add_argument("--response-len", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="learner_bench_")
    if not args.policy:
        from policy.tiny import build_tiny_policy
        args.policy = str(build_tiny_policy(Path(tmp) / "tiny", image_size=args.image_size))

    results = []
    for stage in (int(s) for s in args.stages.split(",")):
        for ranks in (int(r) for r in args.ranks.split(",")):
            args.stage = stage
            out = os.path.join(tmp, f"z{stage}_r{ranks}.json")
            mp.start_processes(run_rank, args=(ranks, free_port(), args, out), nprocs=ranks, start_method="spawn")
            results.append(json.loads(Path(out).read_text()))
            print(json.dumps(results[-1]), flush=True)

    print(f"\nbatch: {args.seqs} seqs x {args.response_len} response tokens, micro-batch {args.micro_batch}, "
          f"{args.steps} timed steps, policy {args.policy}")
    print(f"{'ZeRO':>4} {'ranks':>5} {'s/step':>8} {'cpu s/step':>10} {'resp tok/s':>11} {'all tok/s':>10} {'peak RSS MiB':>13} {'RSS growth':>11}")
    for r in results:
        print(f"{r['stage']:>4} {r['ranks']:>5} {r['s_per_step']:>8.2f} {r['cpu_s_per_step']:>10.2f} {r['response_tok_s']:>11.0f} "
              f"{r['all_tok_s']:>10.0f} {r['peak_rss_mib']:>13.0f} {r['rss_growth_mib']:>11.0f}")
    by = {(r["stage"], r["ranks"]): r for r in results}
    for ranks in sorted({r["ranks"] for r in results}):
        if (2, ranks) in by and (3, ranks) in by:
            z2, z3 = by[2, ranks], by[3, ranks]
            print(f"ZeRO-3 / ZeRO-2, {ranks} rank(s): wall {z3['s_per_step'] / z2['s_per_step']:.2f}x, "
                  f"rank-0 CPU {z3['cpu_s_per_step'] / z2['cpu_s_per_step']:.2f}x")
    for stage in sorted({r["stage"] for r in results}):
        if (stage, 1) in by and (stage, 2) in by:
            print(f"ZeRO-{stage} speed-up 2 ranks vs 1: {by[stage, 1]['s_per_step'] / by[stage, 2]['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
