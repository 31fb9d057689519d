"""Where every actor of the job runs: node, process, devices and placement group, printed at start-up."""
from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group_table


def _where(_actor_self) -> dict:
    """Runs inside an actor (through Ray's ``__ray_call__``): its node, pid and visible devices."""
    return {"node": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "gpu_share": ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0),
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def _group_row(pg, bundle: int) -> dict:
    """Placement of an actor started in bundle ``bundle`` of ``pg``: group id, its bundles, their nodes."""
    table = placement_group_table(pg)
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    bundles = table["bundles"]
    return {"group": table["placement_group_id"], "bundle": bundle, "bundles": len(bundles),
            "strategy": table["strategy"],
            "group_gpus": sum(int(b.get("GPU", 0)) for b in bundles.values()),
            "group_nodes": sorted({ips.get(n, n) for n in table["bundles_to_node_id"].values()})}


def topology(pools: dict[str, list], timeout_s: float = 60.0, placements: dict | None = None) -> list[dict]:
    """One row per actor: role, index, node, pid, GPUs and, for actors in a placement group, the group,
    the actor's bundle and the group's GPUs. ``pools`` maps a role name to its actors; ``placements``
    maps an actor to its (placement group, bundle index), default ``cluster.placement.PLACEMENT``."""
    if placements is None:
        from cluster.placement import PLACEMENT as placements
    rows = []
    for role, actors in pools.items():
        places = ray.get([a.__ray_call__.remote(_where) for a in actors], timeout=timeout_s)
        for i, (actor, p) in enumerate(zip(actors, places)):
            group = _group_row(*placements[actor]) if actor in placements else {}
            rows.append({"role": role, "index": i, **p, **group})
    return rows


def devices(row: dict) -> str:
    """"gpu 3", "gpu 3 (0.25)" for a GPU share, "2 gpus (engine's TP workers)" for an actor that holds no
    GPU itself but heads a placement group with GPU bundles (a vLLM TP engine), else "cpu"."""
    if row["gpus"]:
        share = row.get("gpu_share", 1.0)
        return "gpu " + ",".join(row["gpus"]) + (f" ({share:g})" if share < 1 else "")
    if row.get("group_gpus"):
        return f"{row['group_gpus']} gpus (engine's TP workers)"
    return "cpu"


def format_topology(rows: list[dict]) -> str:
    lines = [f"{'role':<10} {'#':>2}  {'node':<16} {'pid':>7}  {'devices':<28} placement"]
    for r in rows:
        place = "-"
        if "group" in r:
            place = (f"pg {r['group'][:8]} bundle {r['bundle']} of {r['bundles']} {r['strategy']} "
                     f"on {','.join(r['group_nodes'])}")
        lines.append(f"{r['role']:<10} {r['index']:>2}  {r['node']:<16} {r['pid']:>7}  {devices(r):<28} {place}")
    return "\n".join(lines)
