"""Where every actor of the job runs (node, process, devices, placement group) and how it is doing (state,
restarts, weight version): printed at start-up, kept live for ``python -m cluster.status``."""
from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group_table


def _where(actor_self) -> dict:
    """Runs inside an actor (through Ray's ``__ray_call__``): its node, pid, visible devices, and its
    weight version when it has one (a rollout worker)."""
    return {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()],
            "gpu_share": ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0),
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "weight_version": getattr(actor_self, "weight_version", None)}


def _group_row(pg, bundle: int) -> dict:
    """Placement of an actor started in bundle ``bundle`` of ``pg``: group id, its bundles, their nodes."""
    table = placement_group_table(pg)
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    bundles = table["bundles"]
    return {"group": table["placement_group_id"], "bundle": bundle, "bundles": len(bundles),
            "strategy": table["strategy"],
            "group_gpus": sum(int(b.get("GPU", 0)) for b in bundles.values()),
            "group_nodes": sorted({ips.get(n, n) for n in table["bundles_to_node_id"].values()})}


class ActorTable:
    """One row per actor of the job: role, index, state, node, pid, restarts, devices, placement, weight
    version. Each refresh asks every actor where it is, in the background: a row changes when its actor
    answers, so a refresh never waits behind a busy actor (``timeout_s`` > 0 waits for all, at start-up).
    Rows follow the actors (not their positions): a new pid of the same actor is a restart by Ray; an
    actor that replaced another (the reward pool replaces dead or hung workers) starts with the restarts
    ``replaced`` gives it. An actor that cannot answer (dead, restarting, its node lost) shows ``down``."""

    def __init__(self, placements: dict | None = None):
        if placements is None:
            from cluster.placement import PLACEMENT as placements
        self.placements = placements
        self.rows: dict = {}  # actor -> its row
        self.asks: dict = {}  # actor -> its pending answer

    def refresh(self, pools: dict[str, list], timeout_s: float = 0.0, replaced: dict | None = None) -> list[dict]:
        """``pools`` maps a role to its actors (in order); returns their rows, as last known."""
        current = []
        for role, actors in pools.items():
            for i, actor in enumerate(actors):
                row = self.rows.setdefault(actor, {"state": "starting", "restarts": (replaced or {}).get(actor, 0),
                                                   "node": "-", "node_id": None, "pid": None, "gpus": []})
                row.update(role=role, index=i)
                if actor not in self.asks:
                    self.asks[actor] = actor.__ray_call__.remote(_where)
                current.append(actor)
        for gone in set(self.rows) - set(current):  # scaled down or replaced
            self.rows.pop(gone)
            self.asks.pop(gone, None)
        refs = list(self.asks.values())
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0]) if refs else set()
        for actor, ref in list(self.asks.items()):
            if ref not in ready:
                continue
            row = self.rows[actor]
            try:
                where = ray.get(ref)
            except ray.exceptions.RayError as exc:
                row["state"] = f"down ({type(exc).__name__})"
            else:
                if row["pid"] is not None and where["pid"] != row["pid"]:
                    row["restarts"] += 1
                row.update(where, state="alive")
                if actor in self.placements:
                    row.update(_group_row(*self.placements[actor]))
            self.asks[actor] = actor.__ray_call__.remote(_where)  # asked again; read at the next refresh
        return [self.rows[actor] for actor in current]


def topology(pools: dict[str, list], timeout_s: float = 60.0, placements: dict | None = None) -> list[dict]:
    """The rows of ``pools``, every actor waited for up to ``timeout_s`` (see ActorTable)."""
    return ActorTable(placements).refresh(pools, timeout_s)


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
    """The rows as a table; the live columns (state, restarts, weight version, queue) when present."""
    live = any("state" in r for r in rows)
    head = f"{'role':<10} {'#':>2}  {'node':<16} {'pid':>7}  {'devices':<28} "
    if live:
        head += f"{'state':<24} {'restarts':>8} {'weights':>7} {'queue':>5}  "
    lines = [head + "placement"]
    for r in rows:
        place = "-"
        if "group" in r:
            place = (f"pg {r['group'][:8]} bundle {r['bundle']} of {r['bundles']} {r['strategy']} "
                     f"on {','.join(r['group_nodes'])}")
        line = f"{r['role']:<10} {r['index']:>2}  {r['node']:<16} {str(r['pid'] or '-'):>7}  {devices(r):<28} "
        if live:
            version = "-" if r.get("weight_version") is None else f"v{r['weight_version']}"
            line += (f"{r.get('state', '-'):<24} {r.get('restarts', 0):>8} {version:>7} "
                     f"{str(r.get('queue', '-')):>5}  ")
        lines.append(line + place)
    return "\n".join(lines)
