"""Held-out evaluation during training, on each held-out split (data/prepare.py: val selects, the test
split (eval/*) and OOD report): greedy answers from the rollout actors, scored (reward terms,
masks, gIoU/cIoU) on the reward pool's first actor (RewardPool.evaluate: its CPUs and GPU share, its
segmenter), between steps while the pool is idle; the overlay pictures come back to the driver, which
writes and logs them to MLflow.

The scoring's timeout matches its size: cluster.call_timeout_s covers a step's rollout.prompts_per_step x G
answers, so an evaluation of N rows gets call_timeout_s x max(1, N / (prompts_per_step x group_size)).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
from ray.exceptions import RayError

from config import Config
from data.dataset import Sample

log = logging.getLogger(__name__)

SPLIT_NAMES = {"val": "validation", "eval": "test", "ood": "OOD"}


def evaluate_policy(cfg: Config, rollouts, samples: list[Sample], overlay_dir: str) -> dict:
    """gIoU/cIoU (both conventions), box IoU, parse failures, response length and reward (per term and
    the weighted total, as in training) of the current policy's greedy answers on samples."""
    answers = rollouts.generate_greedy(samples)
    r = cfg.rollout
    timeout_s = cfg.cluster.call_timeout_s * max(1.0, len(samples) / (r.prompts_per_step * r.group_size))
    result = rollouts.reward_pool.evaluate(samples, [t for t, _ in answers], [n for _, n in answers],
                                           cfg.model.image_size, cfg.eval.overlays, timeout_s)
    paths = []
    for name, png in result["overlays"].items():
        path = Path(overlay_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        paths.append(str(path))
    result["overlays"] = paths
    return result


def evaluate_and_log(job, step: int) -> dict[str, dict]:
    """gIoU/cIoU and reward of the job's current policy on every held-out split, logged at ``step`` under
    the split's prefix (val/*, eval/* = the test split, ood/*) with overlay pictures; returns {split:
    result} (the loop keeps the best policy on val, ``Job.keep_if_best``). A split whose evaluation
    fails is logged and left out (it never stops training)."""
    results = {}
    for role, samples in job.eval_samples.items():
        t0 = time.perf_counter()
        name = f"step_{step:06d}/{role}"
        try:
            result = evaluate_policy(job.cfg, job.rollouts, samples, str(job.out / "eval" / name))
        except (RayError, TimeoutError) as exc:
            log.warning("evaluation of %s at step %d skipped: %s", role, step, exc)
            continue
        metrics = {f"{role}/{k}": v for k, v in result.items() if isinstance(v, float)}
        metrics[f"time/eval_{role}"] = time.perf_counter() - t0
        mlflow.log_metrics(metrics, step=step)
        for path in result["overlays"]:
            mlflow.log_artifact(path, artifact_path=f"eval/{name}")
        log.info("%s at step %d on %d rows: gIoU %.4f +- %.4f cIoU %.4f (segzero convention), box IoU %.4f, reward "
                 "%.3f, parse failures %.1f%%", SPLIT_NAMES[role], step, result["n"], result["giou_segzero"],
                 result["giou_segzero_se"], result["ciou_segzero"], result["box_iou"], result["reward"],
                 100 * result["parse_failure_rate"])
        results[role] = result
    return results
