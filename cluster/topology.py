"""Where every actor of the job runs: node, process and devices, printed at start-up."""
from __future__ import annotations

import os

import ray


def _where(_actor_self) -> dict:
    """Runs inside an actor (through Ray's ``__ray_call__``): its node, pid and visible devices."""
    return {"node": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def topology(pools: dict[str, list], timeout_s: float = 60.0) -> list[dict]:
    """One row per actor: role, index, node, pid, GPUs. ``pools`` maps a role name to its actors."""
    rows = []
    for role, actors in pools.items():
        places = ray.get([a.__ray_call__.remote(_where) for a in actors], timeout=timeout_s)
        rows += [{"role": role, "index": i, **p} for i, p in enumerate(places)]
    return rows


def format_topology(rows: list[dict]) -> str:
    lines = [f"{'role':<10} {'#':>2}  {'node':<16} {'pid':>7}  devices"]
    for r in rows:
        devices = ("gpu " + ",".join(r["gpus"])) if r["gpus"] else "cpu"
        lines.append(f"{r['role']:<10} {r['index']:>2}  {r['node']:<16} {r['pid']:>7}  {devices}")
    return "\n".join(lines)
