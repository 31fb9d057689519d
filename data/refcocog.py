"""RefCOCOg, RefCOCO and RefCOCO+ (refer's on-disk layout, one per dataset) -> dataset rows.

Layout (as LISA expects it): ``refcocog/instances.json`` (COCO: images, annotations with polygon or RLE
``segmentation``) and ``refcocog/refs(umd).p`` (RefCOCO and RefCOCO+: ``refs(unc).p``; a pickled list of
refs: ``ref_id, ann_id, image_id, split, sentences: [{"raw", "sent", "sent_id"}]``), images in a COCO
``train2014`` folder. Masks are rasterised by pycocotools (COCO's convention). One row per referring
sentence (``id`` = ``NAME-REF-SENT``, NAME the dataset's; the usual evaluation protocol), or with
``per="ref"`` one row per ref with its first sentence (``NAME-REF``; how Seg-Zero built its training
set). Queries are the ``raw`` sentences, stripped.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path
from typing import Iterator

from PIL import Image

from data.masks import bbox_from_mask, coco_segmentation_mask, encode_rle, points_from_mask

log = logging.getLogger(__name__)


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers only: a refs file never needs a class, and refusing them keeps a
    tampered file from running code."""
    ALLOWED = {("builtins", n) for n in ("set", "frozenset", "dict", "list", "tuple")} | \
              {("__builtin__", n) for n in ("set", "frozenset", "dict", "list", "tuple")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class("builtins", name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a refs file")


def load_refs(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return _PlainUnpickler(f).load()


def refcocog_rows(root: str | Path, images: str | Path, split: str, per: str = "sentence",
                  refs_file: str = "refs(umd).p", name: str = "refcocog") -> Iterator[dict]:
    """Rows of one split (train/val/test; RefCOCO/+: val/testA/testB) of dataset ``name`` (ids and
    ``source``). Missing images and empty masks are skipped (logged)."""
    root, images = Path(root), Path(images)
    coco = json.loads((root / "instances.json").read_text())
    image_info = {im["id"]: im for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    refs = [r for r in load_refs(root / refs_file) if r["split"] == split]
    if not refs:
        raise ValueError(f"no refs with split {split!r} in {root / refs_file}")
    for ref in refs:
        try:
            info, ann = image_info[ref["image_id"]], anns[ref["ann_id"]]
            h, w = int(info["height"]), int(info["width"])
            data = (images / info["file_name"]).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                if im.size != (w, h):
                    raise ValueError(f"image is {im.size}, instances.json says {(w, h)}")
            mask = coco_segmentation_mask(ann["segmentation"], h, w)
            if not mask.any():
                raise ValueError("empty mask")
        except Exception as exc:
            log.warning("skipping ref %s: %s", ref.get("ref_id"), exc)
            continue
        common = {"image": data, "height": h, "width": w, "mask": encode_rle(mask), "bbox": bbox_from_mask(mask),
                  "points": points_from_mask(mask), "source": name}
        sentences = [s for s in ref["sentences"] if s.get("raw", "").strip()]
        if per == "ref":
            sentences = sentences[:1]
        for s in sentences:
            row_id = f"{name}-{ref['ref_id']}" if per == "ref" else f"{name}-{ref['ref_id']}-{s['sent_id']}"
            yield {"id": row_id, "problem": s["raw"].strip(), **common}
