"""Content-disjoint held-out splits: what a row asks, which split that content belongs to, and how many
held-out rows ask what a training row asks.

A row's content is its query and its target mask(s): ``content_key`` = the problem text and the masks'
COCO RLE strings. Two rows with one key ask the same question about the same pixels, whatever else
the image holds. The synthetic generator assigns every key to one split by a fixed hash
(``content_split``: 80% train, 10% val, 10% test) and draws a split's rows only from its keys, so
no held-out row shares a key with a training row by construction; ``count_shared`` counts it for any
pair of files (the job logs it for every held-out split at start). Rows without a mask are not counted.
"""
from __future__ import annotations

import hashlib
import logging

import pyarrow.parquet as pq

from data.dataset import parquet_files

log = logging.getLogger(__name__)

SPLIT_SHARES = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}


def content_key(problem: str, masks: list[dict]) -> str:
    """The query and the target masks (RLE dicts, any order) of one row."""
    return " | ".join([problem.strip(), *sorted(m["counts"] for m in masks)])


def content_split(key: str) -> str:
    """The split a content key belongs to: the key's hash, uniform in [0, 1), against SPLIT_SHARES."""
    u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64
    return next(name for name, (low, high) in SPLIT_SHARES.items() if low <= u < high)


def file_keys(path) -> list[str]:
    """The content key of every row of a Parquet file or directory that has a mask (images not read)."""
    keys = []
    for f in parquet_files(path):
        table = pq.read_table(f, columns=["problem", "mask"])
        for problem, mask in zip(table.column("problem").to_pylist(), table.column("mask").to_pylist()):
            if mask:
                keys.append(content_key(problem, mask if isinstance(mask, list) else [mask]))
    return keys


def count_shared(train_path, held_out_path) -> int:
    """Rows of ``held_out_path`` whose query and target mask(s) are some training row's."""
    seen = set(file_keys(train_path))
    return sum(key in seen for key in file_keys(held_out_path))
