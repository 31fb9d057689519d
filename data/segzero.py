"""Seg-Zero / VisionReasoner text formats: solution strings, reference answers, released rows.

Solution (ground truth given to the reward), single object, model-space integer pixels:
    <box>(x1,y1),(x2,y2)</box><points>(x,y),(x,y)</points>
Multi-object (VisionReasoner) solution: JSON list ``[{"bbox_2d": [x1,y1,x2,y2], "point_2d": [x,y]}, ...]``.
Answer the policy is asked for:
    <think>...</think><answer>{"bbox":[x1,y1,x2,y2],"points_1":[x,y],"points_2":[x,y]}</answer>
or, multi-object (VisionReasoner), the solution's JSON list between the answer tags.

Released training sets (Hugging Face ``Ricky06662/refCOCOg_9k_840``, ``..._2k_840``,
``VisionReasoner_multi_object_{1k,7k}_840``) have columns ``id, problem, solution, image, img_height,
img_width``. Their images are stored already resized to 840x840 (cv2 INTER_AREA,
prepare_dataset/gen_training_dataset.py) and the solution's coordinates live in that 840x840 space
(scaled with int(v * 840 / width + 0.5)); ``img_height``/``img_width`` are the sizes of the original
COCO image, which the rows do not contain. Seg-Zero's evaluation maps 840-space answers back with
``* img_width / 840``. So a released row is read here as: image = the stored (840x840) pixels,
coordinates rescaled from ``coord_size`` (840) to that image's size (a factor of 1 for the released
sets), original size kept in ``orig_height``/``orig_width``.
"""
from __future__ import annotations

import io
import json
import re

from PIL import Image

SEGZERO_COORD_SIZE = 840
_BOX = re.compile(r"<box>\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)</box>")
_POINTS = re.compile(r"<points>\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)</points>")


def solution_string(bbox, points) -> str:
    """Seg-Zero ground-truth string from an integer bbox [x1,y1,x2,y2] and points [[x,y],[x,y]]."""
    (x1, y1, x2, y2), ((px, py), (qx, qy)) = bbox, points
    return f"<box>({x1},{y1}),({x2},{y2})</box><points>({px},{py}),({qx},{qy})</points>"


def parse_solution(text: str) -> tuple[list[int], list[list[int]]]:
    """Inverse of solution_string. Raises ValueError when the box or the points are missing."""
    box, pts = _BOX.search(text), _POINTS.search(text)
    if not box or not pts:
        raise ValueError(f"not a Seg-Zero solution string: {text[:80]!r}")
    p = [int(v) for v in pts.groups()]
    return [int(v) for v in box.groups()], [p[:2], p[2:]]


def multi_object_solution(objects: list[dict]) -> str:
    """VisionReasoner solution: JSON list of {"bbox_2d": [...], "point_2d": [...]} (compact)."""
    return json.dumps([{"bbox_2d": list(o["bbox_2d"]), "point_2d": list(o["point_2d"])} for o in objects],
                      separators=(",", ":"))


def parse_multi_object_solution(text: str) -> list[dict]:
    """JSON list of objects with integer ``bbox_2d`` (4) and ``point_2d`` (2). Raises ValueError."""
    try:
        objects = json.loads(text)
        out = [{"bbox_2d": [int(v) for v in o["bbox_2d"]], "point_2d": [int(v) for v in o["point_2d"]]}
               for o in objects]
    except (TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a VisionReasoner solution: {text[:80]!r}") from exc
    if not out or any(len(o["bbox_2d"]) != 4 or len(o["point_2d"]) != 2 for o in out):
        raise ValueError(f"not a VisionReasoner solution: {text[:80]!r}")
    return out


def answer_json(bbox, points) -> str:
    """The answer object the prompt asks for, compact JSON with integer coordinates."""
    return json.dumps({"bbox": [int(v) for v in bbox], "points_1": [int(v) for v in points[0]],
                       "points_2": [int(v) for v in points[1]]}, separators=(",", ":"))


def reference_answer(problem: str, bbox, points, reasoning: str | None = None,
                     objects: list[dict] | None = None) -> str:
    """A correct response for supervised warm start: ``<think>{reasoning}</think><answer>{json}</answer>``.

    The answer is Seg-Zero's object (``answer_json``), or with ``objects`` (model-space
    ``[{"bbox_2d", "point_2d"}]``) VisionReasoner's list, written like the solution (compact JSON).
    Without a reasoning hint the think part restates the query. Kept short on purpose: every token of
    it is one more step of rollout and learner compute.
    """
    think = reasoning if reasoning else problem.lower().strip(" .")
    answer = answer_json(bbox, points) if objects is None else multi_object_solution(objects)
    return f"<think>{think}</think><answer>{answer}</answer>"


def image_bytes_of(value) -> bytes:
    """Image cell of a row -> encoded bytes: raw bytes or Hugging Face's {"bytes": ..., "path": ...}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ValueError("image is not encoded bytes")
    return bytes(value)


def released_row_to_schema(row: dict, coord_size: int = SEGZERO_COORD_SIZE) -> dict:
    """A Seg-Zero / VisionReasoner released row -> this project's row (mask None; see module doc).

    The image header is read to get the stored size (pixels are not decoded here). Single-object
    solutions become bbox/points; a multi-object solution becomes ``objects`` (JSON, image pixels)
    with bbox/points of its first object and both points at that object's point.
    """
    data = image_bytes_of(row["image"])
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
    fx, fy = width / coord_size, height / coord_size

    def sx(v):  # model space -> stored-image pixel, clamped inside the image
        return min(max(int(v * fx + 0.5), 0), width - 1)

    def sy(v):
        return min(max(int(v * fy + 0.5), 0), height - 1)

    solution = row["solution"].strip()
    objects = None
    if solution.startswith("["):
        objects = [{"bbox_2d": [sx(b[0]), sy(b[1]), sx(b[2]), sy(b[3])], "point_2d": [sx(p[0]), sy(p[1])]}
                   for b, p in ((o["bbox_2d"], o["point_2d"]) for o in parse_multi_object_solution(solution))]
        bbox, points = objects[0]["bbox_2d"], [objects[0]["point_2d"]] * 2
    else:
        b, p = parse_solution(solution)
        bbox, points = [sx(b[0]), sy(b[1]), sx(b[2]), sy(b[3])], [[sx(x), sy(y)] for x, y in p]
    out = {
        "id": str(row["id"]), "image": data, "height": height, "width": width,
        "problem": str(row["problem"]), "mask": None, "bbox": bbox, "points": points,
        "source": str(row.get("source") or ("visionreasoner" if objects else "segzero")),
        "orig_height": int(row["img_height"]) if row.get("img_height") is not None else None,
        "orig_width": int(row["img_width"]) if row.get("img_width") is not None else None,
    }
    if objects is not None:
        out["objects"] = multi_object_solution(objects)
    return out
