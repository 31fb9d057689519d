"""Seg-Zero v1 rule rewards: five 0/1 terms, summed by the caller (0..5), to the letter of Seg-Zero's code.

Read from Seg-Zero's `verl/utils/reward_score/seg_restrict.py` (rules `segzero`: the strict rules its
training configs use, `compute_score: seg_strict`) and `seg.py` (rules `segzero_soft`). What both do:

- think_format: `re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", s, re.DOTALL)`, so any text
  before `<think>` or after `</answer>` scores 0.
- Every other term reads the FIRST `{[^}]+}` of the whole response (even one inside `<think>`) with
  `json.loads`: single-quoted "JSON" (the style of the prompt's own example) does not parse and scores
  0 on all four answer terms; a nested object is cut at its first `}` and does not parse either.
- The ground truth is `<box>(x1,y1),(x2,y2)</box><points>(x,y),(x,y)</points>` with non-negative
  integers; a solution that does not match scores 0 on the terms that need it.
- answer_format checks keys and lengths only, never that the values are numbers: strict, `bbox` is a
  list of 4 and `points_1`, `points_2` lists of 2; soft, the first key containing "bbox" (any case) has
  4 items and the first two other keys containing "point" have 2 each (strings of that length pass).
- bbox_iou: IoU > 0.5 (strictly) with inclusive pixel areas (x2 - x1 + 1)(y2 - y1 + 1); the
  intersection counts only when inter_x1 < inter_x2 and inter_y1 < inter_y2. The box values are used
  as they come: numbers (booleans are Python ints) compute, strings raise and score 0.
- bbox_l1: mean |coordinate error| over the four box numbers < 10 px (strictly).
- point_l1: the points are `[int(p[0]), int(p[1])]` (Seg-Zero truncates, so `["717", "570"]` counts as
  [717, 570]); both inside the predicted box, edges included, and the order-invariant mean distance
  min(d(p1,g1)+d(p2,g2), d(p1,g2)+d(p2,g1)) / 2 < 100 px (strictly). Strict keys `points_1`,
  `points_2`; soft: the first two keys containing "points" (plural, unlike the soft format term).
- Any exception inside a term scores 0 for that term.

The segmenter needs numbers, so `parse_answer` (the mask term's prompts) is stricter than the format
term: 4 and 2 finite coordinates, numbers or numeric strings, never booleans. When it returns a prompt,
answer_format is 1; the converse does not hold (`"bbox": ["a","b","c","d"]` earns the format point
and no mask).

``pixels_per_unit`` (policy/family.py): an answer in relative coordinates (Qwen3-VL's 0..1000) is
converted before any term reads it: every number (not a boolean, not a string) in a list value of the
answer object is multiplied by it; anything else stays as written and scores as it would in pixels.
"""
from __future__ import annotations

import json
import math
import re

TERMS = ("think_format", "answer_format", "bbox_iou", "bbox_l1", "point_l1")

THINK_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
GT_BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")
GT_POINTS = re.compile(r"<points>\((\d+),(\d+)\),\((\d+),(\d+)\)</points>")
STRICT_POINT_KEYS = ("points_1", "points_2")


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


def box_key(data: dict, soft: bool):
    """Strict: "bbox"; soft: the first key containing "bbox" in any case (None when there is none)."""
    if not soft:
        return "bbox"
    return next((key for key in data if "bbox" in key.lower()), None)


def format_keys(data: dict, soft: bool) -> tuple[object, list]:
    """(box key, point keys) as the format term reads them: strict, the fixed names present in data;
    soft, Seg-Zero's loop (first key with "bbox"; every later key with "point" that is not that one)."""
    if not soft:
        return ("bbox" if "bbox" in data else None), [k for k in STRICT_POINT_KEYS if k in data]
    bbox, points = None, []
    for key in data:
        if "bbox" in key.lower() and bbox is None:
            bbox = key
        elif "point" in key.lower():
            points.append(key)
    return bbox, points


def point_keys(data: dict, soft: bool) -> list:
    """The point term's keys: strict `points_1`, `points_2`; soft, the first two keys containing "points"."""
    if not soft:
        return list(STRICT_POINT_KEYS)
    return [key for key in data if "points" in key.lower()][:2]


def think_format_reward(response: str) -> float:
    return 1.0 if THINK_FORMAT.fullmatch(response) else 0.0


def answer_format_reward(data: dict | None, soft: bool = False) -> float:
    """1 when the first JSON object has the box and two points, by length (see the module docstring)."""
    if data is None:
        return 0.0
    bbox, points = format_keys(data, soft)
    if bbox is None or len(points) < 2 or len(data[bbox]) != 4:
        return 0.0
    if not soft and not (isinstance(data[bbox], list) and all(isinstance(data[k], list) for k in points)):
        return 0.0
    return 1.0 if all(len(data[k]) == 2 for k in points[:2]) else 0.0


