"""gIoU and cIoU of predicted masks against ground truth, under an explicit convention.

For sample i with prediction P_i, ground truth G_i and valid pixels V_i:
    I_i = |P_i ∩ G_i ∩ V_i|        U_i = |(P_i ∪ G_i) ∩ V_i|
    IoU_i = I_i / U_i, and IoU_i = empty_empty when U_i = 0 (empty prediction on an empty target)
    gIoU = mean_i IoU_i            cIoU = sum_i I_i / sum_i U_i   (empty_empty when sum_i U_i = 0)
An unparseable answer is an empty prediction: I_i = 0, U_i = |G_i|.

Conventions differ in two places (DESIGN §6), so every result names the one it used:
  empty_empty   1.0 in LISA (``acc_iou[union == 0] += 1``), 0.0 in Seg-Zero (``iou = I/U if U > 0 else 0``).
  ignore        ReasonSeg marks some pixels "ignore". exclude_ignore=True (LISA: ignore_index=255 removes
                them from both I and U): V_i = not ignore. exclude_ignore=False (Seg-Zero's evaluation reads
                the 0/1/255 mask as bool, so ignore pixels count as target): V_i = all, G_i := G_i ∪ ignore.
"""
from __future__ import annotations

import numpy as np

CONVENTIONS = {"lisa": (1.0, True), "segzero": (0.0, False)}


class SegMetrics:
    """Accumulates per-sample intersections and unions; ``result()`` gives gIoU and cIoU."""

    def __init__(self, empty_empty: float = 0.0, exclude_ignore: bool = False):
        self.empty_empty, self.exclude_ignore = float(empty_empty), bool(exclude_ignore)
        self.ious: list[float] = []
        self.intersection = 0
        self.union = 0

    @classmethod
    def from_convention(cls, name: str) -> "SegMetrics":
        """``"lisa"`` (empty-empty 1, ignore excluded) or ``"segzero"`` (empty-empty 0, ignore counted)."""
        return cls(*CONVENTIONS[name])

    @property
    def convention(self) -> str:
        for name, values in CONVENTIONS.items():
            if values == (self.empty_empty, self.exclude_ignore):
                return name
        return f"empty_empty={self.empty_empty:g},ignore={'excluded' if self.exclude_ignore else 'counted'}"

    def add(self, pred_mask: np.ndarray | None, gt_mask: np.ndarray, ignore_mask: np.ndarray | None = None) -> float:
        """Adds one sample (``pred_mask`` None = unparseable answer = empty prediction); returns its IoU."""
        gt = np.asarray(gt_mask, dtype=bool)
        pred = np.zeros_like(gt) if pred_mask is None else np.asarray(pred_mask, dtype=bool)
        if pred.shape != gt.shape or (ignore_mask is not None and np.shape(ignore_mask) != gt.shape):
            raise ValueError(f"mask shapes differ: pred {pred.shape}, gt {gt.shape}, "
                             f"ignore {None if ignore_mask is None else np.shape(ignore_mask)}")
        if ignore_mask is not None:
            ignore = np.asarray(ignore_mask, dtype=bool)
            if self.exclude_ignore:
                pred, gt = pred & ~ignore, gt & ~ignore
            else:
                gt = gt | ignore
        inter, union = int((pred & gt).sum()), int((pred | gt).sum())
        iou = inter / union if union else self.empty_empty
        self.ious.append(iou)
        self.intersection += inter
        self.union += union
        return iou

    def merge(self, other: "SegMetrics") -> None:
        """Adds another accumulator's samples (e.g. from parallel evaluation workers)."""
        if (other.empty_empty, other.exclude_ignore) != (self.empty_empty, self.exclude_ignore):
            raise ValueError(f"cannot merge {other.convention} into {self.convention}")
        self.ious += other.ious
        self.intersection += other.intersection
        self.union += other.union

    def result(self) -> dict:
        """{"giou", "giou_se", "ciou", "n", "convention"}; giou_se is the standard error of gIoU,
        std(IoU_i) / sqrt(n) (sample std); with no samples the metrics are nan."""
        n = len(self.ious)
        giou = float(np.mean(self.ious)) if n else float("nan")
        se = float(np.std(self.ious, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        ciou = (self.intersection / self.union if self.union else self.empty_empty) if n else float("nan")
        return {"giou": giou, "giou_se": se, "ciou": float(ciou), "n": n, "convention": self.convention}
