"""Weight sync, the driver's side: one interface over both paths (the contract: weight_sync/__init__.py).

    sync = make_weight_sync(cfg, parity_probe)          # RpcSync or CollectiveSync
    metrics = sync.push(learners, workers, version)     # every worker then holds ``version``
    sync.resync(worker)                                 # one restarted or added worker: the last version

A push first waits until every worker is free (``wait_idle``, bounded by cluster.call_timeout_s: an
off-policy round's generation); only then does cluster.sync_timeout_s start, so neither ``time/sync``
nor its deadline includes generation. Workers still busy then (hung), or that die or stop answering
during the push (``SyncFailure``), are named and restarted by Ray, and the push is made again, once.
``kept``: what a restarted or added worker is resynced from over RPC without waiting behind a learner
step. Parity (cluster.sync_parity_check): after every push and resync, learner rank 0's raw logprobs
of a fixed probe against what each worker serves.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.learners import LearnerLost
from cluster.placement import wait_until_alive
from weight_sync.buckets import layout

log = logging.getLogger(__name__)


class WeightChecksumError(RuntimeError):
    """A bucket arrived with other bytes than learner rank 0 sent."""


def sync_timeout(version: int, timeout_s: float, who: str = "a rollout worker or learner rank") -> TimeoutError:
    return TimeoutError(f"weight sync to version {version} did not finish within {timeout_s:.0f} s "
                        f"(cluster.sync_timeout_s): {who} is hung")


def last_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1][:300]


@dataclass
class SyncFailure(Exception):
    """What went wrong in one push attempt: workers that did not answer (hung), died, failed."""
    phase: str
    hung: list = field(default_factory=list)
    dead: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    cause: str = ""

    def message(self, workers: list, version: int, timeout_s: float) -> str:
        hung, dead, failed = ([workers.index(w) for w in ws] for ws in (self.hung, self.dead, self.failed))
        return (f"weight sync to version {version} ({self.phase}): rollout workers {hung} did not answer within "
                f"{timeout_s:.0f} s (cluster.sync_timeout_s: hung), {dead} died, {failed} failed"
                + (f"; {self.cause}" if self.cause else ""))


def drain(streams: list, deadline: float, too_slow: Exception) -> list:
    """The refs learner rank 0's stream yields (its buckets, in order), each waited for until ``deadline``;
    the other ranks' (empty: they only help gather under ZeRO-3) run to their end. A dead rank: LearnerLost."""
    refs = []
    for rank, stream in enumerate(streams):
        while (left := deadline - time.monotonic()) > 0:
            if not ray.wait([stream], timeout=left)[0]:
                continue
            try:
                ref = next(stream)
            except StopIteration:
                break
            except RayActorError as exc:
                raise LearnerLost(f"learner rank {rank} died streaming its weights: {type(exc).__name__}") from exc
            if rank == 0:
                refs.append(ref)
            else:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        else:
            raise too_slow
    return refs


def bucket_refs(learners, bucket_bytes: int, version: int, timeout_s: float) -> list:
    """Rank 0's weight buckets (lists of (HF name, tensor)) as object refs in Ray's object store, in
    order, within ``timeout_s`` (cluster.sync_timeout_s)."""
    return drain([r.weight_buckets.options(num_returns="streaming").remote(bucket_bytes) for r in learners.ranks],
                 time.monotonic() + timeout_s, sync_timeout(version, timeout_s))


