"""The data a job reads: the configured Parquet files, or the synthetic set generated once into the
output dir (entry points share these)."""
from __future__ import annotations

from pathlib import Path

from data.dataset import ParquetSource, Sample


def prepare_data(cfg) -> tuple[str, str]:
    """data.train_path / eval_path, or the synthetic shapes set generated once into the output dir
    (multi-object rows when reward.rules is multi_object)."""
    from data.synthetic import write_synthetic

    d, root = cfg.data, Path(cfg.train.output_dir) / "data"
    options = dict(barcodes=d.synthetic_barcodes, kinds=tuple(d.synthetic_kinds), num_shapes=tuple(d.synthetic_shapes),
                   multi_object=cfg.reward.rules == "multi_object")
    train_path = d.train_path or str(write_synthetic(root / "train.parquet", d.synthetic_train_size,
                                                     cfg.model.image_size, d.synthetic_seed, **options))
    eval_path = d.eval_path or str(write_synthetic(root / "eval.parquet", d.synthetic_eval_size,
                                                   cfg.model.image_size, d.synthetic_seed + 1, **options))
    for field, path in (("data.train_path", train_path), ("data.eval_path", eval_path)):
        if not Path(path).exists():
            raise RuntimeError(f"{field}: not found: {path}")
    return train_path, eval_path


def held_out_samples(eval_path: str, n: int) -> list[Sample]:
    """The first n valid rows of the held-out split (the same rows at every evaluation)."""
    samples = []
    for sample in ParquetSource(eval_path, shuffle=False).iter_epoch():
        if len(samples) == n:
            break
        samples.append(sample)
    return samples
