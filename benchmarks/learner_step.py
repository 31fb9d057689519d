"""GRPO learner step throughput, memory and phases: ZeRO-2 vs ZeRO-3, 1 vs 2 ranks, chunked logprobs vs the
whole-vocabulary logits (tiny policy unless --policy).

    python benchmarks/learner_step.py [--seqs 16] [--group 8] [--response-len 96] [--steps 3] [--ranks 1,2]
                                      [--stages 2,3] [--chunk-tokens 1024] [--threads 1] [--profile 25]
                                      [--policy DIR | --hidden 1024 --vocab 151936 ...]

``--chunk-tokens 0,1024`` runs each (stage, ranks) with learner.logprob_chunk_tokens 0 (the whole micro-
batch's logits) and 1024 side by side and prints their ratios; ``--vocab 151936`` gives the built policy
Qwen's vocabulary size. Step peak memory: the peak RSS of rank 0 over the timed steps above its RSS
before them (Linux: the peak is reset through /proc/self/clear_refs).

Each (stage, ranks) runs in fresh processes (gloo on CPU, NCCL on GPU). One warm-up step, then --steps
timed steps over the same batch, split evenly over the ranks. Reported: response tokens/s and all
tokens/s (prompt + response, what the model forwards), wall and CPU seconds per step (CPU time of
rank 0: robust when other jobs share the machine), peak RSS of rank 0 (whole process life, model
loading included) and RSS growth over the timed steps, and the learner's phases (time/learner/*: collate,
vision, reference, forward, loss, backward, optimizer; mean of the timed steps). --profile N: one more
step under torch.profiler on rank 0, its N costliest operators by self CPU time (``profile_*.txt``
beside the results). The batch is --seqs / --group prompts, each with --group answers sharing its
image, as a GRPO batch is. Each rank runs --threads torch threads
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


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def make_batch(n: int, response_len: int, image_size: int, group: int):
    """A LearnerBatch of n sequences: n / group prompts, each with its image object shared by its
    group's answers."""
    import numpy as np
    from PIL import Image

    from policy.prompt import chat_prompt
    from trajectory import LearnerBatch, LearnerSequence

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
              for _ in range(-(-n // group))]
    return LearnerBatch([LearnerSequence(chat_prompt(f"the object number {i // group}"), images[i // group],
                                         rng.integers(300, 1300, response_len).tolist(), [-7.0] * response_len,
                                         float(rng.normal()), group=str(i // group), answer=i % group)
                         for i in range(n)])


def run_rank(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch

    from config import Config
    from learner.learner import Learner

    torch.set_num_threads(args.threads)
    cfg = Config()
    cfg.learner.zero_stage = args.stage
    cfg.learner.micro_batch_size = args.micro_batch
    cfg.learner.logprob_chunk_tokens = args.chunk
    cfg.model.image_size = args.image_size
    learner = Learner(cfg, args.policy, rank, world_size, master_port=port)
    batch = make_batch(args.seqs, args.response_len, args.image_size, args.group)
    shard = batch.shards(world_size)[rank]
    num_tokens = args.seqs * args.response_len
    learner.train_step(shard)  # warm-up
    rss_before = rss_mib()
    reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    phases: dict[str, float] = {}
    for _ in range(args.steps):
        metrics = learner.train_step(shard)
        for k, v in metrics.items():
            if k.startswith("time/learner/"):
                phases[k.removeprefix("time/learner/")] = (
                    phases.get(k.removeprefix("time/learner/"), 0.0) + v / args.steps)
    seconds = (time.perf_counter() - start) / args.steps
    step_peak = peak_rss_mib() - rss_before
    cpu_seconds = (time.process_time() - cpu_start) / args.steps
    if rank == 0:
        prompt_tokens = sum(learner.processor(text=[s.prompt], images=[s.image])["input_ids"][0].__len__()
                            for s in batch.sequences)
        result = {"stage": args.stage, "ranks": world_size, "chunk": args.chunk, "step_peak_mib": step_peak,
                  "s_per_step": seconds, "cpu_s_per_step": cpu_seconds,
                  "response_tok_s": num_tokens / seconds, "all_tok_s": (num_tokens + prompt_tokens) / seconds,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_growth_mib": rss_mib() - rss_before, "phases": phases}
        Path(out).write_text(json.dumps(result))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            learner.train_step(shard)
        if rank == 0:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
            Path(out).with_name(f"profile_z{args.stage}_r{world_size}.txt").write_text(table)  # the last chunk setting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="HF policy directory (default: build the tiny policy)")
    p.add_argument("--seqs", type=int, default=16, help="sequences per step (whole batch)")
    p.add_argument("--group", type=int, default=8, help="answers per prompt (they share its image)")
    p.add_argument("--hidden", type=int, default=128, help="built policy: hidden size (without --policy)")
    p.add_argument("--layers", type=int, default=2, help="built policy: decoder layers")
    p.add_argument("--heads", type=int, default=2, help="built policy: attention heads")
    p.add_argument("--intermediate", type=int, default=None, help="built policy: MLP width (default 2 x hidden)")
    p.add_argument("--vocab", type=int, default=None, help="built policy: vocabulary rows (e.g. Qwen's 151936)")
    p.add_argument("--chunk-tokens", default="1024", help="learner.logprob_chunk_tokens values to compare (0: whole)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one more step on rank 0 and print its N costliest operators")
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
        args.policy = str(build_tiny_policy(Path(tmp) / "tiny", image_size=args.image_size, hidden_size=args.hidden,
                                            layers=args.layers, heads=args.heads,
                                            intermediate_size=args.intermediate, vocab_size=args.vocab))

    results = []
    for stage in (int(s) for s in args.stages.split(",")):
        for ranks in (int(r) for r in args.ranks.split(",")):
            for chunk in (int(c) for c in args.chunk_tokens.split(",")):
                args.stage, args.chunk = stage, chunk
                out = os.path.join(tmp, f"z{stage}_r{ranks}_c{chunk}.json")
                mp.start_processes(run_rank, args=(ranks, free_port(), args, out), nprocs=ranks, start_method="spawn")
                results.append(json.loads(Path(out).read_text()))
                print(json.dumps(results[-1]), flush=True)
                profile = Path(out).with_name(f"profile_z{stage}_r{ranks}.txt")
                if profile.exists():
                    print(f"\n# ZeRO-{stage}, {ranks} rank(s): one step under torch.profiler, costliest operators "
                          f"(rank 0)\n{profile.read_text()}", flush=True)

    report(args, results)


def report(args, results: list[dict]) -> None:
    """The table of runs, the learner's phases per run, and the ratios: chunked / whole logits, ZeRO-3 /
    ZeRO-2, 2 ranks / 1 rank (the latter two at the first chunk setting)."""
    print(f"\nbatch: {args.seqs} seqs x {args.response_len} response tokens, micro-batch {args.micro_batch}, "
          f"{args.steps} timed steps, policy {args.policy}")
    print(f"{'ZeRO':>4} {'ranks':>5} {'chunk':>6} {'s/step':>8} {'cpu s/step':>10} {'resp tok/s':>11} "
          f"{'all tok/s':>10} {'step peak MiB':>14} {'peak RSS MiB':>13} {'RSS growth':>11}")
    for r in results:
        print(f"{r['stage']:>4} {r['ranks']:>5} {r['chunk']:>6} {r['s_per_step']:>8.2f} {r['cpu_s_per_step']:>10.2f} "
              f"{r['response_tok_s']:>11.0f} {r['all_tok_s']:>10.0f} {r['step_peak_mib']:>14.0f} "
              f"{r['peak_rss_mib']:>13.0f} {r['rss_growth_mib']:>11.0f}")
    names = list(dict.fromkeys(k for r in results for k in r["phases"]))
    print(f"\nlearner phases, s/step (slowest rank): {'ZeRO':>4} {'ranks':>5} {'chunk':>6} "
          + " ".join(f"{n:>9}" for n in names))
    for r in results:
        print(f"{'':<39}{r['stage']:>4} {r['ranks']:>5} {r['chunk']:>6} "
              + " ".join(f"{r['phases'].get(n, 0):>9.3f}" for n in names))
    by = {(r["stage"], r["ranks"], r["chunk"]): r for r in results}
    chunks = [int(c) for c in args.chunk_tokens.split(",")]
    for (stage, ranks, chunk), r in by.items():
        if chunk and (stage, ranks, 0) in by:
            whole = by[stage, ranks, 0]
            print(f"chunk {chunk} / whole logits, ZeRO-{stage}, {ranks} rank(s): step time "
                  f"{r['s_per_step'] / whole['s_per_step']:.2f}x, step peak memory "
                  f"{r['step_peak_mib'] / max(whole['step_peak_mib'], 1e-9):.2f}x")
    for ranks in sorted({r["ranks"] for r in results}):
        if (2, ranks, chunks[0]) in by and (3, ranks, chunks[0]) in by:
            z2, z3 = by[2, ranks, chunks[0]], by[3, ranks, chunks[0]]
            print(f"ZeRO-3 / ZeRO-2, {ranks} rank(s): wall {z3['s_per_step'] / z2['s_per_step']:.2f}x, "
                  f"rank-0 CPU {z3['cpu_s_per_step'] / z2['cpu_s_per_step']:.2f}x")
    for stage in sorted({r["stage"] for r in results}):
        if (stage, 1, chunks[0]) in by and (stage, 2, chunks[0]) in by:
            one, two = by[stage, 1, chunks[0]], by[stage, 2, chunks[0]]
            print(f"ZeRO-{stage} speed-up 2 ranks vs 1: {one['s_per_step'] / two['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
