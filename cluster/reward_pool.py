"""RewardPool: N Ray actors of reward.worker.RewardWorker scoring groups as soon as they are submitted.

    pool = RewardPool(cfg.reward, num_workers=2, resources={"num_cpus": 1, "num_gpus": 0}, call_timeout_s=600)
    pool.submit(sample_id, group)          # dispatched at once to the least-loaded actor
    rewards = pool.collect(sample_ids)     # {sample_id: [trajectory.Reward]}, every group exactly once

Fault handling: an actor that dies (ray.kill, node loss, OOM), makes no progress for `call_timeout_s`
once up (hung: its queue's head has run that long), or is not up within `startup_timeout_s`, is
killed and replaced by a fresh actor,
and every group it still held is dispatched again. Results are keyed by group, and only the
reference of a group's latest dispatch counts, so each group appears in the result exactly once.
A group that fails `max_attempts` dispatches, or whose scoring raises inside the worker (a malformed
group, which a retry would not fix), raises a RuntimeError naming it.
Actors are started with max_restarts=-1 and max_task_retries=1: a crashed process is restarted by
Ray and its queued calls retried there; ray.kill(..., no_restart=True) surfaces as ActorDiedError.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayError, RayTaskError

from reward.worker import RewardWorker

logger = logging.getLogger(__name__)


@dataclass
class _Worker:
    actor: object
    ready: object  # ObjectRef of actor.__ray_ready__() until the constructor has finished, then None
    started: float
    inflight: dict = field(default_factory=dict)  # ObjectRef -> group key, in dispatch order
    last_progress: float = 0.0  # when its queue head started (last completion, going busy, or ready)
    groups: int = 0
    samples: int = 0
    replaced: int = 0  # how many actors this slot had before this one (dead or hung, replaced)


class RewardPool:
    def __init__(self, cfg, num_workers: int, resources: dict, call_timeout_s: float = 600.0,
                 startup_timeout_s: float = 600.0, max_attempts: int = 3):
        """cfg: config.RewardConfig; resources per actor: {"num_cpus", "num_gpus", optional "torch_threads"}
        (config.ClusterConfig.reward as a dict).
        The call timeout runs only once an actor is up (its constructor, e.g. loading SAM2, has
        `startup_timeout_s`)."""
        self.cfg = cfg
        self.call_timeout_s = call_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_attempts = max_attempts
        num_gpus = float(resources.get("num_gpus", 0))
        threads = resources.get("torch_threads")  # optional; else Ray's default OMP_NUM_THREADS = num_cpus
        self._actor_class = ray.remote(RewardWorker).options(
            num_cpus=float(resources.get("num_cpus", 1)), num_gpus=num_gpus,
            max_restarts=-1, max_task_retries=1, resources=dict(resources.get("resources") or {}),
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}} if threads else None)
        self._device = "cuda" if num_gpus > 0 else "cpu"
        self.workers: list[_Worker] = [self._start() for _ in range(num_workers)]
        self._groups: dict = {}  # key -> group, until collected
        self._attempts: dict = {}
        self._results: dict = {}  # key -> scores, until collected
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._queued = 0  # groups dispatched to a busy worker, since the last stats reset

    def _start(self) -> _Worker:
        actor = self._actor_class.remote(self.cfg, self._device)
        return _Worker(actor, actor.__ray_ready__.remote(), time.monotonic())

    # -- dispatch -------------------------------------------------------------------------------
    def submit(self, key, group: dict) -> None:
        """Start scoring `group` now on the least-loaded actor."""
        if key in self._groups:
            raise KeyError(f"group {key!r} was already submitted and not yet collected")
        self._groups[key] = group
        self._attempts[key] = 0
        self._dispatch(key)

    def _dispatch(self, key) -> None:
        self._attempts[key] += 1
        if self._attempts[key] > self.max_attempts:
            raise RuntimeError(f"reward group {key!r} failed {self.max_attempts} dispatches (workers died or hung)")
        # Started actors first: a new actor may wait for resources (or for the autoscaler) for long.
        started = [w for w in self.workers if w.ready is None or self._is_up(w)]
        worker = min(started or self.workers, key=lambda w: len(w.inflight))
        now = time.monotonic()
        if not worker.inflight:
            worker.last_progress = now
        else:
            self._queued += 1  # waits behind another group: one more worker would have scored it at once
        self._t_first = self._t_first or now
        worker.inflight[worker.actor.rewards.remote(self._groups[key])] = key

    # -- collection -----------------------------------------------------------------------------
    def collect(self, keys) -> dict:
        """Wait until every group in `keys` is scored; returns {key: [Reward per response]}."""
        keys = list(keys)
        unknown = [k for k in keys if k not in self._groups]
        if unknown:
            raise KeyError(f"groups never submitted (or already collected): {unknown[:5]}")
        while any(k not in self._results for k in keys):
            refs = [ref for w in self.workers for ref in w.inflight]
            if not refs:
                raise RuntimeError("reward pool: groups are missing but none is in flight")
            ready, _ = ray.wait(refs, num_returns=1, timeout=min(1.0, self.call_timeout_s))
            for ref in ready:
                self._finish(ref)
            self._replace_hung()
        out = {k: self._results.pop(k) for k in keys}
        for k in keys:
            del self._groups[k], self._attempts[k]
        return out

    def discard(self, keys) -> None:
        """Forgets groups that will never be collected (a dropped round); their results, still in flight,
        are ignored when they arrive."""
        keys = set(keys)
        for key in keys:
            self._groups.pop(key, None), self._attempts.pop(key, None), self._results.pop(key, None)
        for worker in self.workers:
            for ref in [ref for ref, key in worker.inflight.items() if key in keys]:
                del worker.inflight[ref]

    def discard_all(self) -> None:
        """Forgets every group submitted and not collected (the learner group restarted from a checkpoint:
        the rounds of the failed step, refills included, are dropped)."""
        self.discard(list(self._groups))

    def _owner(self, ref) -> _Worker | None:
        return next((w for w in self.workers if ref in w.inflight), None)

    def _finish(self, ref) -> None:
        worker = self._owner(ref)
        if worker is None:  # its actor was replaced while this result was in flight: already re-dispatched
            return
        try:
            scores = ray.get(ref)
        except RayTaskError as exc:
            key = worker.inflight.pop(ref)
            del self._groups[key], self._attempts[key]  # the pool stays usable for the other groups
            raise RuntimeError(f"scoring group {key!r} raised inside the reward worker") from exc
        except RayError as exc:  # the actor died, was killed, ran out of memory, lost its node...
            self._is_up(worker, timeout=1.0)  # raises if it never started
            logger.warning("reward actor died (%s); replacing it and re-scoring its %d groups",
                           type(exc).__name__, len(worker.inflight))
            self._replace(worker)
            return
        key = worker.inflight.pop(ref)
        worker.last_progress = self._t_last = time.monotonic()
        worker.groups += 1
        worker.samples += len(scores)
        self._results[key] = scores

    def _replace_hung(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            if worker.ready is not None and not self._is_up(worker):
                # still starting: the startup timeout applies, not the call timeout
                if now - worker.started > self.startup_timeout_s:
                    logger.warning("reward actor not up after %.0f s; replacing it", now - worker.started)
                    self._replace(worker)
                continue
            if worker.inflight and now - worker.last_progress > self.call_timeout_s:
                logger.warning("reward actor made no progress for %.0f s (cluster.call_timeout_s); replacing "
                               "it and re-scoring its %d groups", now - worker.last_progress, len(worker.inflight))
                self._replace(worker)

    def _is_up(self, worker: _Worker, timeout: float = 0.0) -> bool:
        """Whether the actor's constructor has finished; raises when it failed (a bad checkpoint path,
        say), which no replacement would fix."""
        if worker.ready is None:
            return True
        if not ray.wait([worker.ready], timeout=timeout)[0]:
            return False
        try:
            ray.get(worker.ready)
        except RayError as exc:
            raise RuntimeError("a reward worker failed to start (see the cause above)") from exc
        worker.ready, worker.last_progress = None, time.monotonic()
        return True

    def _replace(self, worker: _Worker) -> None:
        ray.kill(worker.actor, no_restart=True)
        fresh = self._start()
        fresh.groups, fresh.samples = worker.groups, worker.samples  # the slot keeps its history
        fresh.replaced = worker.replaced + 1
        self.workers[self.workers.index(worker)] = fresh
        for key in worker.inflight.values():
            self._dispatch(key)

    # -- scaling and metrics --------------------------------------------------------------------
    def resize(self, num_workers: int) -> None:
        """Grow or shrink to `num_workers` actors (between steps; groups held by removed actors move)."""
        if num_workers < 1:
            raise ValueError("a reward pool needs at least one worker")
        while len(self.workers) < num_workers:
            self.workers.append(self._start())
        while len(self.workers) > num_workers:
            worker = min(self.workers, key=lambda w: len(w.inflight))
            self.workers.remove(worker)
            ray.kill(worker.actor, no_restart=True)
            for key in worker.inflight.values():
                self._attempts[key] -= 1  # a move, not a failure
                self._dispatch(key)

    def stats(self, reset: bool = False) -> dict:
        """Per-worker groups/samples scored and in flight; pool throughput in samples/s since the first
        dispatch (or the last reset) to the last completion; groups that queued behind another on a busy
        worker, and started workers that scored nothing (the autoscaler's signals)."""
        elapsed = (self._t_last - self._t_first) if self._t_first and self._t_last else 0.0
        rate = lambda n: n / elapsed if elapsed > 0 else 0.0  # noqa: E731
        samples = sum(w.samples for w in self.workers)
        out = {"num_workers": len(self.workers), "groups": sum(w.groups for w in self.workers),
               "samples": samples, "samples_per_s": rate(samples), "queued_groups": self._queued,
               "idle_workers": sum(1 for w in self.workers if w.ready is None and not w.groups),
               "workers": [{"groups": w.groups, "samples": w.samples, "samples_per_s": rate(w.samples),
                            "inflight": len(w.inflight)} for w in self.workers]}
        if reset:
            for w in self.workers:
                w.groups = w.samples = 0
            self._t_first = self._t_last = None
            self._queued = 0
        return out

    def evaluate(self, samples: list, responses: list[str], tokens: list[int], model_size: int, overlays: int,
                 timeout_s: float) -> dict:
        """evaluation.run.evaluate_answers of held-out answers on the first reward actor, between steps: its
        CPUs and GPU share, and its segmenter (one is built for evaluation, once, when the reward has no
        mask term). Overlay PNGs come back as {file name: bytes}, so they reach the driver's node."""
        return ray.get(self.workers[0].actor.__ray_call__.remote(
            _evaluate_on_worker, self._device, samples, responses, tokens, model_size, overlays), timeout=timeout_s)

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker.actor, no_restart=True)
        self.workers = []


def _evaluate_on_worker(worker: RewardWorker, device: str, samples, responses, tokens, model_size, overlays) -> dict:
    """Runs inside a reward actor (``__ray_call__``): ``worker`` is its RewardWorker."""
    import tempfile
    from pathlib import Path

    from evaluation.run import evaluate_answers

    if worker.segmenter is None and getattr(worker, "evaluation_scorer", None) is None:
        worker.evaluation_scorer = RewardWorker(worker.cfg, device, segment=True)
    scorer = worker if worker.segmenter is not None else worker.evaluation_scorer
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate_answers(samples, responses, tokens, scorer, model_size, overlay_dir=tmp,
                                  max_overlays=overlays)
        result["overlays"] = {Path(path).name: Path(path).read_bytes() for path in result["overlays"]}
    return result
