"""The data a job reads: the configured Parquet files, or the synthetic set generated once into the
output dir (entry points share these).

Held-out splits, by the prefix of their metrics: ``val`` selects (the best policy), ``eval`` (the test
split) and ``ood`` report. Synthetic ones are content-disjoint from training (data/splits.py): val and
test draw from their own share of queries and target masks, from other generator seeds (seed + 1, + 2);
the OOD split (seed + 3) draws from the test share, with more shapes per image than training shows and
the kind "the triangle" added.
"""
from __future__ import annotations

import logging
from pathlib import Path

from data.dataset import ParquetSource, Sample

log = logging.getLogger(__name__)

HELD_OUT = ("val", "eval", "ood")


def ood_options(kinds, shapes: tuple[int, int], grid_cells: int, multi_object: bool) -> dict:
    """The OOD split's generator settings: up to two more shapes than training's max (as the grid allows),
    and the shape-only kind(s) added."""
    extra = ["shape"] + (["all_shape"] if multi_object else [])
    most = min(shapes[1] + 2, grid_cells)
    return dict(kinds=tuple(dict.fromkeys([*kinds, *extra])), num_shapes=(min(shapes[1] + 1, most), most))


def prepare_data(cfg) -> tuple[str, dict[str, str]]:
    """data.train_path and the held-out splits {"val", "eval", "ood": path}. A held-out path left empty is
    the synthetic split when the training rows are synthetic (generated once into the output dir), and
    absent otherwise."""
    from data.synthetic import write_synthetic

    d, root, size = cfg.data, Path(cfg.train.output_dir) / "data", cfg.model.image_size
    multi = cfg.reward.rules == "multi_object"
    options = dict(barcodes=d.synthetic_barcodes, kinds=tuple(d.synthetic_kinds),
                   num_shapes=tuple(d.synthetic_shapes), multi_object=multi)
    ood = {**options, **ood_options(d.synthetic_kinds, d.synthetic_shapes, max(size // 28, 2) ** 2, multi)}
    given = {"val": d.val_path, "eval": d.eval_path, "ood": d.ood_path}
    synthetic = {  # (file, seed offset, split of the content keys, generator settings)
        "train": ("train.parquet", 0, "train", options), "val": ("val.parquet", 1, "val", options),
        "eval": ("test.parquet", 2, "test", options), "ood": ("ood.parquet", 3, "test", ood)}

    def generate(role: str, n: int) -> str:
        name, offset, split, settings = synthetic[role]
        return str(write_synthetic(root / name, n, size, d.synthetic_seed + offset, split=split, **settings))

    train_path = d.train_path or generate("train", d.synthetic_train_size)
    held_out = {role: given[role] or generate(role, d.synthetic_eval_size)
                for role in HELD_OUT if given[role] or not d.train_path}
    fields = {"train": "data.train_path", "val": "data.val_path", "eval": "data.eval_path", "ood": "data.ood_path"}
    for role, path in {"train": train_path, **held_out}.items():
        if not Path(path).exists():
            raise RuntimeError(f"{fields[role]}: not found: {path}")
    return train_path, held_out


def log_shared_content(train_path: str, held_out: dict[str, str]) -> dict[str, int]:
    """Counts, per held-out split, the rows that ask a training row's query about its target mask(s)
    (data/splits.py), and logs them (a warning when any split shares some); returns the counts."""
    from data.splits import count_shared

    shared = {role: count_shared(train_path, path) for role, path in held_out.items()}
    message = ", ".join(f"{role} {n}" for role, n in shared.items())
    if any(shared.values()):
        log.warning("held-out rows that ask a training row's query about its target mask: %s (their numbers "
                    "measure recall as much as generalisation)", message)
    else:
        log.info("held-out rows that ask a training row's query about its target mask: %s", message)
    return shared


def held_out_samples(eval_path: str, n: int) -> list[Sample]:
    """The first n valid rows of the held-out split (the same rows at every evaluation)."""
    samples = []
    for sample in ParquetSource(eval_path, shuffle=False).iter_epoch():
        if len(samples) == n:
            break
        samples.append(sample)
    return samples
