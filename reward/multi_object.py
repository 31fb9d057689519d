"""VisionReasoner's multi-object rule rewards (terms think_format, answer_format, accuracy, non_repeat).

Read from `verl/utils/reward_score/vision_reasoner.py` in dvlab-research/Seg-Zero (VisionReasoner's
training code lives there; its own repository holds inference only). Answer and solution are JSON
lists `[{"bbox_2d": [x1,y1,x2,y2], "point_2d": [x,y]}, ...]`; the answer is the text between the
first `<answer>` and the next `</answer>`, whitespace stripped.

| term          | range  | definition |
|---------------|--------|------------|
| think_format  | {0,1}  | same fullmatch as Seg-Zero (reward/rules.py) |
| answer_format | [0,2]  | mean over the list's items of [bbox_2d is a list of 4] + [point_2d is a list of 2]; 0 for |
|               |        | an empty list or non-list JSON. An item that is not an object ends the count (their code |
|               |        | raises on such items, keeping the partial sum) |
| accuracy      | [0,3]  | Hungarian matching (scipy linear_sum_assignment) of predicted to ground-truth objects on |
|               |        | cost 3 - ([IoU > 0.5] + [box L1 < 10] + [point distance < 30 and point inside its own |
|               |        | predicted box]); accuracy = sum of matched rewards / max(M, N). Lists are cut to 120 |
|               |        | objects. |
| non_repeat    | {0,1}  | split the whole response on ".", strip, drop empty pieces; 0 when a piece repeats an |
|               |        | earlier one twice or more, else 1 |

The box IoU here is VisionReasoner's: inter = max(0, ix2 - ix1 + 1) * max(0, iy2 - iy1 + 1) (it differs
from Seg-Zero's, which needs ix1 < ix2). VisionReasoner's format term only checks list lengths; its
accuracy term fails on any item whose values are not numbers or have the wrong length, which is what
`parse_objects` enforces here (booleans count as the numbers 0 and 1 there, as numpy takes them; the
segmenter's prompts, `parse_answer_objects`, refuse them). Any exception scores 0 for that term.

``pixels_per_unit`` (policy/family.py): an answer in relative coordinates has its parsed numbers
multiplied by it before the accuracy term and the segmenter read them; the solution is in pixels.
"""
from __future__ import annotations

import json

import numpy as np
from scipy.optimize import linear_sum_assignment

from reward.rules import think_format_reward

TERMS = ("think_format", "answer_format", "accuracy", "non_repeat")
MAX_OBJECTS = 120
POINT_THRESHOLD_PX = 30


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def answer_text(response: str) -> str | None:
    """Group 1 of `re.search(r"<answer>\\s*(.*?)\\s*</answer>", response, re.DOTALL)`, in linear time."""
    start = response.find("<answer>")
    if start == -1:
        return None
    end = response.find("</answer>", start + len("<answer>"))
    if end == -1:
        return None
    return response[start + len("<answer>"):end].strip()


def _answer_json(response: str):
    text = answer_text(response)
    return None if text is None else json.loads(text)


def answer_format_reward(response: str) -> float:
    data = _answer_json(response)
    if not isinstance(data, list) or not data:
        return 0.0
    total = 0.0
    for item in data:
        if not isinstance(item, dict):
            break
        ok_box = isinstance(item.get("bbox_2d"), list) and len(item["bbox_2d"]) == 4
        ok_point = isinstance(item.get("point_2d"), list) and len(item["point_2d"]) == 2
        total += (ok_box + ok_point) / len(data)
    return total


