"""Checkpoints of a whole job, kept per run: learner (DeepSpeed: weights, optimizer, LR schedule, per
rank) + driver state (step, weight version, data position, RNG states, MLflow run id, and in one-step
off-policy mode the round already generated for the next step).

Layout: ``<output_dir>/checkpoints/<run id>/step_000010/{deepspeed files, driver.pt}`` and
``<output_dir>/checkpoints/latest`` naming the newest complete one (``<run id>/step_000010``). The run
id is the MLflow run's, so a resumed job writes next to its own earlier checkpoints, and another run
in the same output dir never shares, prunes or overwrites them.

Atomic: everything is written into ``step_000010.tmp`` and renamed when complete, then ``latest`` is
replaced (os.replace); a crash while saving leaves the previous checkpoint and ``latest`` untouched.
Pruning keeps the ``keep`` most recently WRITTEN checkpoints of the run (never the one just written,
whatever its step number), and never touches another run's. With several nodes, ``<output_dir>`` must
be on storage every learner rank sees.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)
WRITTEN = "written"  # per checkpoint: its number in the run's write order (pruning keeps the newest)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(output_dir: str | Path, run_id: str, step: int, write_learner: Callable[[Path], None],
         driver_state: dict, keep: int) -> Path:
    """Writes one checkpoint of run ``run_id``: ``write_learner(dir)`` (every rank's DeepSpeed state),
    then driver.pt; updates ``latest``; prunes this run's older checkpoints. Returns its directory."""
    root = checkpoint_root(output_dir)
    final = root / run_id / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_learner(tmp)
    torch.save({**driver_state, "rng": rng_state()}, tmp / "driver.pt")
    earlier = [_written(p) for p in (root / run_id).glob("step_*") if p != tmp]
    (tmp / WRITTEN).write_text(str(max(earlier, default=0) + 1))
    shutil.rmtree(final, ignore_errors=True)  # the same run's step written before a --resume from earlier
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(f"{run_id}/{final.name}")
    os.replace(pointer, root / "latest")
    _prune(root / run_id, keep, final)
    others = [p.name for p in root.iterdir() if p.is_dir() and p.name != run_id]
    if others:
        log.info("checkpoints of other runs in %s are left alone: %s", root, ", ".join(sorted(others)[:5]))
    return final


def _written(ckpt: Path) -> int:
    """The checkpoint's place in its run's write order (0 when unknown)."""
    try:
        return int((ckpt / WRITTEN).read_text())
    except (OSError, ValueError):
        return 0


def _prune(run_dir: Path, keep: int, written: Path) -> None:
    """Deletes all but the ``keep`` most recently written complete checkpoints of one run."""
    complete = [p for p in run_dir.glob("step_*") if p.is_dir() and (p / "driver.pt").exists() and p != written]
    complete.sort(key=_written)
    for old in complete[:max(0, len(complete) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | Path | None, output_dir: str | Path) -> Path:
    """A checkpoint directory from --resume's argument: a step_* dir, a checkpoints dir or an output
    dir (their ``latest``), or nothing (the job's own latest)."""
    p = Path(path) if path else Path(output_dir)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "driver.pt").exists():
            return candidate
        if (candidate / "latest").exists():
            named = candidate / (candidate / "latest").read_text().strip()
            if not (named / "driver.pt").exists():
                raise FileNotFoundError(f"--resume: {candidate / 'latest'} names {named}, which holds no checkpoint")
            return named
    raise FileNotFoundError(f"--resume: no checkpoint found at {p} (expected a step_* directory or a 'latest' file)")


def load_driver_state(ckpt: Path) -> dict:
    state = torch.load(ckpt / "driver.pt", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
