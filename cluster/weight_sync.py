"""Weight sync, the driver's side: one interface over both paths (the contract: weight_sync/__init__.py).

    sync = make_weight_sync(cfg)                        # RpcSync or CollectiveSync
    result = sync.push(learners, workers, version)      # SyncResult; every worker then holds ``version``
    sync.resync(worker, learners)                       # one restarted or added worker: the last version

A push starts by waiting until every rollout worker is free (``wait_idle``: a call that queues behind an
off-policy round's generation, bounded by cluster.call_timeout_s, the generation's own bound); only
then does cluster.sync_timeout_s start, so ``time/sync`` and the sync's deadline never include
generation. A worker still busy at the end of the call timeout is hung: it is named, killed and
restarted by Ray (a fresh engine with version 0), and synced with the others.

- ``RpcSync`` (``rollout.weight_sync=rpc``): learner rank 0 streams its buckets into Ray's object store
  (``bucket_refs``; under ZeRO-3 every rank helps gather each bucket), each bucket put ONCE and loaded
  by every worker (``push_weights``: one update session per worker, then ``commit_weights(version)``,
  whose reported version is checked). A worker that dies meanwhile is waited for and pushed to again,
  once; the others commit what they loaded.
- ``CollectiveSync`` (``collective``): one broadcast group from learner rank 0 into every vLLM worker
  process, in three phases bounded by cluster.sync_timeout_s: (1) membership: each worker's group
  epoch; (2) a new group (next epoch) when the members changed (a restart, scaling, a restarted learner
  group): learner rank 0 serves a fresh store, every member joins at once; (3) the broadcast, the
  sender's and every receiving process's bucket checksums compared (``WeightChecksumError``). Inside
  the collective each operation times out after half of sync_timeout_s, so the members blocked behind
  a hung peer fail well before the driver's deadline and only the hung worker stays silent: it is
  named, restarted, the group rebuilt and the update sent again (once).

Both keep what a restarted or added worker needs (``resync``), so that it never waits behind a
learner step: RPC's bucket refs, and on the collective path one-step off-policy the same buckets,
put in the object store by learner rank 0 as it sends them; synchronous, the learner is idle and
serves them. A worker joins the broadcast group at the next push.

Parity (``cluster.sync_parity_check``, ``check_parity``): after a sync, learner rank 0's logprobs of a
fixed probe are compared with what each worker serves (cluster/rollout.py).
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from cluster.learners import LearnerLost
from weight_sync.buckets import layout

log = logging.getLogger(__name__)


class SyncTimeout(TimeoutError):
    pass


class WeightChecksumError(RuntimeError):
    """A bucket arrived with other bytes than learner rank 0 sent."""


def sync_timeout(version: int, timeout_s: float, who: str = "a rollout worker or learner rank") -> SyncTimeout:
    return SyncTimeout(f"weight sync to version {version} did not finish within {timeout_s:.0f} s "
                       f"(cluster.sync_timeout_s): {who} is hung")


@dataclass
class SyncResult:
    n_bytes: int            # tensor bytes each worker received
    restarted: int          # workers restarted (hung or dead) during this sync
    wait_s: float           # waiting for the workers to be free (not sync time)
    rebuilds: int | None = None  # collective: groups built by the attempt that succeeded (0 or 1)


def stream_refs(stream, deadline: float, too_slow: Exception):
    """Object refs of a streaming actor generator (a learner rank's buckets), each waited for until
    ``deadline``; a rank that dies is a LearnerLost."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise too_slow
        if not ray.wait([stream], timeout=left)[0]:
            continue
        try:
            yield next(stream)
        except StopIteration:
            return
        except RayActorError as exc:
            raise LearnerLost(f"a learner rank died while streaming its weights: {type(exc).__name__}") from exc


def bucket_refs(learners, bucket_bytes: int, deadline: float, too_slow: Exception) -> list:
    """Rank 0's weight buckets (lists of (HF name, tensor)) as object refs in Ray's object store, in
    order. Collective: under ZeRO-3 every rank helps gather each bucket, so the other ranks' (empty)
    streams are drained too. Raises ``too_slow`` when ``deadline`` passes."""
    streams = [r.weight_buckets.options(num_returns="streaming").remote(bucket_bytes) for r in learners.ranks]
    refs = list(stream_refs(streams[0], deadline, too_slow))
    for other in streams[1:]:
        for ref in stream_refs(other, deadline, too_slow):
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
    return refs


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


def wait_idle(workers: list, timeout_s: float, pump=None) -> list:
    """Waits until every worker has finished what it was doing (a call queued behind it), calling
    ``pump`` meanwhile (an off-policy round's finished chunks go on to the reward pool); returns the
    workers still busy after ``timeout_s`` (a dead worker counts as free: the push handles it)."""
    refs = {w.__ray_ready__.remote(): w for w in workers}
    deadline = time.monotonic() + timeout_s
    waiting = list(refs)
    while waiting and time.monotonic() < deadline:
        _, waiting = ray.wait(waiting, num_returns=len(waiting),
                              timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        if pump is not None:
            pump()
    return [refs[r] for r in waiting]


def push_weights(workers: list, refs: list, version: int, deadline: float, too_slow: Exception) -> tuple[int, list]:
    """Every bucket to every worker's ``load_weights``, then ``commit_weights(version)`` on each; checks
    the versions they report. Returns (bytes loaded per worker, the workers found dead). A dead worker
    does not stop the others: they commit; the caller waits for the dead ones to restart (a fresh
    engine, a fresh update session) and pushes to them alone. Raises ``too_slow`` at ``deadline``."""
    def get(pending):
        try:
            return ray.get(pending, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError as exc:
            raise too_slow from exc

    loads = [[w.load_weights.remote(ref) for ref in refs] for w in workers]
    alive, dead, n_bytes = [], [], 0
    for worker, pending in zip(workers, loads):
        try:
            n_bytes = sum(get(pending))
            alive.append(worker)
        except RayActorError:
            dead.append(worker)
    for worker, ref in [(w, w.commit_weights.remote(version)) for w in alive]:
        try:
            reported = get(ref)
        except RayActorError:
            dead.append(worker)
            continue
        if reported != version:
            raise RuntimeError(f"weight sync: rollout workers [{workers.index(worker)}] report versions [{reported}], "
                               f"expected {version}")
    return n_bytes, dead


def check_parity(workers: list, probe: dict, reference: list[float], tolerance: float, timeout_s: float) -> float:
    """Max |learner - vLLM| logprob over the probe on every worker; RuntimeError above ``tolerance``
    (stale or misnamed weights, a cache that was not reset). A healthy fp32 sync on CPU differs by ~2e-6.

    probe: {"problem", "image" (model size), "response_ids"}; reference: the learner's raw logprobs of
    the probe (vLLM's prompt logprobs are the raw model's, whatever the sampling settings)."""
    prompt = {"problem": probe["problem"], "image": probe["image"]}
    served = ray.get([w.probe_logprobs.remote(prompt, probe["response_ids"]) for w in workers], timeout=timeout_s)
    diffs = [max(abs(a - b) for a, b in zip(reference, got)) for got in served]
    if diffs and max(diffs) > tolerance:
        raise RuntimeError(f"weight sync parity check failed: max |learner - vLLM| logprob per worker {diffs} "
                           f"> cluster.sync_parity_tolerance={tolerance}")
    return max(diffs, default=0.0)


class WeightSync(abc.ABC):
    """What both paths share: the wait for free workers, and resync over RPC from the kept buckets."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.kept: tuple[int, list | None] | None = None  # (version, its bucket refs or None) of the last push

    def push(self, learners, workers: list, version: int, pump=None) -> SyncResult:
        c = self.cfg.cluster
        t0 = time.perf_counter()
        hung = wait_idle(workers, c.call_timeout_s, pump)
        if hung:
            log.error("weight sync to version %d: rollout workers %s still busy after %.0f s (cluster.call_timeout_s: "
                      "hung); restarting them", version, [workers.index(w) for w in hung], c.call_timeout_s)
            self._restart(hung)
        wait_s = time.perf_counter() - t0
        n_bytes, restarted, rebuilds = self._push(learners, workers, version)
        return SyncResult(n_bytes, restarted + len(hung), wait_s, rebuilds)

    @abc.abstractmethod
    def _push(self, learners, workers: list, version: int) -> tuple[int, int, int | None]:
        """The path's own push to free workers: (bytes per worker, workers restarted, groups built)."""

    def _restart(self, workers: list) -> None:
        for worker in workers:
            ray.kill(worker, no_restart=False)  # Ray restarts it (max_restarts=-1) with a fresh engine
        deadline = time.monotonic() + self.cfg.cluster.startup_timeout_s
        for worker in workers:
            wait_until_alive(worker, deadline)

    def resync(self, worker, learners) -> None:
        """The last pushed version to one restarted or added worker over RPC: from the kept buckets, or
        (none kept: synchronous collective, the learner is idle and holds exactly that version) from the
        learner. Nothing to do before the first push (a fresh engine holds version 0)."""
        if self.kept is None:
            return
        version, refs = self.kept
        c = self.cfg.cluster
        deadline, too_slow = time.monotonic() + c.sync_timeout_s, sync_timeout(version, c.sync_timeout_s)
        if refs is None:
            refs = bucket_refs(learners, c.sync_bucket_mb << 20, deadline, too_slow)
        self._push_rpc([worker], refs, version, deadline, too_slow)

    def _push_rpc(self, workers: list, refs: list, version: int, deadline: float,
                  too_slow: Exception) -> tuple[int, int]:
        """push_weights; workers found dead are waited for (Ray restarts them with the initial weights) and
        pushed to again, once. Returns (bytes per worker, workers pushed to again)."""
        n_bytes, dead = push_weights(workers, refs, version, deadline, too_slow)
        if not dead:
            return n_bytes, 0
        log.warning("weight sync: %d rollout worker(s) died; waiting for their restart, then pushing again", len(dead))
        for w in dead:
            wait_until_alive(w, time.monotonic() + self.cfg.cluster.startup_timeout_s)
        n_again, still_dead = push_weights(dead, refs, version, deadline, too_slow)
        if still_dead:
            raise RuntimeError(f"weight sync: {len(still_dead)} rollout worker(s) died again while being resynced")
        return max(n_bytes, n_again), len(dead)


class RpcSync(WeightSync):
    def _push(self, learners, workers: list, version: int) -> tuple[int, int, None]:
        c = self.cfg.cluster
        deadline, too_slow = time.monotonic() + c.sync_timeout_s, sync_timeout(version, c.sync_timeout_s)
        refs = bucket_refs(learners, c.sync_bucket_mb << 20, deadline, too_slow)
        self.kept = (version, refs)
        n_bytes, restarted = self._push_rpc(workers, refs, version, deadline, too_slow)
        return n_bytes, restarted, None


@dataclass
class SyncFailure(Exception):
    """What went wrong in one collective attempt: workers that did not answer (hung), died, failed."""
    phase: str
    hung: list = field(default_factory=list)
    dead: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    cause: str = ""


class CollectiveSync(WeightSync):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.members: list = []  # the workers the current group was built for, in rank order
        self.sender = None       # and its learner rank 0 (a restarted learner group needs a new group)
        self.epoch = 0
        self.plan: list | None = None

    def _push(self, learners, workers: list, version: int) -> tuple[int, int, int]:
        restarted = 0
        for attempt in range(2):
            try:
                n_bytes, refs, built = self._attempt(learners, workers, version)
                self.kept = (version, refs)
                return n_bytes, restarted, built
            except SyncFailure as failure:
                self.members = []  # whatever happened, the next attempt builds a new group
                names = [[workers.index(w) for w in ws] for ws in (failure.hung, failure.dead, failure.failed)]
                message = (f"weight sync to version {version} ({failure.phase}): rollout workers {names[0]} did not "
                           f"answer within {self.cfg.cluster.sync_timeout_s:.0f} s (cluster.sync_timeout_s: hung), "
                           f"{names[1]} died, {names[2]} failed" + (f"; {failure.cause}" if failure.cause else ""))
                if attempt == 1:
                    raise RuntimeError(message + "; gave up after restarting and sending again once") from None
                log.error("%s; restarting the hung and dead workers and sending again", message)
                self._restart(failure.hung + failure.dead)
                restarted += len(failure.hung) + len(failure.dead)
        raise AssertionError("unreachable")

    def _attempt(self, learners, workers: list, version: int) -> tuple[int, list | None, int]:
        c = self.cfg.cluster
        deadline = time.monotonic() + c.sync_timeout_s
        epochs = self._answers(workers, [w.weight_group_epoch.remote() for w in workers], deadline, "membership")
        built = 0
        if self.members != workers or self.sender is not learners.ranks[0] or any(e != self.epoch for e in epochs):
            self._build_group(learners, workers, deadline)
            built = 1
        bucket_bytes, keep = c.sync_bucket_mb << 20, self.cfg.rollout.off_policy
        if self.plan is None:
            self.plan = ray.get(learners.ranks[0].weight_plan.remote(bucket_bytes), timeout=c.call_timeout_s)
        receives = [w.receive_weights.remote(self.plan, version) for w in workers]
        streams = [r.broadcast_weights.options(num_returns="streaming").remote(bucket_bytes, keep)
                   for r in learners.ranks]
        too_slow = sync_timeout(version, c.sync_timeout_s, "learner rank 0")
        items, sent, cause = [], [], ""
        try:
            items = list(stream_refs(streams[0], deadline, too_slow))
            sent = ray.get(items[::2] if keep else items, timeout=c.call_timeout_s)
            for other in streams[1:]:
                for ref in stream_refs(other, deadline, too_slow):
                    ray.get(ref)
        except RayTaskError as exc:  # the sender's collective failed: a receiver hung or died
            cause = f"learner rank 0: {str(exc).strip().splitlines()[-1][:300]}"
        received = self._answers(workers, receives, deadline, "broadcast", cause=cause)
        self._compare_checksums(sent, received, version)
        n_bytes = sum(slot.nbytes for bucket in self.plan for slot in layout(bucket)[0])  # tensors, not padding
        return n_bytes, (items[1::2] if keep else None), built

    def _build_group(self, learners, workers: list, deadline: float) -> None:
        c, tp = self.cfg.cluster, self.cfg.rollout.tensor_parallel_size
        self.epoch += 1
        world, rank0 = 1 + len(workers) * tp, learners.ranks[0]
        address, port = ray.get(rank0.weight_group_address.remote(), timeout=c.call_timeout_s)
        op_timeout = c.sync_timeout_s / 2
        sender = rank0.join_weight_group.remote(address, port, world, op_timeout, self.epoch)
        joins = [w.join_weight_group.remote(address, port, 1 + i * tp, world, op_timeout, self.epoch)
                 for i, w in enumerate(workers)]
        self._answers(workers, joins, deadline, "building the group", sender=sender)
        self.members, self.sender = list(workers), rank0
        log.info("weight broadcast group %d: learner rank 0 + %d rollout worker(s), %d processes, %s:%d",
                 self.epoch, len(workers), world, address, port)

    def _compare_checksums(self, sent: list, received: list, version: int) -> None:
        for i, per_process in enumerate(received):
            for tp_rank, sums in enumerate(per_process):
                bad = [k for k, (a, b) in enumerate(zip(sent, sums, strict=True)) if a != b]
                if bad:
                    names = [name for name, _, _ in self.plan[bad[0]]]
                    raise WeightChecksumError(
                        f"weight sync to version {version}: rollout worker {i} (TP rank {tp_rank}) received buckets "
                        f"{bad} with checksums other than learner rank 0 sent (first: {names[:3]}...)")

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
            except (RayTaskError, GetTimeoutError) as exc:
                cause = cause or f"learner rank 0: {str(exc).strip().splitlines()[-1][:300]}"
        if hung or dead or failed or cause:
            raise SyncFailure(phase, hung, dead, failed, cause)
        return results


def make_weight_sync(cfg) -> WeightSync:
    return CollectiveSync(cfg) if cfg.rollout.weight_sync == "collective" else RpcSync(cfg)
