"""The dataset row schema (DESIGN §4) and a streaming Parquet writer for it.

Columns: id (str), image (encoded PNG/JPEG bytes), height, width (ints, the image's size), problem
(query), mask (COCO RLE {"size": [h, w], "counts": str}, null when unknown), bbox [x1,y1,x2,y2] and
points [[x,y],[x,y]] (ints, image pixels), source (str). Writers may add columns (EXTRA_FIELDS).
A multi-object file may declare ``mask`` as a list of RLEs instead (MULTI_MASK_FIELD); readers accept both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
ROW_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("problem", pa.string(), nullable=False),
    pa.field("mask", RLE_TYPE),
    pa.field("bbox", pa.list_(pa.int32())),
    pa.field("points", pa.list_(pa.list_(pa.int32()))),
    pa.field("source", pa.string()),
]
MULTI_MASK_FIELD = pa.field("mask", pa.list_(RLE_TYPE))
# Optional columns some writers add; readers ignore the ones they do not know.
EXTRA_FIELDS = {
    "ignore_mask": pa.field("ignore_mask", RLE_TYPE),        # ReasonSeg "ignore" regions
    "reasoning": pa.field("reasoning", pa.string()),         # short think text for the warm start
    "kind": pa.field("kind", pa.string()),                   # synthetic query kind
    "objects": pa.field("objects", pa.string()),             # multi-object JSON [{"bbox_2d","point_2d"}]
    "orig_height": pa.field("orig_height", pa.int32()),      # original size when the image is resized
    "orig_width": pa.field("orig_width", pa.int32()),
    "is_sentence": pa.field("is_sentence", pa.bool_()),      # ReasonSeg: long query vs short phrase
}


def row_schema(extra: Iterable[str] = (), multi_mask: bool = False) -> pa.Schema:
    fields = [MULTI_MASK_FIELD if multi_mask and f.name == "mask" else f for f in ROW_FIELDS]
    return pa.schema(fields + [EXTRA_FIELDS[name] for name in extra])


def write_rows(path: str | Path, rows: Iterable[dict], extra: Iterable[str] = (),
               row_group_size: int = 64, multi_mask: bool = False) -> Path:
    """Streams ``rows`` (dicts with the schema's keys) into a Parquet file, ``row_group_size`` rows per
    row group, so neither writing nor (shuffled) reading ever holds more than a few groups of images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = row_schema(extra, multi_mask)
    names = schema.names
    buffer: list[dict] = []
    with pq.ParquetWriter(path, schema) as writer:
        def flush():
            columns = {n: [r.get(n) for r in buffer] for n in names}
            writer.write_table(pa.table(columns, schema=schema), row_group_size=row_group_size)
            buffer.clear()
        for row in rows:
            buffer.append(row)
            if len(buffer) == row_group_size:
                flush()
        if buffer:
            flush()
    return path
