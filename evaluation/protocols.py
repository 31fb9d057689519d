"""The papers' evaluation scripts, reproduced: ``evaluate.py --protocol segzero``.

Read from Seg-Zero's ``evaluation_scripts/evaluation.py`` and ``calculate_iou.py`` (rules ``segzero``,
``segzero_soft``) and ``evaluation_visionreasoner.py`` (rules ``multi_object``). Per sample:

1. Parse. Seg-Zero: the first ``{[^}]+}`` of the answer with ``json.loads``; the box is the first key
   containing "bbox" (any case) with 4 items, each ``round(int(v) * width / S)`` (S = the model's image
   size, 840 in the paper; x with the width, y with the height); the points are the first two keys
   containing "points" (plural), same mapping; and the answer must hold ``<think>([^<]+)</think>``
   (the script reads the thinking text, and fails without it). VisionReasoner: the JSON list between
   ``<answer>`` and ``</answer>``, each box and point ``int(v * width / S + 0.5)``; the think text is
   optional there.
2. Segment the ORIGINAL image with SAM2 (``multimask_output=True``, the mask with the highest predicted
   IoU; labels 1 for the points): Seg-Zero one prompt of box + both points; VisionReasoner one prompt
   per object (box + its point), masks united.
3. Count. I = |P ∩ G|, U = |P ∪ G| with G the ground truth read as bool (ReasonSeg's ignore pixels
   count as target). U = 0 (empty prediction, empty target): the sample is SKIPPED (their
   ``compute_iou`` returns 0 there and the unpacking error drops the sample). A failed parse: I = 0,
   U = |G| and the sample counts (IoU 0, also when |G| = 0). A failed segmentation: Seg-Zero counts
   it as a failed parse; VisionReasoner skips the sample.
4. gIoU = mean over counted samples of I / U (0 when U = 0); cIoU = sum I / sum U over the same
   samples (the scripts write I and U per sample; ``calculate_iou.py`` prints gIoU only).

With the GrabCut segmenter (no candidate masks) step 2 uses its one mask.
"""
from __future__ import annotations

import json
import re

import numpy as np

from data.dataset import Sample
from reward.rules import first_brace_block
from reward.segmenters import image_key

THINK_TEXT = re.compile(r"<think>([^<]+)</think>")
ANSWER_TEXT = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def script_prompts(response: str, rules: str, width: int, height: int,
                   model_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Segmenter prompts (boxes [K,4], points [K,P,2], original pixels) as the paper's script reads the
    answer; raises (ValueError, KeyError, TypeError, ...) wherever the script fails."""
    fx, fy = width / model_size, height / model_size
    if rules == "multi_object":
        data = json.loads(ANSWER_TEXT.search(response).group(1))
        boxes = [[int(b[0] * fx + 0.5), int(b[1] * fy + 0.5), int(b[2] * fx + 0.5), int(b[3] * fy + 0.5)]
                 for b in (item["bbox_2d"] for item in data)]
        points = [[[int(p[0] * fx + 0.5), int(p[1] * fy + 0.5)]] for p in (item["point_2d"] for item in data)]
        return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(points, dtype=np.float64).reshape(-1, 1, 2)
    block = first_brace_block(response)
    if block is None:
        raise ValueError("no JSON object")
    data = json.loads(block)
    box_key = next((key for key in data.keys() if "bbox" in key.lower()), None)
    if not (box_key and len(data[box_key]) == 4):
        raise ValueError("no box")
    b = data[box_key]
    box = [round(int(b[0]) * fx), round(int(b[1]) * fy), round(int(b[2]) * fx), round(int(b[3]) * fy)]
    keys = [key for key in data.keys() if "points" in key.lower()][:2]
    if len(keys) != 2:
        raise ValueError("no two points")
    points = [[round(int(data[k][0]) * fx), round(int(data[k][1]) * fy)] for k in keys]
    if not THINK_TEXT.search(response):
        raise ValueError("no <think> text")
    return np.array([box], dtype=np.float64), np.array([points], dtype=np.float64)


class ScriptMetrics:
    """Per-sample intersections and unions as the paper's script counts them (module docstring)."""

    def __init__(self):
        self.intersections: list[int] = []
        self.unions: list[int] = []
        self.skipped = 0

    def add(self, segmenter, sample: Sample, response: str, rules: str, model_size: int, gt: np.ndarray) -> None:
        gt = np.asarray(gt, dtype=bool)
        try:
            boxes, points = script_prompts(response, rules, sample.width, sample.height, model_size)
        except Exception:
            self._count(0, int(gt.sum()))
            return
        try:
            pred = np.zeros_like(gt)
            if len(boxes):
                image = np.asarray(sample.image.convert("RGB"))
                segmenter.set_image(image_key(image), image)
                pred = np.logical_or.reduce(segmenter.predict(boxes, points, best_of_three=True), axis=0)
        except Exception:
            if rules == "multi_object":
                self.skipped += 1
            else:
                self._count(0, int(gt.sum()))
            return
        if pred.shape != gt.shape:
            self.skipped += 1
            return
        union = int((pred | gt).sum())
        if union == 0:
            self.skipped += 1
            return
        self._count(int((pred & gt).sum()), union)

    def _count(self, intersection: int, union: int) -> None:
        self.intersections.append(intersection)
        self.unions.append(union)

    def result(self) -> dict:
        """{"giou", "ciou", "scored", "skipped"}; nan when no sample counts."""
        ious = [i / u if u > 0 else 0.0 for i, u in zip(self.intersections, self.unions)]
        total_union = sum(self.unions)
        return {"giou": float(np.mean(ious)) if ious else float("nan"),
                "ciou": sum(self.intersections) / total_union if total_union else (0.0 if ious else float("nan")),
                "scored": len(ious), "skipped": self.skipped}
