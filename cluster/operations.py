"""What happens around the training loop between steps: operators' scaling requests, the reward pool's
autoscaler, lost and added nodes, events, and the live status for ``python -m cluster.status``.

    ops = Operations(cfg, controller, learners, rollouts, reward_pool)
    ops.apply_scaling(step + 1)            # operators' requests due, while no round is in flight
    metrics.update(ops.after_step(step, metrics, state))   # autoscaler, nodes, status: once per step
    ops.event(step, "learner_restart", ...)
"""
from __future__ import annotations

import json
import logging
import time

import ray

from cluster.autoscale import RewardAutoscaler
from cluster.topology import ActorTable

log = logging.getLogger(__name__)


def alive_nodes() -> dict[str, str]:
    """The cluster's alive nodes: node id -> address."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


class Operations:
    def __init__(self, cfg, controller, learners, rollouts, reward_pool):
        self.cfg, self.controller = cfg, controller
        self.learners, self.rollouts, self.reward_pool = learners, rollouts, reward_pool
        self.autoscaler = (RewardAutoscaler(cfg.cluster.reward_autoscale)
                           if cfg.cluster.reward_autoscale.enabled else None)
        self.places: list = []       # the actors' rows (cluster/topology.py)
        self.actors = ActorTable()
        self.nodes = alive_nodes()   # alive Ray nodes: node id -> address
        self.events: list = []       # node lost, learner restarted, reward pool autoscaled...
        self.learner_restarts = 0

    def after_step(self, step: int, metrics: dict, state) -> dict:
        """Once after every GRPO step: the reward pool's autoscaler decides (its metrics are returned),
        lost or added nodes become events, and the live status is published."""
        out = self.autoscale_rewards(step, metrics)
        self.watch_nodes(step)
        self.publish(step, {**metrics, **out}, state)
        return out

    def apply_scaling(self, step: int) -> None:
        """Operators' requests due by ``step`` (python -m cluster.scale); only while no round is in flight."""
        requested = ray.get(self.controller.take_requests.remote(step), timeout=self.cfg.cluster.call_timeout_s)
        if not requested:
            return
        pool, rollouts = self.reward_pool, self.rollouts
        if requested.get("reward_workers", len(pool.workers)) != len(pool.workers):
            log.info("scaling reward workers %d -> %d", len(pool.workers), requested["reward_workers"])
            pool.resize(requested["reward_workers"])
        if requested.get("rollout_workers", len(rollouts.workers)) != len(rollouts.workers):
            log.info("scaling rollout workers %d -> %d", len(rollouts.workers), requested["rollout_workers"])
            rollouts.resize(requested["rollout_workers"])
        self.refresh_topology()

    def refresh_topology(self, wait_s: float = 0.0, pending=None) -> None:
        """The actors' rows, as far as they have answered (``wait_s``: wait for all), with queue depths:
        reward groups in flight per worker; rollout chunks in flight per worker (``pending``'s round)."""
        self.places = self.actors.refresh({"learner": self.learners.ranks, "rollout": self.rollouts.workers,
                                           "reward": [w.actor for w in self.reward_pool.workers]}, wait_s,
                                          replaced={**{w.actor: w.replaced for w in self.reward_pool.workers},
                                                    **{r: self.learner_restarts for r in self.learners.ranks}})
        chunks = [w for _, w in getattr(pending, "pending", {}).values()]
        queues = {"reward": [len(w.inflight) for w in self.reward_pool.workers],
                  "rollout": [sum(1 for w in chunks if w is worker) for worker in self.rollouts.workers]}
        for row in self.places:
            if row["role"] in queues and row["index"] < len(queues[row["role"]]):
                row["queue"] = queues[row["role"]][row["index"]]

    def publish(self, step: int, timings: dict, state) -> None:
        """The job's live state for ``python -m cluster.status``: actors, nodes, the last step's times,
        the autoscaler's last decision, recent events."""
        self.refresh_topology(pending=state.pending)
        decision = self.autoscaler.last if self.autoscaler else None
        self.controller.publish.remote({
            "step": step, "steps": self.cfg.train.steps, "phase": "grpo", "weight_version": state.version,
            "run": self.cfg.run_name, "mlflow_run_id": state.run_id, "topology": self.places,
            "nodes": [{"node_id": n, "address": a} for n, a in self.nodes.items()],
            "last_step": {k: v for k, v in timings.items() if k.startswith("time/")},
            "autoscale": None if decision is None else vars(decision), "events": self.events[-10:],
            "learner_restarts": self.learner_restarts})

    def event(self, step: int, kind: str, **details) -> None:
        """Logged, counted in MLflow (``cluster/<kind>``: how many so far, at this step) and kept in the
        run's ``events.jsonl`` artifact and in cluster.status."""
        import mlflow

        entry = {"step": step, "kind": kind, "time": time.time(), **details}
        self.events.append(entry)
        log.warning("event at step %d: %s %s", step, kind, details)
        if mlflow.active_run() is not None:
            mlflow.log_metric(f"cluster/{kind}", sum(e["kind"] == kind for e in self.events), step=step)
            mlflow.log_text("\n".join(json.dumps(e, default=str) for e in self.events) + "\n", "events.jsonl")

    def watch_nodes(self, step: int) -> None:
        """Ray nodes lost or added since the last look: an event each (with the actors last seen on a lost
        node; Ray restarts them elsewhere, the pools and rounds redo their work)."""
        alive = alive_nodes()
        for node, address in self.nodes.items():
            if node not in alive:
                on_it = [f"{r['role']} {r['index']}" for r in self.places if r.get("node_id") == node]
                self.event(step, "node_lost", node_id=node, address=address, actors=on_it)
        for node in alive.keys() - self.nodes.keys():
            self.event(step, "node_added", node_id=node, address=alive[node])
        self.nodes = alive

    def autoscale_rewards(self, step: int, metrics: dict) -> dict:
        """cluster.reward_autoscale: one decision from this step's reward tail (cluster/autoscale.py);
        the pool resized at once (groups in flight on a removed worker move). Returns its metrics."""
        if self.autoscaler is None or metrics.get("batch/skipped"):
            return {}
        pool = self.reward_pool
        d = self.autoscaler.decide(len(pool.workers), metrics["time/reward_tail"], metrics["time/step"],
                                   metrics["pool/queued_groups"], metrics["pool/idle_workers"])
        if d.change:
            self.event(step, "reward_autoscale", workers_from=len(pool.workers), workers_to=d.workers, reason=d.reason)
            pool.resize(d.workers)
        return {"autoscale/reward_workers": d.workers, "autoscale/change": d.change,
                "autoscale/tail_fraction": d.tail_fraction}

    def saved(self) -> dict:
        """What a checkpoint keeps of the operations: the reward pool's size and the autoscaler's state."""
        return {"reward_workers": len(self.reward_pool.workers),
                "autoscaler": self.autoscaler.state_dict() if self.autoscaler else None}

    def restore(self, saved: dict) -> None:
        """With the autoscaler on, a checkpoint's reward pool size and autoscaler state: a resumed job
        continues its decisions (off, the pool keeps cluster.reward_workers)."""
        if not saved or self.autoscaler is None or saved.get("autoscaler") is None:
            return
        if saved.get("reward_workers") and saved["reward_workers"] != len(self.reward_pool.workers):
            log.info("reward workers %d -> %d (the checkpoint's pool)", len(self.reward_pool.workers),
                     saved["reward_workers"])
            self.reward_pool.resize(saved["reward_workers"])
        self.autoscaler.load_state_dict(saved["autoscaler"])
