"""Checkpoints of a whole job: learner (DeepSpeed: weights, optimizer, LR schedule, per rank) + driver
state (step, weight version, data position, RNG states, MLflow run id).

Layout: <output_dir>/checkpoints/step_000010/{deepspeed files, driver.pt} and a ``latest`` file naming
the newest complete one. Atomic: everything is written into ``step_000010.tmp`` and renamed when
complete, then ``latest`` is replaced (os.replace); a crash while saving leaves the previous checkpoint
and ``latest`` untouched. With several nodes, <output_dir> must be on storage every learner rank sees.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import ray
import torch


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(output_dir: str | Path, step: int, learners: list, driver_state: dict, keep: int, timeout_s: float) -> Path:
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get([learner.save_checkpoint.remote(str(tmp)) for learner in learners], timeout=timeout_s)
    torch.save({**driver_state, "rng": rng_state()}, tmp / "driver.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path | None, output_dir: str | Path) -> Path:
    """A checkpoint directory from --resume's argument: a step_* dir, a checkpoints dir or an output
    dir (their ``latest``), or nothing (the job's own latest)."""
    p = Path(path) if path else Path(output_dir)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "driver.pt").exists():
            return candidate
        if (candidate / "latest").exists():
            return candidate / (candidate / "latest").read_text().strip()
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
