"""ReasonSeg (LISA's on-disk layout) -> dataset rows.

Layout: ``ReasonSeg/{train,val,test}/NAME.jpg`` with ``NAME.json`` holding ``text`` (list of queries),
``is_sentence`` (long query or short phrase) and ``shapes``: ``{"label": "target" | "ignore" | "flag",
"points": [[x, y], ...]}`` polygons. Masks are drawn as LISA does: "flag" shapes are dropped, polygons
(outline included, coordinates truncated to ints) are painted largest first, so a smaller polygon
inside a larger one wins; painted "ignore" pixels form ``ignore_mask``, painted target pixels ``mask``.
One row per query (``id`` = ``NAME_k``), or with ``first_query`` only ``text[0]`` (Seg-Zero's evaluation).
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data.masks import bbox_from_mask, encode_rle, points_from_mask, polygon_mask

log = logging.getLogger(__name__)
TARGET, IGNORE = 1, 2


def read_annotation(json_path: Path) -> dict:
    try:
        return json.loads(json_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:  # a few LISA files are cp1252
        return json.loads(json_path.read_text(encoding="cp1252"))


def reasonseg_masks(shapes: list[dict], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(target mask, ignore mask), both bool (H, W), painted largest polygon first."""
    polygons = [(polygon_mask(s["points"], height, width), IGNORE if "ignore" in s["label"].lower() else TARGET)
                for s in shapes if s["label"].lower() != "flag"]
    canvas = np.zeros((height, width), dtype=np.uint8)
    for pixels, value in sorted(polygons, key=lambda p: -int(p[0].sum())):
        canvas[pixels] = value
    return canvas == TARGET, canvas == IGNORE


def reasonseg_rows(root: str | Path, split: str | None = None, first_query: bool = False) -> Iterator[dict]:
    """Rows for every image of ``root`` (or ``root/split``); images without a target are skipped (logged)."""
    folder = Path(root) / split if split and (Path(root) / split).is_dir() else Path(root)
    images = sorted(folder.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no .jpg files in {folder}")
    for image_path in images:
        json_path = image_path.with_suffix(".json")
        try:
            data = image_path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
            anno = read_annotation(json_path)
            target, ignore = reasonseg_masks(anno["shapes"], height, width)
            if not target.any():
                raise ValueError("no target pixels")
            queries = [q for q in anno["text"] if isinstance(q, str) and q.strip()]
            if not queries:
                raise ValueError("no query text")
        except Exception as exc:
            log.warning("skipping %s: %s", image_path.name, exc)
            continue
        common = {"image": data, "height": height, "width": width, "mask": encode_rle(target),
                  "bbox": bbox_from_mask(target), "points": points_from_mask(target), "source": "reasonseg",
                  "ignore_mask": encode_rle(ignore) if ignore.any() else None,
                  "is_sentence": bool(anno.get("is_sentence", False))}
        for k, query in enumerate(queries[:1] if first_query else queries):
            yield {"id": f"{image_path.stem}_{k}", "problem": query.strip(), **common}
