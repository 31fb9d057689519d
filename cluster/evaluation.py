"""Held-out evaluation during training: greedy answers from the rollout actors, scored (reward terms,
masks, gIoU/cIoU) by a RewardWorker in a Ray task on the driver's node, so overlay files land where the
driver logs them to MLflow.

The scoring task asks for no resources (the pools hold them all) and runs its segmenter on CPU; keep
eval.num_samples modest with SAM2-L, or run evaluate.py on a GPU node for full splits.
"""
from __future__ import annotations

import logging
import time

import mlflow
import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from config import Config
from data.dataset import Sample

log = logging.getLogger(__name__)


@ray.remote
def _score(reward_cfg, samples, responses, tokens, size, overlay_dir, overlays):
    from evaluation.run import evaluate_answers
    from reward.worker import RewardWorker

    return evaluate_answers(samples, responses, tokens, RewardWorker(reward_cfg, segment=True), size,
                            overlay_dir=overlay_dir, max_overlays=overlays)


def evaluate_policy(cfg: Config, rollouts, samples: list[Sample], overlay_dir: str) -> dict:
    """gIoU/cIoU (both conventions), box IoU, parse failures, response length and reward (per term and
    the weighted total, as in training) of the current policy's greedy answers on samples."""
    answers = rollouts.generate_greedy(samples)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.get(_score.options(num_cpus=0, scheduling_strategy=here)
                   .remote(cfg.reward, samples, [t for t, _ in answers], [n for _, n in answers],
                           cfg.model.image_size, overlay_dir, cfg.eval.overlays),
                   timeout=cfg.cluster.call_timeout_s)


def evaluate_and_log(job, step: int) -> dict:
    """Held-out gIoU/cIoU and reward of the job's current policy, logged as eval/* at ``step`` with
    overlay pictures, and kept as the best policy when it is (``Job.keep_if_best``); a failed evaluation
    is logged and skipped (it never stops training)."""
    t0 = time.perf_counter()
    name = f"step_{step:06d}"
    try:
        result = evaluate_policy(job.cfg, job.rollouts, job.eval_samples, str(job.out / "eval" / name))
    except (RayError, TimeoutError) as exc:
        log.warning("evaluation at step %d skipped: %s", step, exc)
        return {}
    metrics = {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}
    metrics["time/eval"] = time.perf_counter() - t0
    mlflow.log_metrics(metrics, step=step)
    for path in result["overlays"]:
        mlflow.log_artifact(path, artifact_path=f"eval/{name}")
    log.info("eval at step %d on %d rows: gIoU %.4f +- %.4f cIoU %.4f (segzero convention), box IoU %.4f, reward "
             "%.3f, parse failures %.1f%%", step, result["n"], result["giou_segzero"], result["giou_segzero_se"],
             result["ciou_segzero"], result["box_iou"], result["reward"], 100 * result["parse_failure_rate"])
    job.keep_if_best(step, result)
    return result
