"""RolloutGroup: the vLLM rollout actors behind plain methods; RolloutRound: one round of generation.

    rollouts = RolloutGroup(cfg, policy_path, reward_pool, count=2)
    round_ = rollouts.round(groups, seed=..., weight_version=v)   # dispatched at once
    groups, timings = round_.finish()      # answers in every group, rewards from the reward pool
    rollouts.sync_from(learners, version=v + 1)                   # after the learner's step
    rollouts.resize(3)                      # between rounds; new workers get the synced weights

A round schedules the rollout protocol (rollout/protocol.py): its chunks go round-robin over the
workers, and every finished group goes to the reward pool as soon as its chunk is generated (scoring
overlaps generation; ``rollout.stream_rewards`` false: nothing is scored before all chunks are in).
``pump()`` takes in finished chunks without blocking, which one-step off-policy calls while the
learner trains.

Failures: a rollout actor that dies is restarted by Ray (max_restarts=-1). A round waits for it,
resyncs it and redoes its chunk; answers made with weights older than the round's version (a worker
that restarted between rounds comes back with the initial weights) are redone the same way. Resync
uses what the last sync kept (cluster/weight_sync.py), never the busy learner, so it gives exactly the
version the round was started with.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from cluster.placement import PLACEMENT, free_placement, rollout_placement, wait_until_alive
from cluster.weight_sync import make_weight_sync
from config import Config
from data.dataset import Sample
from reward.worker import reward_group
from rollout import protocol
from trajectory import Group

log = logging.getLogger(__name__)


class RolloutGroup:
    def __init__(self, cfg: Config, policy_path: str, reward_pool, count: int, parity_probe: dict | None = None):
        """``count`` rollout actors (one vLLM engine each, placed by cluster.placement); returns at
        once, ``ready()`` waits for the engines. ``parity_probe``: see cluster/weight_sync.py."""
        self.cfg, self.policy_path, self.reward_pool = cfg, policy_path, reward_pool
        self.workers: list = []
        self.versions = {0}  # every weight version pushed; 0 = the weights each engine starts from
        self.sync = make_weight_sync(cfg, parity_probe)
        self._add(count)

    # -- actors -----------------------------------------------------------------------------------
    def _add(self, count: int) -> list:
        from rollout.worker import RolloutWorker

        remote_worker = ray.remote(RolloutWorker)
        new = []
        for _ in range(count):
            options, pg = rollout_placement(self.cfg)
            actor = (remote_worker.options(**options, max_restarts=-1, max_task_retries=0)
                     .remote(self.cfg, self.policy_path, seed=self.cfg.train.seed + len(self.workers)))
            if pg is not None:
                PLACEMENT[actor] = (pg, 0)
            self.workers.append(actor)
            new.append(actor)
        return new

    def ready(self, workers: list | None = None) -> None:
        ray.get([w.__ray_ready__.remote() for w in (workers or self.workers)],
                timeout=self.cfg.cluster.startup_timeout_s)

    def resize(self, count: int) -> None:
        """Grow (new workers get the synced weights before they generate) or shrink (actors killed,
        their placement groups freed). Only between rounds."""
        if count > len(self.workers):
            new = self._add(count - len(self.workers))
            self.ready(new)
            for worker in new:
                self.sync.resync(worker)
        while len(self.workers) > count:
            worker = self.workers.pop()
            ray.kill(worker, no_restart=True)
            free_placement(worker)

    def shutdown(self) -> None:
        self.resize(0)
        self.sync.kept = None

    def weight_versions(self) -> list:
        """Each worker's weight version (None for one that is restarting), for cluster.status."""
        refs = [w.__ray_call__.remote(lambda self: self.weight_version) for w in self.workers]
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=10))
            except (ray.exceptions.RayError, TimeoutError):
                out.append(None)
        return out

    # -- weights ----------------------------------------------------------------------------------
    def sync_from(self, learners, version: int, pump=None) -> dict:
        """The learner's current weights, as ``version``, to every worker (cluster/weight_sync.py), once
        every worker is free (``pump``: called meanwhile, the pending off-policy round's); its metrics."""
        self.versions.add(version)
        return self.sync.push(learners, self.workers, version, pump)

    # -- generation -------------------------------------------------------------------------------
    def round(self, groups: list[Group], seed: int | None, weight_version: int,
              metrics: dict | None = None) -> "RolloutRound":
        """G answers for every group, started now (see RolloutRound); ``metrics`` are returned with its timings."""
        r = self.cfg.rollout
        chunks = protocol.plan_chunks(groups, protocol.chunk_size(r.prompts_per_step, len(self.workers)), seed)
        return RolloutRound(self, groups, chunks, weight_version, self.cfg.cluster.call_timeout_s,
                            stream=r.stream_rewards, metrics=metrics).start()

    def generate_greedy(self, samples: list[Sample]) -> list[tuple[str, int]]:
        """(text, token count) of each sample's greedy answer, the samples spread over the workers."""
        size, n = self.cfg.model.image_size, len(self.workers)
        refs = [w.generate.remote([{"sample_id": str(i), "problem": s.problem, "image": s.model_image(size)}
                                   for i, s in enumerate(samples) if i % n == k], 1, greedy=True)
                for k, w in enumerate(self.workers)]
        by_index = {}
        for outs in ray.get(refs, timeout=self.cfg.cluster.call_timeout_s):
            for o in outs:
                answer = o["responses"][0] if o["responses"] else {"text": "", "token_ids": []}
                by_index[int(o["sample_id"])] = (answer["text"], len(answer["token_ids"]))
        return [by_index[i] for i in range(len(samples))]


