"""Held-out evaluation during training: greedy answers from the rollout actors, masks and metrics in a
Ray task on the driver's node (so overlay files land where the driver logs them to MLflow).

The scoring task asks for no resources (the pools hold them all) and runs its segmenter on CPU; keep
eval.num_samples modest with SAM2-L, or run evaluate.py on a GPU node for full splits.
"""
from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from config import Config
from data.dataset import Sample


@ray.remote
def _score(reward_cfg, samples, responses, tokens, size, overlay_dir, overlays):
    from evaluation.run import evaluate_answers
    from reward.segmenters import make_segmenter

    return evaluate_answers(samples, responses, tokens, make_segmenter(reward_cfg), reward_cfg.rules, size,
                            overlay_dir=overlay_dir, max_overlays=overlays, mask_reward_mode=reward_cfg.mask_iou,
                            mask_threshold=reward_cfg.mask_threshold)


def evaluate_policy(cfg: Config, workers: list, samples: list[Sample], overlay_dir: str) -> dict:
    """gIoU/cIoU (both conventions), box IoU, parse failures, response length and reward (per term and
    total) of the current policy's greedy answers on samples."""
    size = cfg.model.image_size
    per_worker = [samples[i::len(workers)] for i in range(len(workers))]
    refs = [w.generate.remote([{"sample_id": s.id, "problem": s.problem, "image": s.model_image(size)}
                               for s in chunk], 1, None, None, True)
            for w, chunk in zip(workers, per_worker) if chunk]
    by_id = {}
    for outs in ray.get(refs, timeout=cfg.cluster.call_timeout_s):
        for o in outs:
            by_id[o["sample_id"]] = o["responses"][0] if o["responses"] else {"text": "", "token_ids": []}
    responses = [by_id[s.id]["text"] for s in samples]
    tokens = [len(by_id[s.id]["token_ids"]) for s in samples]
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.get(_score.options(num_cpus=0, scheduling_strategy=here)
                   .remote(cfg.reward, samples, responses, tokens, size, overlay_dir, cfg.eval.overlays),
                   timeout=cfg.cluster.call_timeout_s)