def box_iou_inclusive(a, b) -> float:
    """Seg-Zero's box IoU: inclusive pixel areas, A = (x2 - x1 + 1)(y2 - y1 + 1).

    inter = (ix2 - ix1 + 1)(iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0; IoU = inter / (A + B - inter).
    """
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    union = area_a + area_b - inter
    # an inverted box (x2 < x1) has a negative area and no intersection; where the union is then not
    # positive the IoU is 0 (Seg-Zero's reward catches that division's error and scores 0)
    return float(inter) / union if union > 0 else 0.0


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


def _pred_box(data: dict, soft: bool):
    """The answer's box as Seg-Zero takes it: the value under the box key when it has 4 items (raises
    otherwise, which scores the term 0)."""
    box = data[box_key(data, soft)]
    if len(box) != 4:
        raise ValueError("the box has not 4 items")
    return box


def _gt_box(solution: str) -> list[int]:
    return [int(v) for v in GT_BOX.search(solution.strip()).groups()]


def _gt_points(solution: str) -> list[list[int]]:
    v = [int(x) for x in GT_POINTS.search(solution).groups()]
    return [v[0:2], v[2:4]]


def bbox_iou_reward(data: dict, solution: str, soft: bool = False) -> float:
    gt = _gt_box(solution)
    return 1.0 if box_iou_inclusive(_pred_box(data, soft), gt) > 0.5 else 0.0


def bbox_l1_reward(data: dict, solution: str, soft: bool = False) -> float:
    gt = _gt_box(solution)
    return 1.0 if box_l1(_pred_box(data, soft), gt) < 10 else 0.0


def point_l1_reward(data: dict, solution: str, soft: bool = False) -> float:
    gt = _gt_points(solution)
    box = _pred_box(data, soft)
    keys = point_keys(data, soft)
    if len(keys) != 2:
        return 0.0
    points = [[int(data[k][0]), int(data[k][1])] for k in keys]  # int(): Seg-Zero truncates
    if not all(_point_in_box(p, box) for p in points):
        return 0.0
    return 1.0 if points_distance(points, gt) < 100 else 0.0


def _safe(term, *args) -> float:
    """A term's value, or 0 when it raises (missing key, a string among numbers, no ground truth...)."""
    try:
        return float(term(*args))
    except Exception:
        return 0.0


def _safe_parse(response: str) -> dict | None:
    try:
        return first_json_object(response)
    except Exception:
        return None


def in_pixels(data: dict, pixels_per_unit: float) -> dict:
    """The answer object with the numbers of its list values in pixels (see the module docstring)."""
    if pixels_per_unit == 1.0:
        return data

    def scaled(v):
        return v * pixels_per_unit if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    return {k: [scaled(v) for v in value] if isinstance(value, list) else value for k, value in data.items()}


def segzero_rewards(response: str, solution: str, soft: bool = False, pixels_per_unit: float = 1.0) -> dict[str, float]:
    """The five Seg-Zero terms of one response against one solution string; never raises."""
    if not isinstance(response, str):
        response = ""
    data = _safe_parse(response)
    if isinstance(data, dict):
        data = in_pixels(data, pixels_per_unit)
    geometry = (lambda term: _safe(term, data, solution, soft)) if data is not None else (lambda term: 0.0)
    return {
        "think_format": _safe(think_format_reward, response),
        "answer_format": _safe(answer_format_reward, data, soft),
        "bbox_iou": geometry(bbox_iou_reward),
        "bbox_l1": geometry(bbox_l1_reward),
        "point_l1": geometry(point_l1_reward),
    }


def coordinate(value) -> float | None:
    """A segmenter coordinate: a finite number or numeric string (never a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def parse_answer(response: str, soft: bool = False, pixels_per_unit: float = 1.0) -> dict | None:
    """The segmenter prompt of a response: {"bbox": [x1,y1,x2,y2], "points": [[x,y],[x,y]]} as finite
    floats (model-space pixels), read with the format term's keys; None when the answer holds no such
    numbers."""
    try:
        data = first_json_object(response)
        if not answer_format_reward(data, soft):
            return None
        bbox, points = format_keys(data, soft)
        values = [data[bbox]] + [data[k] for k in points[:2]]
        if not all(isinstance(v, list) for v in values):
            return None
        numbers = [[coordinate(c) for c in v] for v in values]
        if any(c is None for v in numbers for c in v):
            return None
        numbers = [[c * pixels_per_unit for c in v] for v in numbers]
        return {"bbox": numbers[0], "points": numbers[1:]}
    except Exception:
        return None
