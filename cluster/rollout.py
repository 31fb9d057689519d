"""One step's rollouts: prompts go out to the rollout actors in chunks, and every finished group goes
straight to the reward pool, so scoring overlaps generation.

``RolloutRound`` is one step's worth: ``start()`` dispatches, ``pump()`` hands finished groups to the
reward pool (call it while waiting on something else, e.g. the learner, in one-step off-policy mode),
``finish()`` waits for everything and returns rollouts + rewards. A rollout actor that dies mid-step is
restarted by Ray (max_restarts=-1); the round waits for it, has ``resync`` push the current weights to
it, and redoes its chunk with the same seed, so the step trains on exactly the samples it planned.
``stream=False`` (``rollout.stream_rewards=false``) is the plain synchronous loop that
benchmarks/pipelining.py compares against: no group is scored before all generation is done.
"""
from __future__ import annotations

import io
import logging
import time
from typing import Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from data.dataset import Sample

log = logging.getLogger(__name__)


def reward_group(sample: Sample, rollout: dict, model_size: int) -> dict:
    """The group dict the reward workers score (original-space image and mask, model-space solution)."""
    image = sample.image_bytes
    if not image:
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        image = buf.getvalue()
    return {"sample_id": sample.id, "image": image, "height": sample.height,
            "width": sample.width, "model_size": model_size, "solution": sample.solution(model_size),
            "mask": sample.mask_rle, "responses": [r["text"] for r in rollout["responses"]]}


class RolloutRound:
    """G answers for each of ``samples``, scored by ``reward_pool`` as each chunk of prompts finishes.

    Chunks of ``chunk_size`` prompts go round-robin to ``workers``; chunk i is sampled with seed
    ``seed + i`` (None: the engine's running generator), so a redone or resumed chunk draws the same
    answers. ``resync(worker)`` must bring a restarted worker to the current weights; answers made with
    weights older than ``weight_version`` (a worker that restarted between steps comes back with the
    initial weights) are redone after a resync. ``stream=False`` submits no group before every chunk is in.
    """

    def __init__(self, workers: list, reward_pool, samples: list[Sample], group_size: int, model_size: int,
                 chunk_size: int, timeout_s: float, seed: int | None = None,
                 resync: Callable[[object], None] | None = None, weight_version: int = 0, max_redos: int = 3,
                 stream: bool = True):
        self.workers, self.reward_pool, self.samples = workers, reward_pool, samples
        self.group_size, self.model_size, self.timeout_s, self.seed = group_size, model_size, timeout_s, seed
        self.resync, self.max_redos, self.weight_version = resync, max_redos, weight_version
        self.stream = stream
        self.chunks = [samples[i:i + chunk_size] for i in range(0, len(samples), chunk_size)]
        self.by_id = {s.id: s for s in samples}
        self.pending: dict = {}  # ObjectRef -> (chunk index, worker)
        self.rollouts: dict[str, dict] = {}
        self.redos = 0
        self.t_start = self.t_generated = None

    def start(self) -> "RolloutRound":
        self.t_start = time.perf_counter()
        self.deadline = time.monotonic() + self.timeout_s
        for i in range(len(self.chunks)):
            self._dispatch(i, self.workers[i % len(self.workers)])
        return self

    def _dispatch(self, i: int, worker) -> None:
        prompts = [{"sample_id": s.id, "problem": s.problem, "image": s.model_image(self.model_size)}
                   for s in self.chunks[i]]
        seed = None if self.seed is None else self.seed + i
        self.pending[worker.generate.remote(prompts, self.group_size, seed=seed)] = (i, worker)

    def pump(self, timeout_s: float = 0.0) -> bool:
        """Takes in finished chunks (waiting up to timeout_s for the first); True when all are in."""
        if not self.pending:
            return True
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout_s)
        for ref in done:
            i, worker = self.pending.pop(ref)
            try:
                outs = ray.get(ref)
            except RayTaskError:
                raise
            except RayActorError as exc:
                self._redo(i, worker, f"died during generation ({type(exc).__name__})")
                continue
            stale = [r["weight_version"] for r in outs if r["weight_version"] < self.weight_version]
            if stale:
                self._redo(i, worker, f"answered with weights v{stale[0]} < v{self.weight_version} (restarted)")
                continue
            for r in outs:
                self.rollouts[r["sample_id"]] = r
                if self.stream:
                    self._submit(r)
        if not self.pending and self.t_generated is None:
            self.t_generated = time.perf_counter()
            if not self.stream:  # all generated: only now does scoring start
                for r in self.rollouts.values():
                    self._submit(r)
        return not self.pending

    def _submit(self, rollout: dict) -> None:
        sample = self.by_id[rollout["sample_id"]]
        self.reward_pool.submit(sample.id, reward_group(sample, rollout, self.model_size))

    def _redo(self, i: int, worker, why: str) -> None:
        self.redos += 1
        if self.redos > self.max_redos:
            raise RuntimeError(f"rollout: gave up after {self.max_redos} worker failures in one step; last: {why}")
        log.warning("rollout actor %s; waiting for it, resyncing its weights, redoing its %d prompts",
                    why, len(self.chunks[i]))
        wait_until_alive(worker, self.deadline)
        if self.resync is not None:
            self.resync(worker)
        self._dispatch(i, worker)

    def finish(self) -> tuple[list[dict], dict, dict]:
        """(rollouts in sample order, rewards {sample_id: [per-answer dict]}, timings)."""
        while not self.pump(timeout_s=min(1.0, max(0.0, self.deadline - time.monotonic()))):
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"rollout: no answer from the rollout workers within {self.timeout_s:.0f} s "
                                   "(cluster.call_timeout_s)")
        rewards = self.reward_pool.collect([s.id for s in self.samples])
        t_end = time.perf_counter()
        timings = {"time/generate": self.t_generated - self.t_start, "time/reward_tail": t_end - self.t_generated,
                   "rollout/redone_chunks": self.redos}
        return [self.rollouts[s.id] for s in self.samples], rewards, timings


def wait_until_alive(actor, deadline: float) -> None:
    """Blocks until a (restarting) actor answers; Ray says "unavailable" while it restarts."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("rollout: a restarted rollout worker did not come back before the step's "
                               "deadline (cluster.call_timeout_s)")
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=left)
            return
        except (ActorUnavailableError, GetTimeoutError):
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
