"""Evaluate answers: the training reward of each answer, its mask, and gIoU / cIoU, under a protocol.

Used by ``evaluate.py`` (a policy on a split) and by the training loop (``eval.every_n_steps``). One
reward path: every answer is scored by a ``reward.worker.RewardWorker`` on the group that
``reward_group`` builds, exactly as the reward pool scores a training answer (same solution string
for the rule set, same weighted total), and the mask it segments is the one measured.

Protocols (``evaluate.py --protocol``):
- ``default``: the reward worker's mask (one mask per box/points prompt; union over objects), an
  unparseable answer is an empty prediction, every sample counts; reported under both conventions of
  DESIGN §6 by name (``lisa``: empty-empty = 1, ignore pixels excluded; ``segzero``: empty-empty = 0,
  ignore pixels counted as target).
- ``segzero``: the papers' own evaluation scripts (evaluation/protocols.py): Seg-Zero's
  ``evaluation.py`` for rules ``segzero``/``segzero_soft``, VisionReasoner's for ``multi_object``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data.dataset import Sample
from data.masks import decode_rle
from evaluation.metrics import CONVENTIONS, SegMetrics
from evaluation.overlay import save_overlay
from evaluation.protocols import ScriptMetrics
from policy.family import pixels_per_unit
from reward import answer_prompts
from reward.mask_iou import to_original
from reward.rules import box_iou_inclusive
from reward.segmenters import image_key
from reward.worker import RewardWorker, reward_group

PROTOCOLS = ("default", "segzero")


def evaluate_answers(samples: list[Sample], responses: list[str], response_tokens: list[int],
                     scorer: RewardWorker, model_size: int, overlay_dir: str | Path | None = None,
                     max_overlays: int = 4, protocol: str = "default", masks: list | None = None) -> dict:
    """Metrics of ``responses`` (one per sample) scored by ``scorer`` (a RewardWorker built with
    ``segment=True``, so it segments even when the mask term is off). ``masks``: the predicted mask of
    each sample instead of its answer's (a vote over several answers, evaluation/voting.py).

    Always: the training reward of the answers (``reward_<term>`` per term, ``reward`` the weighted
    total, means over samples), ``parse_failure_rate`` (no segmenter prompt in the answer),
    ``response_tokens_mean``, ``box_iou`` (mean IoU, inclusive pixels, of the first predicted box with
    the ground-truth box; 0 when the answer does not parse), per-sample ``samples`` records and the
    paths of ``max_overlays`` overlay PNGs, ``giou_<convention>`` with its standard error
    ``giou_<convention>_se``, ``ciou_<convention>`` (default protocol).
    Protocol segzero adds ``giou``, ``ciou``, ``scored`` and ``skipped`` as the paper's script counts them.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; expected one of {PROTOCOLS}")
    rules = scorer.cfg.rules
    unit = pixels_per_unit(scorer.cfg.coordinates, model_size)  # answer coordinates -> model-space pixels
    metrics = {name: SegMetrics.from_convention(name) for name in CONVENTIONS}
    script = ScriptMetrics()
    failures, overlays, records, box_ious, reward_sums = 0, [], [], [], {}
    for i, (sample, response) in enumerate(zip(samples, responses)):
        (scores,), (pred,) = scorer.score_group(reward_group(sample, [response], rules, model_size), with_masks=True)
        pred = pred if masks is None else masks[i]
        for term, value in scores.items():
            reward_sums[term] = reward_sums.get(term, 0.0) + value
        prompts = answer_prompts(rules, response, unit)
        failures += prompts is None
        gt = (decode_rle(sample.mask_rle) if sample.mask_rle is not None
              else np.zeros((sample.height, sample.width), bool))
        ignore = decode_rle(sample.ignore_rle) if sample.ignore_rle is not None else None
        ious = {name: m.add(pred, gt, ignore) for name, m in metrics.items()}
        if protocol == "segzero":
            # the script maps answer numbers with width / S, S the image's size in answer units
            script.add(scorer.segmenter, sample, response, rules, round(model_size / unit),
                       gt | ignore if ignore is not None else gt)
        box = None
        if prompts is not None:
            boxes, points = to_original(prompts[0], prompts[1], model_size, sample.height, sample.width)
            box, point_list = boxes[0].tolist(), points[0].tolist()
        box_ious.append(box_iou_inclusive([round(v) for v in box], sample.bbox) if box and sample.bbox else 0.0)
        records.append({"id": sample.id, "iou": ious["segzero"], "box_iou": box_ious[-1], "parsed": prompts is not None,
                        "reward": scores["total"]})
        if overlay_dir is not None and len(overlays) < max_overlays:
            Path(overlay_dir).mkdir(parents=True, exist_ok=True)
            path = Path(overlay_dir) / f"{i:03d}_{_safe_name(sample.id)}.png"
            reasoning = response.split("</think>")[0].removeprefix("<think>") if "</think>" in response else response
            save_overlay(path, sample.image, query=sample.problem, reasoning=reasoning[:400], pred_mask=pred,
                         gt_mask=gt, box=box, points=point_list if box else None, iou=ious["segzero"])
            overlays.append(str(path))
    n = max(len(samples), 1)
    result = {"n": len(samples), "protocol": protocol, "parse_failure_rate": failures / n,
              "response_tokens_mean": sum(response_tokens) / n, "box_iou": sum(box_ious) / n,
              "overlays": overlays, "samples": records}
    result.update({f"reward_{k}": v / n for k, v in reward_sums.items() if k != "total"})
    result["reward"] = reward_sums.get("total", 0.0) / n
    if protocol == "segzero":
        result.update(script.result())
    for name, m in metrics.items():
        r = m.result()
        result[f"giou_{name}"], result[f"giou_{name}_se"], result[f"ciou_{name}"] = r["giou"], r["giou_se"], r["ciou"]
    return result


def predicted_mask(segmenter, rules: str, sample: Sample, response: str, model_size: int,
                   unit: float = 1.0) -> tuple[np.ndarray | None, dict | None]:
    """The mask a response points at (union over its objects), in original image pixels, and its
    prompts mapped to the original image; (None, None) when the answer does not parse (infer.py).
    ``unit``: model-space pixels per answer coordinate (policy/family.py pixels_per_unit)."""
    prompts = answer_prompts(rules, response, unit)
    if prompts is None:
        return None, None
    boxes, points = to_original(prompts[0], prompts[1], model_size, sample.height, sample.width)
    image = np.asarray(sample.image.convert("RGB"))
    segmenter.set_image(image_key(image), image)
    masks = segmenter.predict(boxes, points)
    return np.logical_or.reduce(masks, axis=0), {"box": boxes[0].tolist(), "points": points[0].tolist()}


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))[:40]

