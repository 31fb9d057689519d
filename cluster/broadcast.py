"""WeightBroadcast: the driver's side of ``rollout.weight_sync=collective`` (the group: rollout/broadcast.py).

One sync (``sync``), in three phases, each bounded by ``cluster.sync_timeout_s``:

1. Barrier and membership. Every rollout worker is asked for its group epoch. The call queues behind
   whatever the worker is doing (an off-policy round's generation), so when all have answered, all
   are idle and no collective can wait on a busy peer. A worker that died is waited for (Ray
   restarts it); a restarted or new worker has no group (epoch None).
2. Group. If the workers are not exactly the group's members (a restart, a scale-up or -down since
   the last sync, or a restarted learner group), the group is built anew with the next epoch: learner
   rank 0 serves a fresh store on a free port, every member joins at once. Nothing waits on a removed
   worker: it is not a member.
3. Broadcast. The learner ranks stream the buckets (ZeRO-3: all ranks gather, rank 0 sends) while
   every worker receives them into one vLLM update session. Each bucket's checksum is compared
   between the sender and every receiving process (TP ranks included); a mismatch raises
   ``WeightChecksumError``.

A worker that does not answer within the timeout is hung: the error names it, the worker is killed
and restarted by Ray, the group is rebuilt and the whole update is sent again (once). Inside the
collective, each operation times out after half of ``sync_timeout_s``, so the members blocked
behind a hung peer fail (and answer) well before the driver's deadline, and only the hung worker is
left unanswered when it passes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayTaskError

from cluster.learners import _stream
from cluster.weight_sync import sync_timeout, wait_until_alive
from rollout.broadcast import layout

log = logging.getLogger(__name__)


class WeightChecksumError(RuntimeError):
    """A bucket arrived with other bytes than learner rank 0 sent."""


@dataclass
class SyncFailure(Exception):
    """What went wrong in one attempt: workers that did not answer (hung), that died, that failed."""
    phase: str
    hung: list = field(default_factory=list)
    dead: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    cause: str = ""


@dataclass
class BroadcastResult:
    n_bytes: int
    bucket_refs: list | None  # the buckets in Ray's object store (keep=True), else None
    restarted: int            # workers restarted after a hang or death during this sync
    rebuilds: int             # groups built by the attempt that succeeded (0 or 1)


class WeightBroadcast:
    def __init__(self, cfg):
        self.cfg = cfg
        self.members: list = []  # the workers the current group was built for, in rank order
        self.sender = None       # and its learner rank 0 (a restarted learner group needs a new group)
        self.epoch = 0
        self.plan: list | None = None

    def sync(self, learners, workers: list, version: int, keep: bool) -> BroadcastResult:
        """The learner's trainable weights, as ``version``, to every worker through the group."""
        restarted = 0
        for attempt in range(2):
            try:
                n_bytes, refs, built = self._attempt(learners, workers, version, keep)
                return BroadcastResult(n_bytes, refs, restarted, built)
            except SyncFailure as failure:
                self.members = []  # whatever happened, the next attempt builds a new group
                names = lambda ws: [workers.index(w) for w in ws]  # noqa: E731
                message = (f"weight sync to version {version} ({failure.phase}): rollout workers {names(failure.hung)} "
                           f"did not answer within {self.cfg.cluster.sync_timeout_s:.0f} s (cluster.sync_timeout_s: "
                           f"hung), {names(failure.dead)} died, {names(failure.failed)} failed"
                           + (f"; {failure.cause}" if failure.cause else ""))
                if attempt == 1:
                    raise RuntimeError(message + "; gave up after restarting and sending again once") from None
                log.error("%s; restarting the hung and dead workers and sending again", message)
                for worker in failure.hung:
                    ray.kill(worker, no_restart=False)  # Ray restarts it (max_restarts=-1) with a fresh engine
                deadline = time.monotonic() + self.cfg.cluster.startup_timeout_s
                for worker in failure.hung + failure.dead:
                    wait_until_alive(worker, deadline)
                restarted += len(failure.hung) + len(failure.dead)
        raise AssertionError("unreachable")

    def _attempt(self, learners, workers: list, version: int, keep: bool) -> tuple[int, list | None, int]:
        c, tp = self.cfg.cluster, self.cfg.rollout.tensor_parallel_size
        deadline = time.monotonic() + c.sync_timeout_s
        rank0 = learners.ranks[0]

        # 1. Barrier: every worker idle, and in which group.
        epochs = self._answers(workers, [w.weight_group_epoch.remote() for w in workers], deadline, "barrier")

        # 2. A new group when the members changed.
        built = 0
        if self.members != workers or self.sender is not rank0 or any(e != self.epoch for e in epochs):
            self.epoch += 1
            built = 1
            world = 1 + len(workers) * tp
            address, port = ray.get(rank0.weight_group_address.remote(), timeout=c.call_timeout_s)
            op_timeout = c.sync_timeout_s / 2
            sender = rank0.join_weight_group.remote(address, port, world, op_timeout, self.epoch)
            joins = [w.join_weight_group.remote(address, port, 1 + i * tp, world, op_timeout, self.epoch)
                     for i, w in enumerate(workers)]
            self._answers(workers, joins, deadline, "building the group", sender=sender)
            self.members, self.sender = list(workers), rank0
            log.info("weight broadcast group %d: learner rank 0 + %d rollout worker(s), %d processes, %s:%d",
                     self.epoch, len(workers), world, address, port)

        # 3. The broadcast, checksums compared.
        bucket_bytes = c.sync_bucket_mb << 20
        if self.plan is None:
            self.plan = ray.get(rank0.weight_plan.remote(bucket_bytes), timeout=c.call_timeout_s)
        receives = [w.receive_weights.remote(self.plan, version) for w in workers]
        streams = [r.broadcast_weights.options(num_returns="streaming").remote(bucket_bytes, keep)
                   for r in learners.ranks]
        too_slow = sync_timeout(version, c.sync_timeout_s, "learner rank 0")
        items, cause = [], ""
        try:
            items = list(_stream(streams[0], deadline, too_slow))
            sent = ray.get(items[::2] if keep else items, timeout=c.call_timeout_s)
            for other in streams[1:]:
                for ref in _stream(other, deadline, too_slow):
                    ray.get(ref)
        except RayTaskError as exc:  # the sender's collective failed: a receiver hung or died
            cause = f"learner rank 0: {str(exc).strip().splitlines()[-1][:300]}"
        received = self._answers(workers, receives, deadline, "broadcast", cause=cause)
        for i, per_process in enumerate(received):
            for tp_rank, sums in enumerate(per_process):
                bad = [k for k, (a, b) in enumerate(zip(sent, sums, strict=True)) if a != b]
                if bad:
                    names = [name for name, _, _ in self.plan[bad[0]]]
                    raise WeightChecksumError(
                        f"weight sync to version {version}: rollout worker {i} (TP rank {tp_rank}) received buckets "
                        f"{bad} with checksums other than learner rank 0 sent (first: {names[:3]}...)")
        n_bytes = sum(slot.nbytes for bucket in self.plan for slot in layout(bucket)[0])  # tensors, not padding
        return n_bytes, (items[1::2] if keep else None), built

    def _answers(self, workers: list, refs: list, deadline: float, phase: str, sender=None, cause: str = "") -> list:
        """Every worker's result, or SyncFailure naming who did not answer by ``deadline`` (hung), died or
        raised; the sender's failure (``sender``: learner rank 0's call) is included in the cause."""
        ray.wait(refs + ([sender] if sender else []), num_returns=len(refs) + bool(sender),
                 timeout=max(0.0, deadline - time.monotonic()))
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        results, hung, dead, failed = [], [], [], []
        for worker, ref in zip(workers, refs):
            if ref not in ready:
                hung.append(worker)
                continue
            try:
                results.append(ray.get(ref))
            except RayActorError:
                dead.append(worker)
            except RayTaskError as exc:
                failed.append(worker)
                cause = cause or str(exc).strip().splitlines()[-1][:300]
        if sender is not None:
            try:
                ray.get(sender, timeout=max(0.0, deadline - time.monotonic()))
            except (RayTaskError, ray.exceptions.GetTimeoutError) as exc:
                cause = cause or f"learner rank 0: {str(exc).strip().splitlines()[-1][:300]}"
        if hung or dead or failed or cause:
            raise SyncFailure(phase, hung, dead, failed, cause)
        return results