def parse_objects(text_json, allow_bool: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """A JSON list of objects -> (boxes [M,4], points [M,2]) float64, first 120 objects; None when
    any item lacks a box of 4 numbers or a point of 2 numbers, or the list is empty."""
    number = (lambda v: isinstance(v, (int, float))) if allow_bool else _is_number
    if not isinstance(text_json, list) or not text_json:
        return None
    boxes, points = [], []
    for item in text_json[:MAX_OBJECTS]:
        if not isinstance(item, dict):
            return None
        box, point = item.get("bbox_2d"), item.get("point_2d")
        if not (isinstance(box, list) and len(box) == 4 and all(number(v) for v in box)):
            return None
        if not (isinstance(point, list) and len(point) == 2 and all(number(v) for v in point)):
            return None
        boxes.append([float(v) for v in box])  # float(): an int beyond a double raises -> term 0
        points.append([float(v) for v in point])
    return np.array(boxes), np.array(points)


def accuracy_reward(response: str, solution: str, pixels_per_unit: float = 1.0) -> float:
    """sum over Hungarian-matched pairs of ([IoU>0.5] + [L1<10] + [dist<30 & point in box]) / max(M, N)."""
    gt = parse_objects(json.loads(solution), allow_bool=True)
    pred = parse_objects(_answer_json(response), allow_bool=True)
    if gt is None or pred is None:
        return 0.0
    (pb, pp), (gb, gp) = (pred[0] * pixels_per_unit, pred[1] * pixels_per_unit), gt
    with np.errstate(all="ignore"):  # inf/NaN coordinates give NaN comparisons, which are False
        iw = np.maximum(0, np.minimum(pb[:, None, 2], gb[None, :, 2]) - np.maximum(pb[:, None, 0], gb[None, :, 0]) + 1)
        ih = np.maximum(0, np.minimum(pb[:, None, 3], gb[None, :, 3]) - np.maximum(pb[:, None, 1], gb[None, :, 1]) + 1)
        inter = iw * ih
        area_p = (pb[:, 2] - pb[:, 0] + 1) * (pb[:, 3] - pb[:, 1] + 1)
        area_g = (gb[:, 2] - gb[:, 0] + 1) * (gb[:, 3] - gb[:, 1] + 1)
        iou = inter / (area_p[:, None] + area_g[None, :] - inter)
        l1 = np.abs(pb[:, None, :] - gb[None, :, :]).mean(axis=2)
        dist = np.sqrt(((pp[:, None, :] - gp[None, :, :]) ** 2).sum(axis=2))
        inside = (pp[:, 0] >= pb[:, 0]) & (pp[:, 0] <= pb[:, 2]) & (pp[:, 1] >= pb[:, 1]) & (pp[:, 1] <= pb[:, 3])
        reward = (iou > 0.5).astype(float) + (l1 < 10) + ((dist < POINT_THRESHOLD_PX) & inside[:, None])
    rows, cols = linear_sum_assignment(3.0 - reward)
    return float(reward[rows, cols].sum() / max(len(pb), len(gb)))


def non_repeat_reward(response: str) -> float:
    """0 once two '.'-separated sentences have repeated an earlier one, else 1."""
    seen, repeats = set(), 0
    for sentence in (s.strip() for s in response.split(".")):
        if not sentence:
            continue
        if sentence in seen:
            repeats += 1
            if repeats >= 2:
                return 0.0
        seen.add(sentence)
    return 1.0


def _safe(term, *args) -> float:
    try:
        return float(term(*args))
    except Exception:
        return 0.0


def multi_object_rewards(response: str, solution: str, pixels_per_unit: float = 1.0) -> dict[str, float]:
    """The four VisionReasoner terms of one response; never raises."""
    if not isinstance(response, str):
        response = ""
    return {
        "think_format": _safe(think_format_reward, response),
        "answer_format": _safe(answer_format_reward, response),
        "accuracy": _safe(accuracy_reward, response, solution, pixels_per_unit),
        "non_repeat": _safe(non_repeat_reward, response),
    }


def parse_answer_objects(response: str, pixels_per_unit: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Segmenter prompts of a multi-object response: (boxes [M,4], points [M,2]) all finite, in pixels,
    or None."""
    try:
        parsed = parse_objects(_answer_json(response))
    except Exception:
        return None
    if parsed is None or not (np.isfinite(parsed[0]).all() and np.isfinite(parsed[1]).all()):
        return None
    return parsed[0] * pixels_per_unit, parsed[1] * pixels_per_unit
