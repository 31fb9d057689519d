"""Evaluate answers: parse -> segment (one encode + one batched decode per image) -> gIoU / cIoU.

Used by ``evaluate.py`` (a policy on a split) and by the training loop (``eval.every_n_steps``). Every
result carries both conventions of DESIGN §6 under their names (``lisa``: empty-empty = 1, ignore
pixels excluded; ``segzero``: empty-empty = 0, ignore pixels counted as target).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data.dataset import Sample
from data.masks import decode_rle
from evaluation.metrics import CONVENTIONS, SegMetrics
from evaluation.overlay import save_overlay
from reward import RULE_TERMS, answer_prompts, rule_rewards
from reward.mask_iou import mask_iou, mask_reward, to_original
from reward.rules import box_iou_inclusive


def predicted_mask(segmenter, rules: str, sample: Sample, response: str, model_size: int) -> tuple[np.ndarray | None, dict | None]:
    """The mask a response points at (union over its objects), in original image pixels, and its
    prompts mapped to the original image; (None, None) when the answer does not parse."""
    prompts = answer_prompts(rules, response)
    if prompts is None:
        return None, None
    boxes, points = to_original(prompts[0], prompts[1], model_size, sample.height, sample.width)
    segmenter.set_image(sample.id, np.asarray(sample.image.convert("RGB")))
    masks = segmenter.predict(boxes, points)
    return np.logical_or.reduce(masks, axis=0), {"box": boxes[0].tolist(), "points": points[0].tolist()}


def evaluate_answers(samples: list[Sample], responses: list[str], response_tokens: list[int], segmenter,
                     rules: str, model_size: int, overlay_dir: str | Path | None = None,
                     max_overlays: int = 4, mask_reward_mode: str = "off", mask_threshold: float = 0.5) -> dict:
    """gIoU/cIoU under both conventions, parse-failure rate, mean response length (tokens), and
    overlay PNGs of the first ``max_overlays`` samples (paths in ``result["overlays"]``), and box_iou:
    the mean over samples of the IoU (inclusive pixels) between the first predicted box and the
    ground-truth box, 0 for an answer that does not parse or a sample without a box.

    Also the training reward of these answers: ``reward_<term>`` per term and ``reward`` = their sum,
    means over samples. Terms: the rule terms of ``rules``, plus ``mask_iou`` = mask_reward(IoU of the
    predicted mask with the ground truth, ``mask_reward_mode``) unless that mode is "off", as the
    reward pool scores a training answer (reward/worker.py)."""
    metrics = {name: SegMetrics.from_convention(name) for name in CONVENTIONS}
    failures, overlays, records, box_ious = 0, [], [], []
    reward_sums = dict.fromkeys(RULE_TERMS[rules] + (("mask_iou",) if mask_reward_mode != "off" else ()), 0.0)
    for i, (sample, response) in enumerate(zip(samples, responses)):
        pred, prompts = predicted_mask(segmenter, rules, sample, response, model_size)
        failures += pred is None
        gt = decode_rle(sample.mask_rle) if sample.mask_rle is not None else np.zeros((sample.height, sample.width), bool)
        ignore = decode_rle(sample.ignore_rle) if sample.ignore_rle is not None else None
        ious = {name: m.add(pred, gt, ignore) for name, m in metrics.items()}
        solution = sample.solution(model_size, multi_object=rules == "multi_object") if sample.bbox else ""
        terms = rule_rewards(rules, response, solution)
        if mask_reward_mode != "off":
            terms["mask_iou"] = 0.0 if pred is None else mask_reward(mask_iou(pred, gt), mask_reward_mode, mask_threshold)
        for k, v in terms.items():
            reward_sums[k] += v
        box_ious.append(box_iou_inclusive([round(v) for v in prompts["box"]], sample.bbox)
                        if pred is not None and sample.bbox else 0.0)
        records.append({"id": sample.id, "iou": ious["segzero"], "box_iou": box_ious[-1], "parsed": pred is not None})
        if overlay_dir is not None and len(overlays) < max_overlays:
            Path(overlay_dir).mkdir(parents=True, exist_ok=True)
            path = Path(overlay_dir) / f"{i:03d}_{_safe_name(sample.id)}.png"
            reasoning = response.split("</think>")[0].removeprefix("<think>") if "</think>" in response else response
            save_overlay(path, sample.image, query=sample.problem, reasoning=reasoning[:400], pred_mask=pred,
                         gt_mask=gt, box=prompts and prompts["box"], points=prompts and prompts["points"],
                         iou=ious["segzero"])
            overlays.append(str(path))
    n = max(len(samples), 1)
    result = {"n": len(samples), "parse_failure_rate": failures / n,
              "response_tokens_mean": sum(response_tokens) / n, "box_iou": sum(box_ious) / n, "overlays": overlays, "samples": records}
    result.update({f"reward_{k}": v / n for k, v in reward_sums.items()})
    result["reward"] = sum(reward_sums.values()) / n
    for name, m in metrics.items():
        r = m.result()
        result[f"giou_{name}"], result[f"ciou_{name}"] = r["giou"], r["ciou"]
    return result


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))[:40]
