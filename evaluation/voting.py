"""Test-time scaling (``evaluate.py --samples K --vote``): K answers per prompt at the rollout temperature,
one prediction made from them.

- ``agreement``: the answer whose mask agrees most with the others' (the highest mean IoU with the other
  K - 1 masks; an answer that does not parse has an empty mask; ties: the earliest) is the prediction: its
  mask, its reward, its box.
- ``majority``: that same answer gives the reward, the box and the reasoning shown; the mask (measured and
  drawn) is the pixel vote of the K masks: a pixel is predicted when more than half of them hold it.

K = 1 is not a vote: the protocol is then the greedy one (one answer at temperature 0).
"""
from __future__ import annotations

import numpy as np

VOTES = ("majority", "agreement")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree (1.0)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def vote(masks: list[np.ndarray | None], shape: tuple[int, int], how: str) -> tuple[int, np.ndarray]:
    """(index of the answer that agrees most with the others, the predicted mask) for one prompt's K masks
    (None: the answer did not parse)."""
    if how not in VOTES:
        raise ValueError(f"unknown vote {how!r}; expected one of {VOTES}")
    filled = [np.zeros(shape, bool) if m is None else m for m in masks]
    k = len(filled)
    agreement = [np.mean([mask_iou(a, b) for j, b in enumerate(filled) if j != i]) if k > 1 else 1.0
                 for i, a in enumerate(filled)]
    pick = int(np.argmax(agreement))
    return pick, filled[pick] if how == "agreement" else np.sum(filled, axis=0) * 2 > k
