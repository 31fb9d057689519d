"""Training/evaluation samples streamed from Parquet, with a seeded, resumable shuffle.

``ParquetSource(path)`` reads one Parquet file or a directory of them (DESIGN §4 rows, or Seg-Zero /
VisionReasoner released rows: ``problem, solution, image, img_height, img_width``) without ever loading
a whole file: rows are read in *units* (a row group, or a slice of ``chunk_rows`` rows of a larger one).

Order of one epoch (e = epoch number, all draws from numpy generators seeded with (seed, e, ...)):
  1. the units are permuted,
  2. consecutive runs of ``window`` units form a window; the rows of a window are permuted together,
  3. rows are served window after window.
Only the current window's rows are held in memory (encoded bytes, at most window * chunk_rows rows).
``state_dict()`` is (epoch, position in the epoch); a resumed source rebuilds the same permutation and
serves exactly the rows an uninterrupted one would have served next.

Bad rows (undecodable or oversized image, malformed mask, missing fields, inconsistent sizes) are
skipped, counted per reason in ``source.skipped`` and logged with their id; they never raise.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from data.masks import bbox_from_mask, check_rle, decode_rle, points_from_mask
from data.segzero import (
    image_bytes_of,
    multi_object_solution,
    parse_multi_object_solution,
    reference_answer,
    released_row_to_schema,
    solution_string,
)

log = logging.getLogger(__name__)

# Columns a reader may use; others (e.g. Hugging Face metadata) are never read.
KNOWN_COLUMNS = ("id", "image", "height", "width", "problem", "mask", "bbox", "points", "source",
                 "ignore_mask", "objects", "reasoning", "solution", "img_height", "img_width")


@dataclass
class Sample:
    """One query on one image. Coordinates are pixels of ``image`` (its original size)."""
    id: str
    image: Image.Image                 # RGB, original size
    problem: str
    mask_rle: dict | list | None       # COCO RLE (or list: union of objects); None: no mask known
    bbox: list[int]                    # [x1, y1, x2, y2]
    points: list[list[int]]            # [[x, y], [x, y]]
    height: int
    width: int
    source: str
    image_bytes: bytes = b""           # the row's encoded image (what the reward worker decodes)
    ignore_rle: dict | None = None     # pixels excluded from evaluation (ReasonSeg "ignore")
    objects: list[dict] | None = None  # multi-object ground truth [{"bbox_2d", "point_2d"}], image pixels
    reasoning: str | None = None       # short think text for the warm start (synthetic rows)

    def model_image(self, size: int) -> Image.Image:
        """The image the policy sees: resized to size x size (bilinear, as Seg-Zero's evaluation)."""
        return self.image.resize((size, size), Image.BILINEAR)

    def to_model(self, size: int, x, y) -> list[int]:
        """Image pixel -> model-space integer pixel: int(x * size / width + 0.5), clamped to the image."""
        return [min(max(int(x * size / self.width + 0.5), 0), size - 1),
                min(max(int(y * size / self.height + 0.5), 0), size - 1)]

    def model_bbox(self, size: int) -> list[int]:
        x1, y1, x2, y2 = self.bbox
        return self.to_model(size, x1, y1) + self.to_model(size, x2, y2)

    def model_points(self, size: int) -> list[list[int]]:
        return [self.to_model(size, x, y) for x, y in self.points]

    def model_objects(self, size: int) -> list[dict]:
        """Multi-object ground truth in model space: ``objects``, else the one box with point 1."""
        objects = self.objects or [{"bbox_2d": self.bbox, "point_2d": self.points[0]}]
        return [{"bbox_2d": self.to_model(size, *o["bbox_2d"][:2]) + self.to_model(size, *o["bbox_2d"][2:]),
                 "point_2d": self.to_model(size, *o["point_2d"])} for o in objects]

    def solution(self, size: int, rules: str = "segzero") -> str:
        """Ground truth for the reward of rule set ``rules``, model space: Seg-Zero's
        ``<box>..</box><points>..</points>``, or for ``multi_object`` VisionReasoner's JSON list."""
        if rules == "multi_object":
            return multi_object_solution(self.model_objects(size))
        return solution_string(self.model_bbox(size), self.model_points(size))

    def reference_answer(self, size: int, rules: str = "segzero", unit: float = 1.0) -> str:
        """A correct response in model space, in the answer format of ``rules`` (supervised warm start),
        its coordinates in units of ``unit`` model-space pixels (policy/family.py pixels_per_unit: 1 for
        pixels, size / 1000 for Qwen3-VL's relative coordinates), rounded to integers."""
        def units(values):
            return [int(round(v / unit)) for v in values]

        objects = None
        if rules == "multi_object":
            objects = [{"bbox_2d": units(o["bbox_2d"]), "point_2d": units(o["point_2d"])}
                       for o in self.model_objects(size)]
        return reference_answer(self.problem, units(self.model_bbox(size)),
                                [units(p) for p in self.model_points(size)], self.reasoning, objects)


class BadRow(ValueError):
    """A row that cannot become a Sample; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _rle_of(value, height: int, width: int):
    """Mask cell (dict, list of dicts, JSON string or None) -> validated RLE of size (height, width)."""
    if isinstance(value, str):
        value = json.loads(value)
    if value is None or value == []:
        return None
    for rle in value if isinstance(value, list) else [value]:
        if check_rle(rle) != (height, width):
            raise ValueError(f"mask size {rle['size']} != image size {[height, width]}")
    return value


def _ints(value, shape: tuple[int, ...]) -> list:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape or not np.isfinite(arr).all():
        raise ValueError(f"expected shape {shape}, got {arr.shape}")
    return np.rint(arr).astype(int).tolist()


def row_to_sample(row: dict, max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> Sample:
    """Validates and decodes one row (this project's schema or a released Seg-Zero row). Raises BadRow."""
    for key in ("id", "image", "problem"):
        if row.get(key) is None:
            raise BadRow("missing_field", key)
    if row.get("solution") is not None and row.get("bbox") is None and row.get("mask") is None:
        try:
            row = {**row, **released_row_to_schema(row)}
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRow("bad_solution", str(exc)) from None
        except Exception as exc:  # unreadable image header
            raise BadRow("bad_image", str(exc)) from None
    try:
        data = image_bytes_of(row["image"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
        width, height = im.size
    except Image.DecompressionBombError as exc:
        raise BadRow("image_too_large", str(exc)) from None
    except Exception as exc:
        raise BadRow("bad_image", str(exc)) from None
    if max_image_pixels and width * height > max_image_pixels:
        raise BadRow("image_too_large", f"{width}x{height} > {max_image_pixels} pixels")
    try:
        image = im.convert("RGB")  # decodes the pixels
    except Exception as exc:
        raise BadRow("bad_image", str(exc)) from None
    if row.get("height") is not None and row.get("width") is not None and \
            (int(row["height"]), int(row["width"])) != (height, width):
        raise BadRow("size_mismatch", f"row says {row['width']}x{row['height']}, image is {width}x{height}")
    try:
        mask = _rle_of(row.get("mask"), height, width)
        ignore = _rle_of(row.get("ignore_mask"), height, width)
    except Exception as exc:
        raise BadRow("bad_mask", str(exc)) from None
    try:
        bbox, points = row.get("bbox"), row.get("points")
        if (bbox is None or points is None) and mask is not None:
            pixels = decode_rle(mask)
            bbox, points = bbox_from_mask(pixels), points_from_mask(pixels)
        if bbox is None or points is None:
            raise BadRow("missing_field", "bbox/points (and no mask to derive them from)")
        bbox, points = _ints(bbox, (4,)), _ints(points, (2, 2))
        x1, y1, x2, y2 = bbox
        if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):  # x2 == width: exclusive convention
            raise ValueError(f"bbox {bbox} outside the {width}x{height} image or inverted")
        if not all(0 <= x < width and 0 <= y < height for x, y in points):
            raise ValueError(f"points {points} outside the {width}x{height} image")
        objects = parse_multi_object_solution(row["objects"]) if row.get("objects") else None
    except BadRow:
        raise
    except Exception as exc:
        raise BadRow("bad_geometry", str(exc)) from None
    problem = str(row["problem"]).strip()
    if not problem:
        raise BadRow("missing_field", "problem is empty")
    return Sample(id=str(row["id"]), image=image, problem=problem, mask_rle=mask, bbox=bbox, points=points,
                  height=height, width=width, source=str(row.get("source") or "unknown"), image_bytes=data,
                  ignore_rle=ignore, objects=objects, reasoning=row.get("reasoning"))


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, or every ``*.parquet`` under a directory (sorted)."""
    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"no Parquet file at {path}")
    return files


class ParquetSource:
    """Endless, seeded, resumable stream of Samples (see the module docstring for the order)."""

    def __init__(self, path: str | Path, seed: int = 0, shuffle: bool = True, window: int = 4,
                 chunk_rows: int = 128, max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS):
        self.files = parquet_files(path)
        self.seed, self.shuffle, self.window, self.chunk_rows = seed, shuffle, max(window, 1), max(chunk_rows, 1)
        self.max_image_pixels = max_image_pixels
        self._parquet: dict[int, pq.ParquetFile] = {}
        self.units: list[tuple[int, int, int, int]] = []  # (file index, row group, first row, rows)
        for f in range(len(self.files)):
            meta = self._file(f).metadata
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                if n > 4 * self.chunk_rows:
                    log.warning("%s: row group %d has %d rows; rows are read in slices of %d (re-write it "
                                "with smaller row groups for faster shuffled reads)", self.files[f], rg, n,
                                self.chunk_rows)
                self.units += [(f, rg, s, min(self.chunk_rows, n - s)) for s in range(0, n, self.chunk_rows)]
        self.num_rows = sum(u[3] for u in self.units)
        if self.num_rows == 0:
            raise ValueError(f"no rows in {path}")
        self.epoch, self.position = 0, 0
        self.skipped: Counter = Counter()
        self._skipped_before: Counter = Counter()  # at the start of this epoch
        self._window: tuple[int, int, int, list] | None = None  # (epoch, window index, first position, rows)

    def __len__(self) -> int:
        return self.num_rows

    def _file(self, f: int) -> pq.ParquetFile:
        if f not in self._parquet:
            self._parquet[f] = pq.ParquetFile(self.files[f])
        return self._parquet[f]

    def _read_unit(self, unit) -> list:
        """Rows of one unit as dicts (only KNOWN_COLUMNS). An unreadable unit gives Nones (skipped rows)."""
        f, rg, start, length = unit
        try:
            pf = self._file(f)
            columns = [c for c in pf.schema_arrow.names if c in KNOWN_COLUMNS]
            rows, offset = [], 0
            for batch in pf.iter_batches(batch_size=self.chunk_rows, row_groups=[rg], columns=columns):
                lo, hi = max(start, offset) - offset, min(start + length, offset + batch.num_rows) - offset
                if hi > lo:
                    rows += batch.slice(lo, hi - lo).to_pylist()
                offset += batch.num_rows
                if offset >= start + length:
                    break
            if len(rows) != length:
                raise ValueError(f"read {len(rows)} rows, expected {length}")
            return rows
        except Exception as exc:
            log.warning("%s: row group %d rows %d..%d unreadable: %s", self.files[f], rg, start, start + length, exc)
            return [None] * length

    def _epoch_windows(self, epoch: int) -> list[list[int]]:
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.units))
        return [order[i:i + self.window].tolist() for i in range(0, len(order), self.window)]

    def _row_at(self, epoch: int, position: int):
        """The raw row served at ``position`` of ``epoch`` (loads its window if needed)."""
        w = self._window
        if w is None or w[0] != epoch or not w[2] <= position < w[2] + len(w[3]):
            first = 0
            for index, units in enumerate(self._epoch_windows(epoch)):
                size = sum(self.units[u][3] for u in units)
                if position < first + size:
                    break
                first += size
            rows = [r for u in units for r in self._read_unit(self.units[u])]
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, index + 1]).permutation(len(rows))
                rows = [rows[i] for i in perm]
            self._window = w = (epoch, index, first, rows)
        return w[3][position - w[2]]

    def _sample(self, row) -> Sample | None:
        try:
            if row is None:
                raise BadRow("unreadable")
            return row_to_sample(row, self.max_image_pixels)
        except BadRow as exc:
            row_id = row.get("id") if isinstance(row, dict) else None
            self.skipped[exc.reason] += 1
            log.warning("skipping row %s: %s", row_id, exc)
            return None

    def next_batch(self, k: int) -> list[Sample]:
        """The next k valid samples, crossing into the next epoch (new order) when one ends."""
        batch, misses = [], 0
        while len(batch) < k:
            if self.position >= self.num_rows:
                self._end_epoch()
                self.epoch, self.position = self.epoch + 1, 0
            sample = self._sample(self._row_at(self.epoch, self.position))
            self.position += 1
            if sample is None:
                misses += 1
                if misses >= self.num_rows:
                    raise RuntimeError(f"no valid row in {self.num_rows} consecutive rows of {self.files[0]}...: "
                                       f"skipped {dict(self.skipped)}")
            else:
                batch.append(sample)
                misses = 0
        return batch

    def _end_epoch(self) -> None:
        """One summary line per epoch: rows served and skipped (by reason), this epoch and in all."""
        now = self.skipped - self._skipped_before
        log.info("epoch %d of %s done: %d rows, %d served, %d skipped%s (all epochs: %s)", self.epoch, self.files[0],
                 self.num_rows, self.num_rows - sum(now.values()), sum(now.values()),
                 f" {dict(now)}" if now else "", dict(self.skipped) or "none skipped")
        self._skipped_before = Counter(self.skipped)

    def skipped_metrics(self) -> dict[str, int]:
        """``data/skipped_rows/<reason>``: rows skipped so far (all epochs), and their total."""
        return {"data/skipped_rows": sum(self.skipped.values()),
                **{f"data/skipped_rows/{why}": n for why, n in self.skipped.items()}}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "window": self.window, "chunk_rows": self.chunk_rows, "num_rows": self.num_rows,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; the data and the order settings must be the same."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "window", "chunk_rows", "num_rows"):
            if state.get(key, mine[key]) != mine[key]:
                raise ValueError(f"data state mismatch: {key} was {state[key]}, is {mine[key]}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = Counter(state.get("skipped", {}))
        self._skipped_before = Counter(self.skipped)  # the epoch's summary counts from here
        self._window = None

    def iter_epoch(self) -> Iterator[Sample]:
        """One pass over all rows in file order (no shuffle; for evaluation). Does not move the stream."""
        for unit in self.units:
            for row in self._read_unit(unit):
                sample = self._sample(row)
                if sample is not None:
                    yield sample


def iter_samples(path: str | Path, max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> Iterator[Sample]:
    """Every valid sample of a Parquet file or directory once, in file order (bad rows skipped, logged)."""
    yield from ParquetSource(path, shuffle=False, max_image_pixels=max_image_pixels).iter_epoch()
