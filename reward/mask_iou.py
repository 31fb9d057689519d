"""Mask IoU against the ground truth, the mask reward modes, and model-space -> image-space mapping.

Modes (config `reward.mask_iou`):
- continuous: the IoU itself, in [0, 1].
- threshold:  1 if IoU > threshold else 0.
- tiered:     4 if IoU >= 0.8, 3 if IoU >= 0.7, 2 if IoU >= 0.5, else 0 (SAM-R1's tiers as this
              project's brief states them; the SAM-R1 paper text was not reachable to check the
              boundaries, so ">=" is this project's choice).
"""
from __future__ import annotations

import numpy as np

TIERS = ((0.8, 4.0), (0.7, 3.0), (0.5, 2.0))
MODE_RANGE = {"off": (0.0, 0.0), "continuous": (0.0, 1.0), "threshold": (0.0, 1.0), "tiered": (0.0, 4.0)}


def mask_iou(pred: np.ndarray, gt: np.ndarray, empty: float = 0.0) -> float:
    """|P ∩ G| / |P ∪ G| of two boolean HxW masks; `empty` when both are empty (Seg-Zero counts that
    as 0, LISA as 1). Shapes must match."""
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return float(empty)
    return float(np.logical_and(pred, gt).sum() / union)


def mask_reward(iou: float, mode: str, threshold: float = 0.5) -> float:
    """The mask term from an IoU, by mode (see the module docstring)."""
    if mode == "continuous":
        return float(iou)
    if mode == "threshold":
        return 1.0 if iou > threshold else 0.0
    if mode == "tiered":
        return next((value for bound, value in TIERS if iou >= bound), 0.0)
    if mode == "off":
        return 0.0
    raise ValueError(f"unknown mask reward mode {mode!r}")


def to_original(boxes, points, model_size: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Model-space (model_size x model_size) coordinates -> original image pixels.

    x' = x * width / model_size, y' = y * height / model_size (Seg-Zero's x_factor/y_factor), then
    clamped to the image, x' in [0, width-1], y' in [0, height-1], so that a prompt outside the image
    stays a usable prompt. boxes [K,4] (x1,y1,x2,y2), points [K,P,2] -> float32 arrays, same shapes.
    """
    sx, sy = width / model_size, height / model_size
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [sx, sy, sx, sy]
    points = np.asarray(points, dtype=np.float64)
    points = points.reshape(len(boxes), -1, 2) * [sx, sy]
    lo, hi_box, hi_pt = 0.0, [width - 1, height - 1] * 2, [width - 1, height - 1]
    return (np.clip(boxes, lo, hi_box).astype(np.float32), np.clip(points, lo, hi_pt).astype(np.float32))
