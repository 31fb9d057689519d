"""The reward pool sizing itself (``cluster.reward_autoscale``): one decision between steps.

The signal is the reward tail: the time from the last generated group to its reward, the part of a step
that scoring adds after generation. Each step the driver feeds the step's tail, the step's time, how many
groups waited behind another one on a busy worker (``queued``: more workers would have scored them at
once) and how many workers scored nothing (``idle``):

    up    tail > up_tail_fraction x step, and groups queued, and workers < max_workers     -> +1 worker
    down  workers > min_workers, and for each of the last cooldown_steps steps the tail was
          below down_tail_fraction x step or a worker scored nothing                        -> -1 worker
    else  hold; after a decision, the next one waits cooldown_steps steps

A tail that is long but with no queue (one group's scoring, however slow) is not helped by more workers,
so it does not scale up. A new worker is a resource request like any other: on a Ray cluster with an
autoscaler, a request no node can hold brings a node.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

from config import RewardAutoscaleConfig


@dataclass
class Decision:
    workers: int     # the pool size from now on
    change: int      # +1, -1 or 0
    reason: str
    tail_fraction: float


class RewardAutoscaler:
    def __init__(self, cfg: RewardAutoscaleConfig):
        self.cfg = cfg
        self.window: deque = deque(maxlen=cfg.cooldown_steps)  # per step: whether it could do with one fewer
        self.since_change = cfg.cooldown_steps  # steps since the last change (the first step may decide)
        self.last: Decision | None = None

    def decide(self, workers: int, tail_s: float, step_s: float, queued: int, idle: int) -> Decision:
        c = self.cfg
        fraction = tail_s / step_s if step_s > 0 else 0.0
        self.window.append(fraction < c.down_tail_fraction or idle > 0)
        self.since_change += 1
        change, reason = 0, f"hold: reward tail {fraction:.0%} of the step"
        if self.since_change <= c.cooldown_steps:
            reason = f"cooling down ({self.since_change}/{c.cooldown_steps} steps since the last change)"
        elif fraction > c.up_tail_fraction and queued and workers < c.max_workers:
            change, reason = 1, (f"reward tail {fraction:.0%} of the step > {c.up_tail_fraction:.0%}, "
                                 f"{queued} groups queued")
        elif workers > c.min_workers and len(self.window) == c.cooldown_steps and all(self.window):
            change, reason = -1, (f"reward tail below {c.down_tail_fraction:.0%} of the step or a worker idle "
                                  f"for {c.cooldown_steps} steps")
        elif fraction > c.up_tail_fraction and queued:
            reason = f"reward tail {fraction:.0%} of the step, at max_workers={c.max_workers}"
        workers += change
        if change:
            self.since_change = 0
            self.window.clear()
        self.last = Decision(workers, change, reason, fraction)
        return self.last

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the look-back window, steps since the last change, the last decision."""
        return {"window": list(self.window), "since_change": self.since_change,
                "last": None if self.last is None else asdict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.window = deque(state["window"], maxlen=self.cfg.cooldown_steps)
        self.since_change = state["since_change"]
        self.last = None if state["last"] is None else Decision(**state["last"])
