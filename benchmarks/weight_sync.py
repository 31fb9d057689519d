"""Weight sync, RPC vs collective, side by side: seconds per sync, GB/s, and the growth with workers.

    python benchmarks/weight_sync.py [--policies tiny,large,3b] [--workers 1,2,4]
                                     [--layouts one-node,multi-node] [--repeats 3]

The actors are the job's own (cluster/): a LearnerGroup of one rank (ZeRO-2) and a RolloutGroup of
real vLLM CPU engines, as many as the largest --workers; each count uses the first N of them. Per
count the two methods alternate, each with one warm-up sync and then --repeats timed ones
(``time/sync``: from the learner's first bucket to the last worker's commit; the parity probe runs
after each sync, on every worker, and is not counted):
    rpc         rollout.weight_sync=rpc: learner rank 0 puts each bucket in Ray's object store once,
                every worker fetches and loads it (cluster/weight_sync.py)
    collective  rollout.weight_sync=collective: learner rank 0 broadcasts each bucket to every worker
                in one gloo group (cluster/weight_sync.py CollectiveSync; NCCL on GPUs)
Layouts:
    one-node    one Ray node: the object store is shared memory for every actor
    multi-node  ray.cluster_utils.Cluster on this machine: a head node holding the learner, and two
                worker nodes for the rollout workers (spread over both), each node with its own object
                store: RPC copies every bucket into each worker node's store, as between machines
Policies (policy.tiny.build_tiny_policy, random weights, the tiny tokenizer's 1,344-token vocabulary):
    tiny   the tests' policy (hidden 128, 2 layers), fp32
    large  benchmarks/vs_trl.py's (hidden 512, 8 layers, 26M parameters), fp32
    3b     Qwen2.5-VL-3B's decoder shape (hidden 2048, 16 heads, 2 KV heads, MLP 11008) with 7 of its
           36 layers (~0.55B parameters), bf16 as on GPUs: the largest that fits four engines and the
           learner in 24 GB
On a machine with few cores every process shares them: a broadcast to N workers on one machine
copies N times on the same cores, so growth with N here is an upper bound of what separate machines
(or GPUs with NCCL) see. Numbers are this machine's; compare the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

POLICIES = {
    "tiny": ({}, "float32"),
    "large": ({"hidden_size": 512, "layers": 8, "heads": 8}, "float32"),
    "3b": ({"hidden_size": 2048, "layers": 7, "heads": 16, "kv_heads": 2, "intermediate_size": 11008}, "bfloat16"),
}
# |learner - vLLM| logprob on the probe: fp32 agrees to ~1e-5; bf16 kernels differ (the config's GPU advice).
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


def node_of(actor) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def bench_config(dtype: str):
    """The jobs' config: collective sync with the parity probe after every sync, no KL reference."""
    from config import Config

    cfg = Config()
    cfg.model.dtype = dtype
    cfg.learner.kl_coef = 0.0
    cfg.rollout.weight_sync = "collective"
    cfg.rollout.kv_cache_gib = 0.25
    cfg.cluster.sync_parity_check = True
    cfg.cluster.sync_parity_tolerance = TOLERANCE[dtype]
    return cfg


