"""LearnerGroup: the learner ranks (Ray actors of ``learner.Learner``) behind plain methods.

    learners = LearnerGroup(cfg, policy_path)           # R ranks in one placement group (PACK)
    metrics = learners.train_step(batch)                # a trajectory.LearnerBatch, sharded over ranks

Every Learner method is collective, so each call here goes to every rank at once (each with its shard)
and waits for all of them with the job's call timeout; every rank returns the same whole-batch
metrics. The batch is split by stride (sequence i to rank i mod R, ``LearnerBatch.shards``); the
learner normalises every micro-batch loss by the WHOLE batch's token and sequence counts, which every
shard carries. The weights leave through cluster/weight_sync.py.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.placement import PLACEMENT, actor_options, address_and_port, assigned_cuda_device
from config import Config
from trajectory import LearnerBatch, LearnerSequence

log = logging.getLogger(__name__)


class LearnerLost(RuntimeError):
    """A learner rank died (its process or node); the job can restart the group from a checkpoint."""


def get_all(refs: list, timeout_s: float) -> list:
    """ray.get of every rank's result, failing as soon as one rank dies: the others are then blocked in
    a collective with it and would only answer at the timeout."""
    deadline, waiting = time.monotonic() + timeout_s, list(refs)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise ray.exceptions.GetTimeoutError(f"learner ranks: no answer within {timeout_s:.0f} s "
                                                 "(cluster.call_timeout_s)")
        try:
            ray.get(done[0])
        except ray.exceptions.RayActorError as exc:
            raise LearnerLost(f"learner rank {refs.index(done[0])} died: {type(exc).__name__}") from exc
    return ray.get(refs)


class LearnerGroup:
    def __init__(self, cfg: Config, policy_path: str):
        """Starts one actor per rank in a placement group (bundle r = rank r); rank 0's node hosts the
        torch.distributed rendezvous. Returns at once: ``ready()`` waits for the constructors."""
        self.cfg, self.policy_path = cfg, policy_path
        self.timeout_s = cfg.cluster.call_timeout_s
        res, world = cfg.cluster.learner, cfg.cluster.learner_ranks
        bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {}), **res.resources}
        self.placement_group = placement_group([bundle] * world, strategy="PACK")
        ray.get(self.placement_group.ready(), timeout=cfg.cluster.startup_timeout_s)
        self._start_ranks()

    def _start_ranks(self) -> None:
        from learner.learner import Learner

        res, world = self.cfg.cluster.learner, self.cfg.cluster.learner_ranks
        in_bundle = lambda i: PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i)  # noqa: E731
        # After a node loss Ray re-places the group's bundles first.
        ray.get(self.placement_group.ready(), timeout=self.cfg.cluster.startup_timeout_s)
        addr, port = ray.get(address_and_port.options(scheduling_strategy=in_bundle(0)).remote(),
                             timeout=self.cfg.cluster.startup_timeout_s)
        remote_learner = ray.remote(Learner)
        device = assigned_cuda_device if res.num_gpus else None  # the GPU Ray gave the rank, not rank % count
        self.ranks = [remote_learner.options(**actor_options(res, scheduling_strategy=in_bundle(r)))
                      .remote(self.cfg, self.policy_path, rank=r, world_size=world, master_addr=addr, master_port=port,
                              device_index=device)
                      for r in range(world)]
        PLACEMENT.update({actor: (self.placement_group, r) for r, actor in enumerate(self.ranks)})

    def ready(self, attempts: int = 3) -> None:
        """Waits for the ranks' constructors. The rendezvous port is picked free and then bound by rank 0;
        another process can take it in between (two jobs starting at once): then the ranks start again on
        a new port, up to ``attempts`` times."""
        for attempt in range(attempts):
            try:
                ray.get([r.__ray_ready__.remote() for r in self.ranks], timeout=self.cfg.cluster.startup_timeout_s)
                return
            except ray.exceptions.RayActorError as exc:
                if "EADDRINUSE" not in str(exc) or attempt == attempts - 1:
                    raise
                log.warning("learner rendezvous port taken meanwhile (EADDRINUSE); restarting the ranks on another")
                self._kill_ranks()
                self._start_ranks()

    # -- collective calls -----------------------------------------------------------------------
    def _all(self, method: str, *args, shards: list | None = None) -> list:
        refs = [getattr(rank, method).remote(*((shards[r],) if shards else ()), *args)
                for r, rank in enumerate(self.ranks)]
        return get_all(refs, self.timeout_s)

    def train_step(self, batch: LearnerBatch, while_waiting: Callable[[], object] | None = None) -> dict:
        """One GRPO update over the whole batch; ``while_waiting`` is called repeatedly until the ranks
        are done (one-step off-policy: the next round's finished groups go to the reward pool)."""
        refs = [rank.train_step.remote(shard) for rank, shard in zip(self.ranks, batch.shards(len(self.ranks)))]
        deadline = time.monotonic() + self.timeout_s
        while while_waiting is not None and time.monotonic() < deadline:
            ready, running = ray.wait(refs, num_returns=len(refs), timeout=0.1)
            if not running:
                break
            get_all(ready, 1.0)  # a rank that died fails the step now, not at the timeout
            while_waiting()
        return get_all(refs, max(1.0, deadline - time.monotonic()))[0]

    def sft_step(self, batch: LearnerBatch) -> dict:
        """One supervised warm-start update (response tokens of the reference answers)."""
        return self._all("sft_step", shards=batch.shards(len(self.ranks)))[0]

    def logprobs(self, seqs: list[LearnerSequence], sampled: bool = True) -> list[list[float]]:
        """Per-token logprobs of ``seqs`` under the current policy, computed on rank 0."""
        return self._all("logprobs", sampled, shards=[seqs] + [[] for _ in self.ranks[1:]])[0]

    def export_hf(self, out_dir) -> None:
        self._all("export_hf", str(out_dir))

    def set_reference(self, policy_dir) -> None:
        self._all("set_reference", str(policy_dir))

    def save_checkpoint(self, ckpt_dir) -> None:
        self._all("save_checkpoint", str(ckpt_dir))

    def load_checkpoint(self, ckpt_dir) -> None:
        self._all("load_checkpoint", str(ckpt_dir))

    def lost(self, exc: Exception, wait_s: float = 30.0) -> LearnerLost | None:
        """Whether ``exc`` (from any call of the job) means a learner rank died: a LearnerLost, or any
        error while a rank is dead (a collective with a dead peer, a weight sync it no longer serves).
        Each rank is asked if it is up: a dead one answers with an error within ``wait_s`` (Ray's node
        health checks included); a live one busy in a collective does not answer and counts as alive."""
        if isinstance(exc, LearnerLost):
            return exc
        if not self.ranks:  # not started again (e.g. the placement group is not ready): not a rank's death
            return None
        refs = [rank.__ray_ready__.remote() for rank in self.ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        dead = []
        for r, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    dead.append(r)
        if not dead:
            return None
        lost = LearnerLost(f"learner rank(s) {dead} died ({type(exc).__name__}: {str(exc).strip()[:200]})")
        lost.__cause__ = exc
        return lost

    def restart(self) -> None:
        """Every rank killed and started afresh in the same placement group (Ray re-places its bundles
        when a node was lost), on a new rendezvous port; waits until they are up. Their state comes from
        a checkpoint next (``load_checkpoint``)."""
        self._kill_ranks()
        self._start_ranks()
        self.ready()

    def _kill_ranks(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
            PLACEMENT.pop(rank, None)
        self.ranks = []

    def shutdown(self) -> None:
        self._kill_ranks()
        remove_placement_group(self.placement_group)

