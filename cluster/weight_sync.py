"""Weight sync through Ray's object store: learner rank 0's buckets reach every rollout worker.

Protocol (``push_weights``): rank 0 streams buckets of HF-named tensors (``LearnerGroup.weight_bucket_refs``;
under ZeRO-3 every rank helps gather each bucket); each bucket is put in the object store ONCE and
every rollout worker loads it (``RolloutWorker.load_weights``: one update session per push, each layer's
tensors once); then each worker drops its caches and reports the new version (``commit_weights``),
which is checked. A worker that dies meanwhile is pushed to again once Ray has restarted it; the
others commit what they loaded (a second push into a session would load a layer twice). The bucket refs are kept by the
rollout group until the next sync: a worker that restarts, or is added by scaling, is given the same
version from them without calling the learner (which may be busy with the next step), at the cost
of one copy of the synced weights in the object store. The other path, a broadcast from learner rank 0
into every vLLM worker process (rollout.weight_sync=collective), is cluster/broadcast.py.

Parity (``cluster.sync_parity_check``): after a sync, learner rank 0's logprobs of a fixed probe
(a held-out prompt and its reference answer) are compared with what each worker serves; the learner's
side is kept with the weights, so a resynced worker is checked against the same numbers.
"""
from __future__ import annotations

import time

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError


class SyncTimeout(TimeoutError):
    pass


def sync_timeout(version: int, timeout_s: float, who: str = "a rollout worker or learner rank") -> SyncTimeout:
    return SyncTimeout(f"weight sync to version {version} did not finish within {timeout_s:.0f} s "
                       f"(cluster.sync_timeout_s): {who} is hung")


def push_weights(workers: list, bucket_refs: list, version: int, deadline: float,
                 too_slow: Exception) -> tuple[int, list]:
    """Every bucket to every worker's ``load_weights``, then ``commit_weights(version)`` on each; checks
    the versions they report. Returns (bytes loaded per worker, the workers found dead). A dead worker
    (Ray's RayActorError) does not stop the others: they commit; the caller waits for the dead ones to
    restart (a fresh engine, a fresh update session) and pushes to them alone. Raises ``too_slow`` at
    ``deadline``."""
    def get(refs):
        try:
            return ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError as exc:
            raise too_slow from exc

    loads = [[w.load_weights.remote(ref) for ref in bucket_refs] for w in workers]
    alive, dead, n_bytes = [], [], 0
    for worker, refs in zip(workers, loads):
        try:
            n_bytes = sum(get(refs))
            alive.append(worker)
        except RayActorError:
            dead.append(worker)
    commits = [(w, w.commit_weights.remote(version)) for w in alive]
    for i, (worker, ref) in enumerate(commits):
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

    probe: {"problem", "image" (model size), "response_ids"}; reference: the learner's logprobs of the
    probe at temperature 1 (vLLM's prompt logprobs are the raw model's, whatever the rollout temperature).
    """
    prompt = {"problem": probe["problem"], "image": probe["image"]}
    served = ray.get([w.probe_logprobs.remote(prompt, probe["response_ids"]) for w in workers], timeout=timeout_s)
    diffs = [max(abs(a - b) for a, b in zip(reference, got)) for got in served]
    if diffs and max(diffs) > tolerance:
        raise RuntimeError(f"weight sync parity check failed: max |learner - vLLM| logprob per worker {diffs} "
                           f"> cluster.sync_parity_tolerance={tolerance}")
    return max(diffs, default=0.0)


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
