"""Synthetic reasoning-segmentation set: coloured shapes on a plain or lightly noisy background.

Each image holds 2-4 shapes (circle, square, triangle) in distinct cells of a coarse grid (default: one
cell per 28-px merged patch of the policy, so a shape's position is one patch token). Each query picks
out exactly one shape, and needs a little reasoning:

    colour_shape  "the red circle"                 colour    "the blue shape"
    shape         "the triangle"                   relation  "the shape left of the green square"
    extreme       "the topmost shape"              size      "the largest shape"

Every candidate query is checked against the scene (``matching_shapes``) and only used when exactly one
shape satisfies it. Multi-object kinds (VisionReasoner-style data, ``multi_object=True``) name every
shape that matches, one or more:

    all_colour    "all the red shapes"             all_shape "all the circles"

Multi-object rows carry the targets as ``objects`` (JSON ``[{"bbox_2d", "point_2d"}]``, image pixels,
point = the centre of the largest inscribed circle) and ``mask`` as a list of RLEs, one per target.
Masks are exact (drawn from the same pixel test as the image, no anti-aliasing);
bbox and points come from the mask (data/masks.py). The same seed gives the same bytes; row i depends
only on (seed, i), so a larger n extends a smaller one and another seed gives a disjoint set.

``split`` ("train", "val", "test") keeps only rows whose content (query + target masks) belongs to that
split (data/splits.py), rejecting whole (scene, query) draws: rows of different splits never ask the
same question about the same pixels, so a held-out split measures more than recall of training rows.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from data.masks import bbox_from_mask, encode_rle, points_from_mask
from data.position_code import FREQUENCIES, draw_barcodes
from data.schema import write_rows
from data.segzero import multi_object_solution, reference_answer  # noqa: F401  (reference_answer: the warm start's)
from data.splits import SPLIT_SHARES, content_key, content_split

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 30), "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
SINGLE_KINDS = ("colour_shape", "colour", "shape", "relation", "extreme", "size")
MULTI_KINDS = ("all_colour", "all_shape")
KINDS = SINGLE_KINDS + MULTI_KINDS
DIRECTIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
EXTREMES = {"leftmost": (-1, 0), "rightmost": (1, 0), "topmost": (0, -1), "bottommost": (0, 1)}
SIZE_MARGIN = 1.2  # "largest"/"smallest" only when the area beats every other shape's by this factor


def shape_mask(kind: str, cx: int, cy: int, half: int, size: int) -> np.ndarray:
    """Exact pixel mask of one shape of half-extent ``half`` centred at (cx, cy)."""
    y, x = np.mgrid[0:size, 0:size]
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    if kind == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    # upward isosceles triangle: apex (cx, cy - half), base y = cy + half from cx - half to cx + half
    return (y <= cy + half) & (2 * np.abs(x - cx) <= y - (cy - half))


def matching_shapes(query: dict, shapes: list[dict]) -> list[int]:
    """Indices of the shapes that satisfy ``query`` (a dict with "kind" and its arguments)."""
    kind = query["kind"]
    if kind == "colour_shape":
        return [i for i, s in enumerate(shapes) if (s["colour"], s["shape"]) == (query["colour"], query["shape"])]
    if kind in ("colour", "all_colour"):
        return [i for i, s in enumerate(shapes) if s["colour"] == query["colour"]]
    if kind in ("shape", "all_shape"):
        return [i for i, s in enumerate(shapes) if s["shape"] == query["shape"]]
    if kind == "relation":
        refs = matching_shapes({"kind": "colour_shape", "colour": query["colour"], "shape": query["shape"]}, shapes)
        if len(refs) != 1:
            return []  # the reference itself must be unambiguous
        ref, (dx, dy) = shapes[refs[0]], DIRECTIONS[query["direction"]]
        # strictly in another grid column (row) on that side
        return [i for i, s in enumerate(shapes) if (s["col"] - ref["col"]) * dx + (s["row"] - ref["row"]) * dy > 0]
    if kind == "extreme":
        dx, dy = EXTREMES[query["which"]]
        key = [s["col"] * dx + s["row"] * dy for s in shapes]
        return [i for i, k in enumerate(key) if k == max(key)]
    if kind == "size":
        # every shape not clearly (by SIZE_MARGIN in area) smaller/larger than the extreme one matches
        areas = [s["area"] for s in shapes]
        if query["which"] == "largest":
            return [i for i, a in enumerate(areas) if a * SIZE_MARGIN > max(areas)]
        return [i for i, a in enumerate(areas) if a < min(areas) * SIZE_MARGIN]
    raise ValueError(f"unknown query kind {kind!r}")


def query_text(query: dict) -> str:
    kind = query["kind"]
    if kind == "colour_shape":
        return f"the {query['colour']} {query['shape']}"
    if kind == "colour":
        return f"the {query['colour']} shape"
    if kind == "shape":
        return f"the {query['shape']}"
    if kind == "relation":
        return f"the shape {query['direction']} the {query['colour']} {query['shape']}"
    if kind == "all_colour":
        return f"all the {query['colour']} shapes"
    if kind == "all_shape":
        return f"all the {query['shape']}s"
    return f"the {query['which']} shape"  # extreme, size


def candidate_queries(shapes: list[dict], kinds) -> dict[str, list[dict]]:
    """All queries of the allowed kinds that single out exactly one shape (multi-object kinds: one or
    more), grouped by kind."""
    qs = {k: [] for k in kinds}
    for s in shapes:
        qs.get("colour_shape", []).append({"kind": "colour_shape", "colour": s["colour"], "shape": s["shape"]})
        qs.get("colour", []).append({"kind": "colour", "colour": s["colour"]})
        qs.get("shape", []).append({"kind": "shape", "shape": s["shape"]})
        qs.get("all_colour", []).append({"kind": "all_colour", "colour": s["colour"]})
        qs.get("all_shape", []).append({"kind": "all_shape", "shape": s["shape"]})
        for d in DIRECTIONS:
            qs.get("relation", []).append({"kind": "relation", "direction": d, "colour": s["colour"],
                                           "shape": s["shape"]})
    for w in EXTREMES:
        qs.get("extreme", []).append({"kind": "extreme", "which": w})
    for w in ("largest", "smallest"):
        qs.get("size", []).append({"kind": "size", "which": w})
    unique = {}
    for k, lst in qs.items():
        seen, keep = set(), []
        for q in lst:
            key = tuple(sorted(q.items()))
            matches = len(matching_shapes(q, shapes))
            if key not in seen and (matches == 1 or (k in MULTI_KINDS and matches >= 1)):
                seen.add(key)
                keep.append(q)
        if keep:
            unique[k] = keep
    return unique


def query_split(query: dict, shapes: list[dict]) -> str:
    """The split of the row this query would make (its text and its targets' masks)."""
    return content_split(content_key(query_text(query), [shapes[i]["rle"] for i in matching_shapes(query, shapes)]))


BACKGROUNDS = ("plain", "gradient")
BARCODES = ("off", "objects", "all")


def background_pixels(kind: str, image_size: int, grey: int) -> np.ndarray:
    """Background before shapes, float (H, W, 3).

    plain:    every pixel (grey, grey, grey).
    gradient: (R, G, B) = (110 + 100 u, 110 + 100 v, 170), u = x / (size - 1), v = y / (size - 1).
    The gradient is an absolute-position cue: Qwen2.5-VL's vision tower has only relative (rotary)
    positions and RMS-normalises each patch before the merger, so a position must change the
    *direction* of a patch's colour, not only its brightness, to survive into the image tokens.
    """
    if kind == "plain":
        return np.full((image_size, image_size, 3), grey, dtype=np.float64)
    if kind == "gradient":
        ramp = np.arange(image_size, dtype=np.float64) / max(image_size - 1, 1)
        image = np.empty((image_size, image_size, 3), dtype=np.float64)
        image[..., 0] = 110 + 100 * ramp[None, :]
        image[..., 1] = 110 + 100 * ramp[:, None]
        image[..., 2] = 170
        return image
    raise ValueError(f"background must be one of {BACKGROUNDS}, got {kind!r}")


def make_scene(rng: np.random.Generator, image_size: int, grid: int, jitter: int,
               size_range: tuple[int, int], num_shapes: tuple[int, int], noise: float) -> dict:
    """Draws one scene's layout: its background grey, whether it is noisy, and its shapes with their
    exact masks (``draw_scene`` paints it, once the scene is kept)."""
    cell = image_size / grid
    grey = int(rng.integers(200, 246))  # drawn for every background so the rest of the stream is shared
    noisy = bool(rng.random() < noise)
    n = int(rng.integers(num_shapes[0], num_shapes[1] + 1))
    cells = rng.choice(grid * grid, size=n, replace=False)
    shapes = []
    for c in cells:
        row, col = divmod(int(c), grid)
        half = int(rng.integers(size_range[0], size_range[1] + 1))
        room = max(int(cell / 2) - 1 - half, 0)  # keep the shape inside its cell
        j = min(jitter, room)
        cx = int((col + 0.5) * cell) + (int(rng.integers(-j, j + 1)) if j else 0)
        cy = int((row + 0.5) * cell) + (int(rng.integers(-j, j + 1)) if j else 0)
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        mask = shape_mask(kind, cx, cy, half, image_size)
        shapes.append({"shape": kind, "colour": colour, "row": row, "col": col, "mask": mask,
                       "area": int(mask.sum()), "rle": encode_rle(mask)})
    return {"grey": grey, "noisy": noisy, "shapes": shapes}


def draw_scene(scene: dict, image_size: int, background: str, barcodes: str,
               noise_rng: np.random.Generator) -> np.ndarray:
    """The scene's RGB uint8 image: background, Gaussian noise (std 6, from its own stream, so a
    rejected scene costs no noise), the shapes, the barcodes."""
    image = background_pixels(background, image_size, scene["grey"])
    if scene["noisy"]:
        image += noise_rng.normal(0.0, 6.0, size=image.shape)
    for shape in scene["shapes"]:
        image[shape["mask"]] = COLOURS[shape["colour"]]
    if barcodes != "off":
        on_shapes = np.logical_or.reduce([s["mask"] for s in scene["shapes"]]) if barcodes == "objects" else None
        draw_barcodes(image, FREQUENCIES, on_shapes)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def synthetic_row(index: int, image_size: int = 112, seed: int = 0, *, grid: int | None = None,
                  jitter: int = 0, size_range: tuple[int, int] = (6, 12), num_shapes: tuple[int, int] = (2, 4),
                  noise: float = 0.5, kinds=SINGLE_KINDS, background: str = "plain", barcodes: str = "off",
                  multi_object: bool = False, split: str | None = None) -> dict:
    """Row ``index`` of the synthetic set (DESIGN §4 schema plus ``reasoning`` and ``kind``).

    grid: cells per side (default image_size // 28, one cell per merged patch); jitter: max offset in
    px of a shape's centre from its cell centre; size_range: half-extent of shapes in px; noise:
    probability of Gaussian (std 6) background noise; kinds: query kinds to draw from (uniformly);
    background: "plain" (grey) or "gradient" (an absolute-position cue, see ``background_pixels``);
    barcodes: "all" writes each patch's position into its top pixel rows (data/position_code.py),
    "objects" only into the patches a shape touches, "off" none; for the tiny policy, whose random vision
    tower cannot otherwise tell where a patch is; multi_object: the row names every target (``objects``,
    ``mask`` a list of RLEs; box and points of the union), as multi-object kinds need; split: draw only
    queries whose content belongs to that split (data/splits.py), None: any.
    """
    if split is not None and split not in SPLIT_SHARES:
        raise ValueError(f"split must be one of {tuple(SPLIT_SHARES)} or None, got {split!r}")
    if barcodes not in BARCODES:
        raise ValueError(f"barcodes must be one of {BARCODES}, got {barcodes!r}")
    if not multi_object and set(kinds) & set(MULTI_KINDS):
        raise ValueError(f"query kinds {sorted(set(kinds) & set(MULTI_KINDS))} name several shapes: multi_object=True")
    grid = grid or max(image_size // 28, 2)
    if grid * grid < num_shapes[1]:
        raise ValueError(f"a {grid}x{grid} grid cannot hold {num_shapes[1]} shapes")
    rng = np.random.default_rng([seed, index])
    # Resample the scene until some allowed query is unambiguous (almost always the first), and, with a
    # split, until the query drawn belongs to it (~1.25 tries for train, ~10 for val and test): rejecting
    # whole (scene, query) draws keeps a split's rows distributed as the generator's, restricted to the
    # split's contents (filtering a scene's queries instead would favour scenes with more of them).
    while True:
        scene = make_scene(rng, image_size, grid, jitter, size_range, num_shapes, noise)
        shapes = scene["shapes"]
        candidates = candidate_queries(shapes, kinds)
        if not candidates:
            continue
        kind = sorted(candidates)[int(rng.integers(len(candidates)))]
        query = candidates[kind][int(rng.integers(len(candidates[kind])))]
        if split is None or query_split(query, shapes) == split:
            break
    pixels = draw_scene(scene, image_size, background, barcodes, np.random.default_rng([seed, index, 1]))
    targets = [shapes[i] for i in matching_shapes(query, shapes)]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    row = {"id": f"synthetic-{seed}-{index:06d}", "image": buf.getvalue(), "height": image_size,
           "width": image_size, "problem": query_text(query), "source": "synthetic", "kind": kind}
    if not multi_object:
        target = targets[0]
        return {**row, "mask": target["rle"], "bbox": bbox_from_mask(target["mask"]),
                "points": points_from_mask(target["mask"]), "reasoning": f"{target['colour']} {target['shape']}"}
    union = np.logical_or.reduce([t["mask"] for t in targets])
    objects = [{"bbox_2d": bbox_from_mask(t["mask"]), "point_2d": points_from_mask(t["mask"])[0]} for t in targets]
    return {**row, "mask": [t["rle"] for t in targets], "bbox": bbox_from_mask(union),
            "points": points_from_mask(union), "objects": multi_object_solution(objects),
            "reasoning": " ".join(f"{t['colour']} {t['shape']}" for t in targets)}


def write_synthetic(path: str | Path, n: int, image_size: int = 112, seed: int = 0, multi_object: bool = False,
                    **options) -> Path:
    """Writes n synthetic rows to a Parquet file (``options`` as in synthetic_row); returns the path."""
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28, got {image_size}")
    rows = (synthetic_row(i, image_size, seed, multi_object=multi_object, **options) for i in range(n))
    extra = ("reasoning", "kind") + (("objects",) if multi_object else ())
    return write_rows(path, rows, extra=extra, multi_mask=multi_object)
