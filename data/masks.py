"""Binary masks: COCO RLE encode/decode, polygons -> masks, and the ground-truth box and points.

Masks are boolean numpy arrays of shape (H, W). RLEs are COCO's compressed form as JSON-friendly dicts
``{"size": [h, w], "counts": str}`` (pycocotools). A multi-object ground truth is a list of RLEs; decoding
a list gives the union.

Ground truth from a mask (Seg-Zero, DESIGN §6):
  bbox     = [min x, min y, max x, max y] over mask pixels (inclusive pixel indices)
  point 1  = argmax of the Euclidean distance transform (centre of the largest inscribed circle)
  point 2  = argmax of the distance transform among mask pixels whose distance to point 1 is greater
             than the median of those distances (a second, far-away inscribed circle)
"""
from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage


def encode_rle(mask: np.ndarray) -> dict:
    """Boolean (H, W) mask -> ``{"size": [h, w], "counts": str}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO counts string (the inverse of pycocotools' rleToString).

    Each run is a little-endian sequence of 5-bit groups stored as chr(48 + group), bit 0x20 meaning
    "more groups follow", bit 0x10 of the last group the sign; from the third run on, runs are stored
    as the difference to the run two places earlier.
    """
    runs: list[int] = []
    i = 0
    while i < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if i >= len(counts):
                raise ValueError("truncated RLE counts string")
            c = ord(counts[i]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {counts[i]!r} in RLE counts")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            i += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check_rle(rle: dict) -> tuple[int, int]:
    """Raises ValueError unless ``rle`` is a well-formed RLE; returns (h, w).

    pycocotools' decoder trusts its input: runs that add up to more than h*w write past its buffer. So
    every RLE read from a file is checked here first: non-negative runs summing to exactly h*w.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    h, w = (int(v) for v in rle["size"])
    if h <= 0 or w <= 0:
        raise ValueError(f"RLE size must be positive, got {[h, w]}")
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = rle_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise ValueError(f"RLE runs do not cover a {h}x{w} mask exactly")
    return h, w


def decode_rle(rle: dict | list[dict]) -> np.ndarray:
    """RLE (or list of RLEs, all of one size: union) -> boolean (H, W) mask. Raises ValueError if malformed."""
    rles = rle if isinstance(rle, list) else [rle]
    if not rles:
        raise ValueError("empty list of RLEs")
    sizes = {check_rle(r) for r in rles}
    if len(sizes) != 1:
        raise ValueError(f"RLEs of different sizes: {sorted(sizes)}")
    mask = np.zeros(sizes.pop(), dtype=bool)
    for r in rles:
        counts = r["counts"]
        if isinstance(counts, list):  # uncompressed COCO RLE
            r = mask_utils.frPyObjects(r, *r["size"])
        else:
            r = {"size": list(r["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        mask |= mask_utils.decode(r).astype(bool)
    return mask


def coco_segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """COCO annotation ``segmentation`` (polygons [[x,y,x,y,...],...], uncompressed or compressed RLE)
    -> boolean mask, rasterised by pycocotools (COCO's own convention: a polygon covers the pixels
    whose centres lie inside it, so the rectangle (2,3)-(10,8) covers x 2..9, y 3..7)."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)
    return decode_rle(segmentation)


def polygon_mask(points, height: int, width: int) -> np.ndarray:
    """One polygon [[x, y], ...] -> boolean mask, LISA/ReasonSeg convention: interior filled with
    cv2.fillPoly and the outline drawn too, so vertices and edges are inside (the rectangle
    (2,3)-(10,8) covers x 2..10, y 3..8). Coordinates are truncated to ints as LISA does."""
    pts = np.asarray(points, dtype=np.float64).astype(np.int32).reshape(-1, 2)
    if len(pts) < 1:
        raise ValueError("empty polygon")
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.polylines(mask, [pts], True, 1, 1)
    cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


def bbox_from_mask(mask: np.ndarray) -> list[int]:
    """[x1, y1, x2, y2] = min/max column and row of the mask's pixels (inclusive). Raises on an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask has no bbox")
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def points_from_mask(mask: np.ndarray) -> list[list[int]]:
    """[[x1, y1], [x2, y2]]: the two inscribed-circle centres of the module docstring.

    dist = distance_transform_edt(mask)              (distance of each pixel to the nearest background)
    p1   = argmax dist                               (first in row-major order on ties)
    d_i  = |pixel_i - p1| for every mask pixel i
    p2   = argmax dist over {i : d_i > median(d)}    (p2 = p1 when that set is empty, e.g. one pixel)
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("empty mask has no points")
    dist = ndimage.distance_transform_edt(mask)
    y1, x1 = np.unravel_index(int(np.argmax(dist)), dist.shape)
    ys, xs = np.nonzero(mask)
    d = np.hypot(ys - y1, xs - x1)
    far = d > np.median(d)
    if not far.any():
        return [[int(x1), int(y1)], [int(x1), int(y1)]]
    fy, fx = ys[far], xs[far]
    k = int(np.argmax(dist[fy, fx]))
    return [[int(x1), int(y1)], [int(fx[k]), int(fy[k])]]