def time_syncs(repeats: int, learners, rollouts, methods: dict, version: int) -> tuple[dict, int]:
    """Each method's median s per sync to ``rollouts.workers`` over ``repeats`` (after one warm-up that
    also builds the broadcast group), the bytes per worker and the largest parity difference; and the
    last weight version pushed."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    n_bytes, parity = 0, 0.0
    for repeat in range(repeats + 1):
        for method, sync in methods.items():
            rollouts.sync = sync
            version += 1
            metrics = rollouts.sync_from(learners, version)
            parity = max(parity, metrics["sync/parity_max_diff"])
            n_bytes = metrics["sync/bytes"]
            if repeat:
                times[method].append(metrics["time/sync"])
    return {"bytes": n_bytes, "parity": parity, **{m: statistics.median(t) for m, t in times.items()}}, version


def run_policy(args, layout: str, name: str, work: Path) -> list[dict]:
    """One Ray cluster for one policy: the learner, the engines, then every worker count."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.job import parity_probe, runtime_env
    from cluster.learners import LearnerGroup
    from cluster.rollout import RolloutGroup
    from cluster.weight_sync import RpcSync
    from data.dataset import ParquetSource
    from data.synthetic import write_synthetic
    from policy.tiny import build_tiny_policy

    counts = sorted(args.workers)
    shape, dtype = POLICIES[name]
    cfg = bench_config(dtype)
    policy = str(build_tiny_policy(work / f"policy_{name}", image_size=cfg.model.image_size, **shape))
    sample = next(ParquetSource(write_synthetic(work / "probe.parquet", 1, cfg.model.image_size),
                                shuffle=False).iter_epoch())
    cluster = None
    if layout == "one-node":
        ray.init(address="local", num_cpus=1 + counts[-1], include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env())
    else:  # the head node's one CPU goes to the learner; worker nodes are added after it is placed
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env())
    rows = []
    try:
        print(f"# {layout}, {name}: starting the learner and {counts[-1]} vLLM engines", flush=True)
        learners = LearnerGroup(cfg, policy)
        if cluster is not None:
            for _ in range(2):
                cluster.add_node(num_cpus=(counts[-1] + 1) // 2)
        rollouts = RolloutGroup(cfg, policy, None, counts[-1], parity_probe(sample, policy, cfg))
        learners.ready()
        rollouts.ready()
        everyone = list(rollouts.workers)
        if cluster is not None:  # worker i on node i mod 2, none on the learner's
            by_node: dict[str, list] = {}
            for w in everyone:
                by_node.setdefault(node_of(w), []).append(w)
            assert node_of(learners.ranks[0]) not in by_node, "a rollout worker landed on the learner's node"
            everyone = [w for pair in zip(*by_node.values()) for w in pair] if len(by_node) > 1 else everyone
        methods, version = {"rpc": RpcSync(cfg, rollouts.sync.parity_probe), "collective": rollouts.sync}, 0
        for n in counts:
            rollouts.workers = everyone[:n]
            row, version = time_syncs(args.repeats, learners, rollouts, methods, version)
            rows.append({"layout": layout, "policy": name, "workers": n, **row})
            print_row(rows[-1], flush=True)
        rollouts.workers = everyone
        rollouts.shutdown()
        learners.shutdown()
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return rows


HEADER = (f"{'layout':<11} {'policy':<6} {'workers':>7} {'MB':>8} {'rpc s':>8} {'coll. s':>8} "
          f"{'rpc GB/s':>9} {'coll GB/s':>9} {'coll/rpc':>8} {'parity':>8}")


def print_row(row: dict, flush: bool = False) -> None:
    gb = row["bytes"] / 1e9
    print(f"{row['layout']:<11} {row['policy']:<6} {row['workers']:>7} {row['bytes'] / 1e6:>8.1f} "
          f"{row['rpc']:>8.3f} {row['collective']:>8.3f} {gb / row['rpc']:>9.2f} {gb / row['collective']:>9.2f} "
          f"{row['collective'] / row['rpc']:>8.2f} {row['parity']:>8.1e}", flush=flush)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default="tiny,large,3b", help="comma-separated: " + ", ".join(POLICIES))
    p.add_argument("--workers", default="1,2,4", help="comma-separated rollout worker counts")
    p.add_argument("--layouts", default="one-node,multi-node", help="comma-separated: one-node, multi-node")
    p.add_argument("--repeats", type=int, default=3, help="timed syncs per method and count (median shown)")
    args = p.parse_args()
    args.policies = args.policies.split(",")
    args.workers = [int(n) for n in args.workers.split(",")]
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}")
    print("# time/sync median over --repeats syncs per method; coll/rpc < 1: the collective is faster")
    print(HEADER, flush=True)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_weight_sync_") as tmp:
        for layout in args.layouts.split(","):
            for name in args.policies:
                rows += run_policy(args, layout, name, Path(tmp))
    print(f"\n# summary ({time.perf_counter() - started:.0f} s)")
    print(HEADER)
    for row in rows:
        print_row(row)
    for layout in {r["layout"] for r in rows}:
        for name in args.policies:
            mine = {r["workers"]: r for r in rows if r["layout"] == layout and r["policy"] == name}
            if len(mine) > 1:
                lo, hi = mine[min(mine)], mine[max(mine)]
                print(f"{layout:<11} {name:<6} growth {min(mine)} -> {max(mine)} workers: rpc "
                      f"{hi['rpc'] / lo['rpc']:.2f}x, collective {hi['collective'] / lo['collective']:.2f}x")


if __name__ == "__main__":
    main()