def wait_idle(workers: list, timeout_s: float, pump=None) -> list:
    """Waits until every worker is free (a call queued behind it returns), calling ``pump`` meanwhile (an
    off-policy round's finished chunks go on to the reward pool); the workers still busy after ``timeout_s``."""
    refs = {w.__ray_ready__.remote(): w for w in workers}
    deadline = time.monotonic() + timeout_s
    waiting = list(refs)
    while waiting and time.monotonic() < deadline:
        _, waiting = ray.wait(waiting, num_returns=len(waiting),
                              timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        if pump is not None:
            pump()
    return [refs[r] for r in waiting]


def push_weights(workers: list, refs: list, version: int, timeout_s: float) -> int:
    """Every bucket to every worker's ``load_weights``, then ``commit_weights(version)`` on each, reported
    versions checked; returns the bytes loaded per worker. Workers found dead: a SyncFailure (the others
    still commit); no answer within ``timeout_s`` (cluster.sync_timeout_s): TimeoutError."""
    deadline = time.monotonic() + timeout_s

    def get(pending):
        try:
            return ray.get(pending, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError as exc:
            raise sync_timeout(version, timeout_s) from exc

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
    if dead:
        raise SyncFailure("rpc", dead=dead)
    return n_bytes


class WeightSync(abc.ABC):
    """What both paths share: the wait for free workers, the retry after a failure, resync over RPC, parity."""

    def __init__(self, cfg, parity_probe: dict | None = None):
        self.cfg, self.parity_probe = cfg, parity_probe
        self.kept: tuple[int, list | None] | None = None  # (version, its bucket refs or None) of the last push
        self.learners = None  # of the last push: resync's source when no buckets are kept
        self.reference: list[float] | None = None  # the learner's probe logprobs at the last push

    def push(self, learners, workers: list, version: int, pump=None) -> dict:
        """``version`` to every worker once all are free (``pump``: called meanwhile); the sync's metrics."""
        c = self.cfg.cluster
        self.learners = learners
        reference = None
        if self.parity_probe is not None:
            reference = learners.logprobs([self.parity_probe["sequence"]], sampled=False)[0]
        t0 = time.perf_counter()
        hung = wait_idle(workers, c.call_timeout_s, pump)
        if hung:
            log.error("weight sync to version %d: rollout workers %s still busy after %.0f s (cluster.call_timeout_s: "
                      "hung); restarting them", version, [workers.index(w) for w in hung], c.call_timeout_s)
            self._restart(hung)
        wait_s = time.perf_counter() - t0
        n_bytes, rebuilds, restarted = self._retry(workers, version, lambda: self._attempt(learners, workers, version))
        dt = time.perf_counter() - t0 - wait_s
        self.reference = reference
        metrics = {"time/sync": dt, "time/sync_wait": wait_s, "sync/bytes": n_bytes,
                   "sync/gbps": n_bytes / max(dt, 1e-9) / 1e9, "sync/worker_restarts": restarted + len(hung)}
        if rebuilds is not None:
            metrics["sync/group_rebuilds"] = rebuilds
        if reference is not None:
            metrics["sync/parity_max_diff"] = self._check_parity(workers)
        return metrics

    def _check_parity(self, workers: list) -> float:
        """Max |learner - vLLM| logprob over the probe on every worker; RuntimeError above the tolerance
        (stale or misnamed weights, a cache that was not reset; a healthy fp32 sync on CPU differs by
        ~2e-6). vLLM's prompt logprobs are the raw model's, whatever the sampling settings."""
        c, probe = self.cfg.cluster, self.parity_probe
        prompt = {"problem": probe["problem"], "image": probe["image"]}
        served = ray.get([w.probe_logprobs.remote(prompt, probe["response_ids"]) for w in workers],
                         timeout=c.call_timeout_s)
        diffs = [max(abs(a - b) for a, b in zip(self.reference, got)) for got in served]
        if diffs and max(diffs) > c.sync_parity_tolerance:
            raise RuntimeError(f"weight sync parity check failed: max |learner - vLLM| logprob per worker {diffs} "
                               f"> cluster.sync_parity_tolerance={c.sync_parity_tolerance}")
        return max(diffs, default=0.0)

    @abc.abstractmethod
    def _attempt(self, learners, workers: list, version: int) -> tuple[int, int | None]:
        """One push to free workers: (bytes per worker, groups built); SyncFailure when some hang or die."""

    def _retry(self, workers: list, version: int, attempt) -> tuple:
        """(*attempt(), workers restarted); after a SyncFailure, once more with the hung and dead restarted."""
        restarted = 0
        for again in (False, True):
            try:
                return *attempt(), restarted
            except SyncFailure as failure:
                message = failure.message(workers, version, self.cfg.cluster.sync_timeout_s)
                if again:
                    raise RuntimeError(message + "; gave up after restarting and sending again once") from None
                log.error("%s; restarting the hung and dead workers and sending again", message)
                self._restart(failure.hung, failure.dead)
                restarted = len(failure.hung) + len(failure.dead)

    def _restart(self, hung: list, dead: list = ()) -> None:
        """Kills the hung workers (Ray restarts them with a fresh engine); waits for them and the dead ones."""
        for worker in hung:
            ray.kill(worker, no_restart=False)
        deadline = time.monotonic() + self.cfg.cluster.startup_timeout_s
        for worker in [*hung, *dead]:
            wait_until_alive(worker, deadline, "cluster.startup_timeout_s")

    def resync(self, worker) -> None:
        """The last pushed version to one restarted or added worker over RPC, parity-checked: from the kept
        buckets, or (none kept: synchronous collective, the learner is idle and holds exactly that
        version) from the learner. Nothing to do before the first push (a fresh engine holds version 0)."""
        if self.kept is None:
            return
        version, refs = self.kept
        c = self.cfg.cluster
        if refs is None:
            refs = bucket_refs(self.learners, c.sync_bucket_mb << 20, version, c.sync_timeout_s)
        self._retry([worker], version, lambda: (push_weights([worker], refs, version, c.sync_timeout_s), None))
        if self.reference is not None:
            self._check_parity([worker])


class RpcSync(WeightSync):
    """Learner rank 0 streams its buckets into Ray's object store (under ZeRO-3 every rank helps gather
    each bucket), each put once and loaded by every worker (``push_weights``); kept: those refs."""

    def _attempt(self, learners, workers: list, version: int) -> tuple[int, None]:
        c = self.cfg.cluster
        self.kept = (version, bucket_refs(learners, c.sync_bucket_mb << 20, version, c.sync_timeout_s))
        return push_weights(workers, self.kept[1], version, c.sync_timeout_s), None


class CollectiveSync(WeightSync):
    """(1) membership: each worker's group epoch; (2) a new group (next epoch) when the members changed (a
    restart, scaling, a restarted learner group); (3) the broadcast, the sender's and every receiving
    process's bucket checksums compared (``WeightChecksumError``). Collective operations time out after
    half of sync_timeout_s, so the members blocked behind a hung peer fail first and only the hung worker
    stays silent. Kept: off-policy, the buckets rank 0 put as it sent; synchronous, none (the idle learner
    serves a resync)."""

    def __init__(self, cfg, parity_probe: dict | None = None):
        super().__init__(cfg, parity_probe)
        self.members: list = []  # the workers the current group was built for, in rank order
        self.sender = None       # and its learner rank 0 (a restarted learner group needs a new group)
        self.epoch = 0
        self.plan: list | None = None

    def _attempt(self, learners, workers: list, version: int) -> tuple[int, int]:
        c = self.cfg.cluster
        deadline = time.monotonic() + c.sync_timeout_s
        epochs = self._answers(workers, [w.weight_group_epoch.remote() for w in workers], deadline, "membership")
        built = self.members != workers or self.sender is not learners.ranks[0] or any(e != self.epoch for e in epochs)
        if built:
            self._build_group(learners, workers, deadline)
        bucket_bytes, keep = c.sync_bucket_mb << 20, self.cfg.rollout.off_policy
        if self.plan is None:
            self.plan = ray.get(learners.ranks[0].weight_plan.remote(bucket_bytes), timeout=c.call_timeout_s)
        receives = [w.receive_weights.remote(self.plan, version) for w in workers]
        streams = [r.broadcast_weights.options(num_returns="streaming").remote(bucket_bytes, keep)
                   for r in learners.ranks]
        items, sent, cause = [], [], ""
        try:
            items = drain(streams, deadline, sync_timeout(version, c.sync_timeout_s, "learner rank 0"))
            sent = ray.get(items[::2] if keep else items, timeout=c.call_timeout_s)
        except RayTaskError as exc:  # the sender's collective failed: a receiver hung or died
            cause = f"learner rank 0: {last_line(exc)}"
        received = self._answers(workers, receives, deadline, "broadcast", cause=cause)
        self._compare_checksums(sent, received, version)
        self.kept = (version, items[1::2] if keep else None)
        n_bytes = sum(slot.nbytes for bucket in self.plan for slot in layout(bucket)[0])  # tensors, not padding
        return n_bytes, int(built)

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
        """Every worker's result, or a SyncFailure naming who did not answer by ``deadline`` (hung), died or
        raised, with the failure of ``sender`` (learner rank 0's call) as its cause; then a new group is due."""
        ray.wait(refs + ([sender] if sender else []), num_returns=len(refs) + bool(sender),
                 timeout=max(0.0, deadline - time.monotonic()))
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        results, failure = [], SyncFailure(phase, cause=cause)
        for worker, ref in zip(workers, refs):
            if ref not in ready:
                failure.hung.append(worker)
                continue
            try:
                results.append(ray.get(ref))
            except RayActorError:
                failure.dead.append(worker)
            except RayTaskError as exc:
                failure.failed.append(worker)
                failure.cause = failure.cause or last_line(exc)
        if sender is not None:
            try:
                ray.get(sender, timeout=max(0.0, deadline - time.monotonic()))
            except (RayTaskError, GetTimeoutError) as exc:
                failure.cause = failure.cause or f"learner rank 0: {last_line(exc)}"
        if failure.hung or failure.dead or failure.failed or failure.cause:
            self.members = []
            raise failure
        return results


def make_weight_sync(cfg, parity_probe: dict | None = None) -> WeightSync:
    return (CollectiveSync if cfg.rollout.weight_sync == "collective" else RpcSync)(cfg, parity_probe)
