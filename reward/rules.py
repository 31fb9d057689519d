"""Seg-Zero v1 rule rewards: five 0/1 terms, summed by the caller (0..5).

Read from Seg-Zero's `verl/utils/reward_score/seg_restrict.py` (strict, the one its training configs
use: `compute_score: seg_strict`) and `seg.py` (soft). What this file keeps to the letter:

- think_format: `re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", s, re.DOTALL)`, so any text
  before `<think>` or after `</answer>` scores 0.
- Every other term reads the FIRST `{[^}]+}` of the whole response (even one inside `<think>`) with
  `json.loads`: single-quoted "JSON" (the style of the prompt's own example) does not parse and scores
  0 on all four answer terms; a nested object is cut at its first `}` and does not parse either.
- The ground truth is `<box>(x1,y1),(x2,y2)</box><points>(x,y),(x,y)</points>` with non-negative
  integers; a solution that does not match scores 0 on the terms that need it.
- bbox_iou: IoU > 0.5 (strictly) with inclusive pixel areas (x2 - x1 + 1)(y2 - y1 + 1); the
  intersection counts only when inter_x1 < inter_x2 and inter_y1 < inter_y2 (Seg-Zero's test).
- bbox_l1: mean |coordinate error| over the four box numbers < 10 px (strictly).
- point_l1: both points (truncated with int(), as Seg-Zero does) inside the predicted box, edges
  included, and the order-invariant mean distance min(d(p1,g1)+d(p2,g2), d(p1,g2)+d(p2,g1)) / 2
  < 100 px (strictly).
- Any exception inside a term scores 0 for that term.

Where this file is deliberately stricter than Seg-Zero (DESIGN §6 asks for numbers): a box must be a
list of 4 finite JSON numbers and a point a list of exactly 2, for every term (Seg-Zero's strict format
checks only list lengths, so `"bbox": ["a","b","c","d"]` or `[NaN, 0, 1, 1]` earned it a format point;
here they earn nothing; booleans are not numbers, nor are NaN, Infinity, or ints beyond a double).
So answer_format == 1 exactly when `parse_answer` returns a prompt for the segmenter.

Soft variant (`seg.py`): the box is the first key containing "bbox", the points the first two other
keys containing "point" (case-insensitive). Seg-Zero's soft point term looked for "points" while its
soft format term looked for "point"; one rule serves both here.
"""
from __future__ import annotations

import json
import math
import re

TERMS = ("think_format", "answer_format", "bbox_iou", "bbox_l1", "point_l1")

THINK_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
GT_BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")
GT_POINTS = re.compile(r"<points>\((\d+),(\d+)\),\((\d+),(\d+)\)</points>")


def first_brace_block(text: str) -> str | None:
    """The match of `re.search(r"{[^}]+}", text)`, found in linear time.

    The regex is quadratic on text with many "{" and no "}" (a degenerate policy can write that);
    this scan returns the same span: the first "{" whose next "}" is not immediately after it.
    """
    start = text.find("{")
    while start != -1:
        end = text.find("}", start + 1)
        if end == -1:
            return None
        if end > start + 1:
            return text[start:end + 1]
        start = text.find("{", start + 1)
    return None


def first_json_object(text: str) -> dict | None:
    """json.loads of the first `{[^}]+}` block, or None when absent / not valid JSON."""
    block = first_brace_block(text)
    if block is None:
        return None
    try:
        data = json.loads(block)
    except (ValueError, RecursionError):  # ValueError also covers ints longer than Python's digit limit
        return None
    return data if isinstance(data, dict) else None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite_number(v) -> bool:
    try:
        return _is_number(v) and math.isfinite(v)
    except OverflowError:  # an int beyond a double
        return False


def _numbers(v, n: int) -> bool:
    """A list of exactly n finite numbers."""
    return isinstance(v, list) and len(v) == n and all(_is_finite_number(x) for x in v)


def answer_keys(data: dict, soft: bool) -> tuple[str | None, list[str]]:
    """(box key, point keys) of a parsed answer: exact names, or Seg-Zero's soft substring rule."""
    if not soft:
        return ("bbox" if "bbox" in data else None), [k for k in ("points_1", "points_2") if k in data]
    box_key, point_keys = None, []
    for key in data:
        name = str(key).lower()
        if "bbox" in name and box_key is None:
            box_key = key
        elif "point" in name:
            point_keys.append(key)
    return box_key, point_keys[:2]


def think_format_reward(response: str) -> float:
    return 1.0 if THINK_FORMAT.fullmatch(response) else 0.0