class RolloutRound:
    """G answers for each group, scored by the reward pool as each chunk of prompts finishes.

    ``finish()`` returns (groups, timings) with every group's answers and rewards filled in; groups
    whose prompt could not be sampled keep ``answers == []`` and are not scored. It can be called again.
    """

    def __init__(self, rollouts: RolloutGroup, groups: list[Group], chunks: list[protocol.Chunk],
                 weight_version: int, timeout_s: float, stream: bool = True, max_redos: int = 3,
                 metrics: dict | None = None):
        self.rollouts, self.groups, self.chunks, self.weight_version = rollouts, groups, chunks, weight_version
        self.metrics = dict(metrics or {})
        self.timeout_s, self.stream, self.max_redos = timeout_s, stream, max_redos
        self.workers = list(rollouts.workers)
        self.by_uid = {g.uid: g for g in groups}
        self.pending: dict = {}  # ObjectRef -> (chunk, worker)
        self.submitted: list[str] = []  # uids given to the reward pool, in order
        self.redos = 0
        self.t_start = self.t_generated = None
        self._result: tuple[list[Group], dict] | None = None

    def start(self) -> "RolloutRound":
        self.t_start = time.perf_counter()
        self.deadline = time.monotonic() + self.timeout_s
        # the pools this round ran on (python -m cluster.scale changes them between rounds)
        self.metrics.update({"pool/rollout_workers": len(self.workers),
                             "pool/reward_workers": len(self.rollouts.reward_pool.workers)})
        for chunk in self.chunks:
            self._dispatch(chunk, self.workers[chunk.index % len(self.workers)])
        return self

    def _dispatch(self, chunk: protocol.Chunk, worker) -> None:
        cfg = self.rollouts.cfg
        ref = worker.generate.remote(protocol.requests(chunk.groups, cfg.model.image_size), cfg.rollout.group_size,
                                     seed=chunk.seed)
        self.pending[ref] = (chunk, worker)

    def pump(self, timeout_s: float = 0.0) -> bool:
        """Takes in finished chunks (waiting up to timeout_s for the first); True when all are in."""
        if not self.pending:
            return True
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout_s)
        for ref in done:
            chunk, worker = self.pending.pop(ref)
            try:
                outs = ray.get(ref)
            except RayTaskError:
                raise
            except RayActorError as exc:
                self._redo(chunk, worker, f"died during generation ({type(exc).__name__})")
                continue
            old = protocol.stale(outs, self.weight_version)
            if old:
                self._redo(chunk, worker, f"answered with weights v{old[0]} < v{self.weight_version} (restarted)")
                continue
            for out in outs:
                group = self.by_uid[out["sample_id"]]
                if protocol.take_answers(group, out) and self.stream:
                    self._submit(group)
        if not self.pending and self.t_generated is None:
            self.t_generated = time.perf_counter()
            if not self.stream:  # all generated: only now does scoring start
                for group in self.groups:
                    self._submit(group)
        return not self.pending

    def _submit(self, group: Group) -> None:
        if not group.answers:  # the prompt did not fit the context: nothing to score
            return
        cfg = self.rollouts.cfg
        self.rollouts.reward_pool.submit(group.uid, reward_group(
            group.sample, [a.text for a in group.answers], cfg.reward.rules, cfg.model.image_size, key=group.uid))
        self.submitted.append(group.uid)

    def _redo(self, chunk: protocol.Chunk, worker, why: str) -> None:
        self.redos += 1
        if self.redos > self.max_redos:
            raise RuntimeError(f"rollout: gave up after {self.max_redos} worker failures in one round; last: {why}")
        log.warning("rollout actor %s; waiting for it, resyncing its weights, redoing its %d prompts",
                    why, len(chunk.groups))
        wait_until_alive(worker, self.deadline)
        self.rollouts.sync.resync(worker)
        self._dispatch(chunk, worker)

    def abandon(self) -> None:
        """Drops the round, made with weights that became void (the learner group restarted from a
        checkpoint): generation still running is waited for (until the round's deadline; the next
        weight push would queue behind it) and ignored, and its groups leave the reward pool unscored."""
        ray.wait(list(self.pending), num_returns=len(self.pending), timeout=max(0.0, self.deadline - time.monotonic()))
        self.pending.clear()
        self.rollouts.reward_pool.discard(self.submitted)
        self.submitted = []

    def finish(self) -> tuple[list[Group], dict]:
        """Waits for every chunk and every group's rewards; (groups, timings). The reward tail is the
        time this waits for rewards after the last group was generated (off-policy the generation may
        have ended while the learner trained: the tail counts from here, not from then)."""
        if self._result is not None:
            return self._result
        t_finish = time.perf_counter()
        while not self.pump(timeout_s=min(1.0, max(0.0, self.deadline - time.monotonic()))):
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"rollout: no answer from the rollout workers within {self.timeout_s:.0f} s "
                                   "(cluster.call_timeout_s)")
        rewards = self.rollouts.reward_pool.collect(self.submitted)
        for uid, scores in rewards.items():
            self.by_uid[uid].rewards = scores
        timings = {**self.metrics, "time/generate": self.t_generated - self.t_start,
                   "time/reward_tail": time.perf_counter() - max(self.t_generated, t_finish),
                   "rollout/redone_chunks": self.redos}
        self._result = (self.groups, timings)
        return self._result


class CompletedRound:
    """A round whose answers and rewards are already in (a resumed one-step off-policy round)."""

    def __init__(self, groups: list[Group], timings: dict):
        self.groups, self.timings = groups, timings

    def pump(self, timeout_s: float = 0.0) -> bool:
        return True

    def finish(self) -> tuple[list[Group], dict]:
        return self.groups, self.timings
