"""One step's rollouts: prompts go out to the rollout actors in chunks, and every finished group goes
straight to the reward pool, so scoring overlaps generation."""
from __future__ import annotations

import io
import time

import ray

from data.dataset import Sample


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


def generate_and_score(workers: list, reward_pool, samples: list[Sample], group_size: int,
                       model_size: int, chunk_size: int, timeout_s: float,
                       seed: int | None = None) -> tuple[list[dict], dict, dict]:
    """Generate ``group_size`` answers for every sample and score them.

    Returns (rollouts in sample order, rewards {sample_id: [per-answer dict]}, timings). Chunks of
    ``chunk_size`` prompts are spread round-robin over the workers; as soon as a chunk comes back its
    groups are submitted to the reward pool. ``seed`` (one per step) reseeds the sampling of each
    chunk (seed + chunk index), so a resumed run draws the same answers as an uninterrupted one.
    """
    t0 = time.perf_counter()
    by_id = {s.id: s for s in samples}
    chunks = [samples[i:i + chunk_size] for i in range(0, len(samples), chunk_size)]
    pending = {}
    for i, chunk in enumerate(chunks):
        prompts = [{"sample_id": s.id, "problem": s.problem, "image": s.model_image(model_size)} for s in chunk]
        chunk_seed = None if seed is None else seed + i
        pending[workers[i % len(workers)].generate.remote(prompts, group_size, seed=chunk_seed)] = chunk
    rollouts: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise TimeoutError(f"rollout: no answer from the rollout workers within {timeout_s:.0f} s "
                               "(cluster.call_timeout_s)")
        pending.pop(done[0])
        for r in ray.get(done[0]):
            rollouts[r["sample_id"]] = r
            reward_pool.submit(r["sample_id"], reward_group(by_id[r["sample_id"]], r, model_size))
    t_gen = time.perf_counter() - t0
    rewards = reward_pool.collect([s.id for s in samples])
    t_all = time.perf_counter() - t0
    return [rollouts[s.id] for s in samples], rewards, {"time/generate": t_gen, "time/reward_tail": t_all - t_gen}