def answer_format_reward(data: dict | None, soft: bool = False) -> float:
    """1 when the first JSON object has a box of 4 numbers and two points of 2 numbers each."""
    if data is None:
        return 0.0
    box_key, point_keys = answer_keys(data, soft)
    ok = box_key is not None and len(point_keys) == 2 and _numbers(data[box_key], 4) \
        and all(_numbers(data[k], 2) for k in point_keys)
    return 1.0 if ok else 0.0


def box_iou_inclusive(a, b) -> float:
    """Seg-Zero's box IoU: inclusive pixel areas, A = (x2 - x1 + 1)(y2 - y1 + 1).

    inter = (ix2 - ix1 + 1)(iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0; IoU = inter / (A + B - inter).
    """
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return float(inter) / (area_a + area_b - inter)


def box_l1(a, b) -> float:
    """Mean absolute coordinate error: (|dx1| + |dy1| + |dx2| + |dy2|) / 4."""
    return sum(abs(a[i] - b[i]) for i in range(4)) / 4


def points_distance(p, g) -> float:
    """Order-invariant mean Euclidean distance: min(d(p1,g1) + d(p2,g2), d(p1,g2) + d(p2,g1)) / 2."""
    straight = math.dist(p[0], g[0]) + math.dist(p[1], g[1])
    swapped = math.dist(p[0], g[1]) + math.dist(p[1], g[0])
    return min(straight, swapped) / 2


def _point_in_box(p, box) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def _pred_box(data: dict | None, soft: bool):
    box_key, _ = answer_keys(data, soft)
    box = data[box_key]
    if not _numbers(box, 4):
        raise ValueError("box is not 4 numbers")
    return box


def _gt_box(solution: str) -> list[int]:
    return [int(v) for v in GT_BOX.search(solution).groups()]


def _gt_points(solution: str) -> list[list[int]]:
    v = [int(x) for x in GT_POINTS.search(solution).groups()]
    return [v[0:2], v[2:4]]


def bbox_iou_reward(data: dict | None, solution: str, soft: bool = False) -> float:
    return 1.0 if box_iou_inclusive(_pred_box(data, soft), _gt_box(solution)) > 0.5 else 0.0


def bbox_l1_reward(data: dict | None, solution: str, soft: bool = False) -> float:
    return 1.0 if box_l1(_pred_box(data, soft), _gt_box(solution)) < 10 else 0.0


def point_l1_reward(data: dict | None, solution: str, soft: bool = False) -> float:
    box = _pred_box(data, soft)
    _, point_keys = answer_keys(data, soft)
    if len(point_keys) != 2 or not all(_numbers(data[k], 2) for k in point_keys):
        return 0.0
    points = [[int(data[k][0]), int(data[k][1])] for k in point_keys]  # int(): Seg-Zero truncates
    if not all(_point_in_box(p, box) for p in points):
        return 0.0
    return 1.0 if points_distance(points, _gt_points(solution)) < 100 else 0.0


def _safe(term, *args) -> float:
    """A term's value, or 0 when it raises (missing key, NaN to int, overflow, bad ground truth...)."""
    try:
        return float(term(*args))
    except Exception:
        return 0.0


def _safe_parse(response: str) -> dict | None:
    try:
        return first_json_object(response)
    except Exception:
        return None


def segzero_rewards(response: str, solution: str, soft: bool = False) -> dict[str, float]:
    """The five Seg-Zero terms of one response against one solution string; never raises."""
    if not isinstance(response, str):
        response = ""
    data = _safe_parse(response)
    return {
        "think_format": _safe(think_format_reward, response),
        "answer_format": _safe(answer_format_reward, data, soft),
        "bbox_iou": _safe(bbox_iou_reward, data, solution, soft),
        "bbox_l1": _safe(bbox_l1_reward, data, solution, soft),
        "point_l1": _safe(point_l1_reward, data, solution, soft),
    }


def parse_answer(response: str, soft: bool = False) -> dict | None:
    """The segmenter prompt of a response: {"bbox": [x1,y1,x2,y2], "points": [[x,y],[x,y]]} as finite
    floats (model space), or None exactly when the answer format term is 0."""
    try:
        data = first_json_object(response)
        if not answer_format_reward(data, soft):
            return None
        box_key, point_keys = answer_keys(data, soft)
        return {"bbox": [float(v) for v in data[box_key]],
                "points": [[float(v) for v in data[k]] for k in point_keys]}
    except Exception:
        return None
