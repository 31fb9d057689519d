"""Converts public datasets to this project's Parquet rows (DESIGN §4).

    python -m data.convert segzero        --in DIR_OR_FILE --out OUT.parquet [--split train] [--coord-size 840]
    python -m data.convert visionreasoner --in DIR_OR_FILE --out OUT.parquet [--split train] [--coord-size 840]
    python -m data.convert reasonseg      --in ReasonSeg   --out OUT.parquet --split val [--first-query]
    python -m data.convert refcocog       --in refcocog    --out OUT.parquet --split val --images train2014 [--per ref]
    python -m data.convert refcoco        --in refcoco     --out OUT.parquet --split testA   (refcoco+ alike)

segzero / visionreasoner read the released Hugging Face sets (``*.parquet`` as downloaded, or ``*.arrow``
written by ``save_to_disk``): training rows ``id, problem, solution, image, img_height, img_width``
(see data/segzero.py for their 840x840 coordinate space; multi-object solutions go to ``objects``), and
evaluation rows ``text, mask (2-D bool), image, image_id, ann_id`` (e.g. ReasonSeg_test), whose masks
become RLEs. In those evaluation sets ReasonSeg's ignore pixels are already merged into the mask; use
the reasonseg converter on LISA's files to keep them apart. Ground-truth bbox/points always come from
the mask when there is one.
"""
from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from data.masks import bbox_from_mask, encode_rle, points_from_mask
from data.schema import write_rows
from data.segzero import SEGZERO_COORD_SIZE, image_bytes_of, released_row_to_schema

log = logging.getLogger(__name__)


def table_files(path: str | Path, split: str | None = None) -> list[Path]:
    """Parquet/Arrow files at ``path`` (a file or a directory searched recursively), optionally only
    those whose path below ``path`` mentions ``split`` (``data/train-0000.parquet``, ``train/data.arrow``)."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
    if split:
        files = [p for p in files if split in p.relative_to(path).as_posix()]
    if not files:
        raise FileNotFoundError(f"no .parquet/.arrow files{' for split ' + split if split else ''} in {path}")
    return files


def iter_table_rows(files: list[Path], batch_size: int = 64) -> Iterator[dict]:
    """Rows of Parquet or Arrow IPC (stream or file) tables, a batch at a time."""
    for f in files:
        if f.suffix == ".parquet":
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                yield from batch.to_pylist()
            continue
        with pa.memory_map(str(f)) as source:
            try:
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                yield from batch.to_pylist()


def released_row(row: dict, coord_size: int = SEGZERO_COORD_SIZE) -> dict:
    """A released training row (solution string) or evaluation row (text + mask) -> our row."""
    if row.get("solution") is not None:
        return released_row_to_schema(row, coord_size)
    mask = np.asarray(row["mask"], dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError("mask is empty or not 2-D")
    data = image_bytes_of(row["image"])
    with Image.open(io.BytesIO(data)) as im:
        if im.size != (mask.shape[1], mask.shape[0]):
            raise ValueError(f"image is {im.size}, mask is {mask.shape[::-1]}")
    row_id = row.get("id") or f"{row['image_id']}_{row['ann_id']}"
    return {"id": str(row_id), "image": data, "height": mask.shape[0],
            "width": mask.shape[1], "problem": str(row["text"]).strip(), "mask": encode_rle(mask),
            "bbox": bbox_from_mask(mask), "points": points_from_mask(mask), "source": row.get("source", "segzero_eval")}


def _checked(rows: Iterator[dict], convert) -> Iterator[dict]:
    skipped = 0
    for i, row in enumerate(rows):
        try:
            yield convert(row)
        except Exception as exc:
            skipped += 1
            log.warning("skipping input row %d (id %s): %s", i, row.get("id"), exc)
    if skipped:
        log.warning("%d input rows skipped", skipped)


def convert_released(src: str | Path, out: str | Path, split: str | None = None,
                     coord_size: int = SEGZERO_COORD_SIZE) -> Path:
    files = table_files(src, split)
    rows = _checked(iter_table_rows(files), lambda r: released_row(r, coord_size))
    return write_rows(out, tqdm(rows, desc=f"convert {Path(src).name}", unit="row"),
                      extra=("objects", "orig_height", "orig_width"))


def convert_reasonseg(src, out, split=None, first_query=False) -> Path:
    from data.reasonseg import reasonseg_rows
    rows = reasonseg_rows(src, split, first_query)
    return write_rows(out, tqdm(rows, desc="convert ReasonSeg", unit="row"), extra=("ignore_mask", "is_sentence"))


# refer's refs pickle of each dataset: UMD's split for RefCOCOg, UNC's (val, testA, testB) for RefCOCO/+
REFS_FILES = {"refcocog": "refs(umd).p", "refcoco": "refs(unc).p", "refcoco+": "refs(unc).p"}


def convert_refcocog(src, out, split, images=None, per="sentence", refs_file=None, name="refcocog") -> Path:
    """RefCOCOg, RefCOCO or RefCOCO+ (``name``; one layout, data/refcocog.py)."""
    from data.refcocog import refcocog_rows
    images = Path(images) if images else Path(src).parent / "images" / "mscoco" / "images" / "train2014"
    rows = refcocog_rows(src, images, split, per, refs_file or REFS_FILES[name], name)
    return write_rows(out, tqdm(rows, desc=f"convert {name} {split}", unit="row"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=["segzero", "visionreasoner", "reasonseg", *REFS_FILES])
    p.add_argument("--in", dest="src", required=True, help="input file or directory")
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--split", help="train/val/test (required for refcocog; refcoco/refcoco+: val/testA/testB)")
    p.add_argument("--coord-size", type=int, default=SEGZERO_COORD_SIZE,
                   help="segzero/visionreasoner: side of the square space the solutions' coordinates live in")
    p.add_argument("--first-query", action="store_true", help="reasonseg: only text[0] of each image (Seg-Zero)")
    p.add_argument("--images", help="refcoco*: COCO train2014 image folder (default: LISA layout next to --in)")
    p.add_argument("--per", choices=["sentence", "ref"], default="sentence",
                   help="refcoco*: one row per sentence, or per ref with its first sentence")
    p.add_argument("--refs", help="refcoco*: refs pickle inside --in (default: refs(umd).p for refcocog, "
                   "refs(unc).p for refcoco and refcoco+)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.dataset in ("segzero", "visionreasoner"):
        out = convert_released(args.src, args.out, args.split, args.coord_size)
    elif args.dataset == "reasonseg":
        out = convert_reasonseg(args.src, args.out, args.split, args.first_query)
    else:
        if not args.split:
            p.error(f"{args.dataset} needs --split (train|val|test, or testA|testB for refcoco and refcoco+)")
        out = convert_refcocog(args.src, args.out, args.split, args.images, args.per, args.refs, args.dataset)
    print(f"wrote {pq.ParquetFile(out).metadata.num_rows} rows to {out}")


if __name__ == "__main__":
    main()
