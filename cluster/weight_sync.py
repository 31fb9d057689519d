"""Weight sync: after each learner step, rank 0's weights reach every rollout actor, bucket by bucket.

CPU path (and any single-node job): rank 0 yields buckets of HF-named tensors (under ZeRO-3 all ranks
take part in gathering each bucket); every bucket is put in Ray's object store once and loaded by every
rollout worker; then each worker resets its caches and reports the new version, which is checked.
The GPU path (NCCL broadcast from rank 0 into the vLLM workers) is in rollout/vllm_extension.py.
"""
from __future__ import annotations

import time

import ray
from ray.exceptions import GetTimeoutError


def broadcast_weights(learners: list, workers: list, version: int, bucket_bytes: int, timeout_s: float) -> dict:
    """Streams rank 0's weight buckets to every worker's ``load_weights``, then ``commit_weights(version)``
    on each and checks the versions they report. Raises TimeoutError naming cluster.sync_timeout_s when
    the whole sync takes longer than ``timeout_s`` (a hung worker or learner)."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s

    too_slow = TimeoutError(f"weight sync to version {version} did not finish within {timeout_s:.0f} s "
                            "(cluster.sync_timeout_s): a rollout worker or learner rank is hung")

    def left() -> float:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise too_slow
        return left_s

    def get(refs):
        try:
            return ray.get(refs, timeout=left())
        except GetTimeoutError as exc:
            raise too_slow from exc

    streams = [learner.weight_buckets.options(num_returns="streaming").remote(bucket_bytes) for learner in learners]
    loads = []  # per bucket: one load per worker, each returning the bytes it loaded
    for bucket_ref in _refs(streams[0], left):
        loads.append([w.load_weights.remote(bucket_ref) for w in workers])
    for other in streams[1:]:  # ranks > 0 only helped gather; drain their (empty) streams
        for ref in _refs(other, left):
            get(ref)
    loaded = [get(refs) for refs in loads]
    n_bytes = sum(per_worker[0] for per_worker in loaded)
    versions = get([w.commit_weights.remote(version) for w in workers])
    bad = [i for i, v in enumerate(versions) if v != version]
    if bad:
        raise RuntimeError(f"weight sync: rollout workers {bad} report versions {[versions[i] for i in bad]}, expected {version}")
    dt = time.perf_counter() - t0
    return {"time/sync": dt, "sync/bytes": n_bytes, "sync/gbps": n_bytes / max(dt, 1e-9) / 1e9}


def _refs(stream, left):
    """Object refs of a streaming actor generator, each waited for with the sync's remaining time."""
    while True:
        ready, _ = ray.wait([stream], timeout=left())
        if not ready:
            left()  # raises the timeout error when the deadline has passed
            continue
        try:
            yield next(stream)
        except StopIteration:
            return


def parity_check(learners: list, workers: list, probe: dict, tolerance: float, timeout_s: float) -> float:
    """Max |learner - vLLM| logprob over a fixed probe sequence, on every rollout worker, after a sync.

    probe: {"problem", "prompt" (chat text), "image" (model size), "response_ids"}. The learner's
    logprobs come from rank 0 (the call is collective: other ranks get no sequences). Raises
    RuntimeError when the difference exceeds ``tolerance`` (stale or misnamed weights, a cache that was
    not reset); a healthy fp32 sync on CPU differs by ~2e-6.
    """
    shards = [[probe]] + [[] for _ in learners[1:]]
    # vLLM's prompt logprobs are the raw model's (temperature 1), whatever the rollout temperature
    reference = ray.get([l.logprobs.remote(s, 1.0) for l, s in zip(learners, shards)], timeout=timeout_s)[0][0]
    prompt = {"problem": probe["problem"], "image": probe["image"]}
    served = ray.get([w.probe_logprobs.remote(prompt, probe["response_ids"]) for w in workers], timeout=timeout_s)
    diffs = [max(abs(a - b) for a, b in zip(reference, got)) for got in served]
    if max(diffs) > tolerance:
        raise RuntimeError(f"weight sync parity check failed: max |learner - vLLM| logprob per worker {diffs} "
                           f"> cluster.sync_parity_tolerance={tolerance}")
    return max(diffs)
