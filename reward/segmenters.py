"""Promptable segmenters behind one interface: box + points in, one boolean mask per prompt out.

    seg.set_image(image_id, image_rgb)        # HxWx3 uint8; encoded once, LRU-cached by image_id
    masks = seg.predict(boxes, points)        # [K,4], [K,P,2] float pixels -> bool [K,H,W], one call

- Sam2Segmenter: SAM2's image predictor (production). All K prompts of a group go to the mask
  decoder in ONE batched `predict` (SAM2 repeats the image embedding over the prompt batch).
- GrabCutSegmenter: OpenCV GrabCut, weight-free, the embedded default: the box initialises the
  probable foreground, the points are sure foreground. It gives a real mask signal on the synthetic
  shapes dataset (plain backgrounds), where a random-weight SAM2 would not.
"""
from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)


def image_key(image: np.ndarray) -> str:
    """A cache key of an image by its content (pixels and shape): two samples that share an image share
    its encoding, and two different images never do, whatever their sample ids say."""
    import hashlib

    image = np.ascontiguousarray(image)
    return hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).hexdigest()


class Segmenter(ABC):
    """LRU cache of per-image state (the "embedding") shared by the segmenters.

    Subclasses define `_encode(image) -> state`, `_restore(state)` and `predict(boxes, points)`.
    """

    def __init__(self, cache_size: int):
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def set_image(self, image_id, image: np.ndarray) -> bool:
        """Make `image` the current image; returns True when its state came from the cache."""
        state = self._cache.get(image_id)
        hit = state is not None
        if hit:
            self._cache.move_to_end(image_id)
            self.hits += 1
        else:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
            state = self._encode(image)
            self.misses += 1
            if self.cache_size > 0:
                self._cache[image_id] = state
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        self._restore(state)
        return hit

    @abstractmethod
    def _encode(self, image: np.ndarray):
        """The per-image state to cache (SAM2: the image embedding and sizes)."""

    @abstractmethod
    def _restore(self, state) -> None:
        """Make a cached state the current image."""

    @abstractmethod
    def predict(self, boxes: np.ndarray, points: np.ndarray, best_of_three: bool = False) -> np.ndarray:
        """boxes [K,4], points [K,P,2] (image pixels) -> bool masks [K,H,W], in one batched call.

        best_of_three: SAM2's three candidate masks per prompt (multimask_output=True), keeping the one
        with the highest predicted IoU, as Seg-Zero's and VisionReasoner's evaluation scripts do; the
        default is one mask per prompt (multimask_output=False). Segmenters with one mask ignore it."""


class Sam2Segmenter(Segmenter):
    """SAM2 image predictor; the cache holds its `_features` (image embedding + high-res feature
    maps) and `_orig_hw`, so a cached image skips the image encoder entirely."""

    def __init__(self, config_name: str, checkpoint: str | None = None, device: str = "cpu",
                 allow_random_weights: bool = False, cache_size: int = 64):
        super().__init__(cache_size)
        import torch
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        if checkpoint is None:
            if not allow_random_weights:
                raise ValueError("Sam2Segmenter needs a checkpoint path (random weights are for tests only)")
            logger.warning("SAM2 with RANDOM weights (%s): masks carry no meaning", config_name)
        elif not Path(checkpoint).is_file():
            raise FileNotFoundError(f"SAM2 checkpoint not found: {checkpoint}")
        self.device = torch.device(device)
        self.predictor = SAM2ImagePredictor(build_sam2(config_name, ckpt_path=checkpoint, device=str(self.device)))
        self._torch = torch

    def _autocast(self):
        # bf16 on GPU (SAM2's own recipe); fp32 on CPU, where bf16 autocast is slower.
        if self.device.type == "cuda":
            return self._torch.autocast("cuda", dtype=self._torch.bfloat16)
        return contextlib.nullcontext()

    def _encode(self, image):
        if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only arrays
            image = image.copy()
        with self._torch.inference_mode(), self._autocast():
            self.predictor.set_image(image)
        return self.predictor._features, self.predictor._orig_hw

    def _restore(self, state):
        self.predictor.reset_predictor()
        self.predictor._features, self.predictor._orig_hw = state
        self.predictor._is_image_set = True

    def predict(self, boxes, points, best_of_three: bool = False):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        points = np.asarray(points, dtype=np.float32).reshape(len(boxes), -1, 2)
        k = len(boxes)
        with self._torch.inference_mode(), self._autocast():
            masks, scores, _ = self.predictor.predict(
                point_coords=points, point_labels=np.ones(points.shape[:2], dtype=np.int32),
                box=boxes, multimask_output=best_of_three)
        h, w = self.predictor._orig_hw[0]
        masks = masks.reshape(k, -1, h, w)  # [K,C,H,W] (K>1) or [C,H,W] (K=1) -> [K,C,H,W], C = 1 or 3
        best = np.asarray(scores, dtype=np.float32).reshape(k, -1).argmax(axis=1)
        return masks[np.arange(k), best] > 0


class GrabCutSegmenter(Segmenter):
    """OpenCV GrabCut: GC_PR_FGD inside the box, GC_FGD discs at the points, GC_BGD elsewhere.

    Each prompt is cut on a crop around its box (half a box side of margin) so cost scales with the
    object, not the image. When GrabCut cannot run (no background pixels left, degenerate box), the
    box itself is the mask.
    """

    ITERATIONS = 5

    def _encode(self, image):
        return np.ascontiguousarray(image)

    def _restore(self, state):
        self.image = state

    def predict(self, boxes, points, best_of_three: bool = False):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        points = np.asarray(points, dtype=np.float64).reshape(len(boxes), -1, 2)
        h, w = self.image.shape[:2]
        masks = np.zeros((len(boxes), h, w), dtype=bool)
        for k, (box, pts) in enumerate(zip(boxes, points)):
            masks[k] = self._cut(box, pts, h, w)
        return masks

    def _cut(self, box, pts, h, w) -> np.ndarray:
        x1, x2 = sorted(np.clip(np.rint(box[[0, 2]]), 0, w - 1).astype(int))
        y1, y2 = sorted(np.clip(np.rint(box[[1, 3]]), 0, h - 1).astype(int))
        full = np.zeros((h, w), dtype=bool)
        full[y1:y2 + 1, x1:x2 + 1] = True  # fallback: the box
        margin = max(x2 - x1, y2 - y1) // 2 + 4
        cx1, cy1 = max(0, x1 - margin), max(0, y1 - margin)
        cx2, cy2 = min(w, x2 + margin + 1), min(h, y2 + margin + 1)
        crop = np.ascontiguousarray(self.image[cy1:cy2, cx1:cx2])
        gc = np.full(crop.shape[:2], cv2.GC_BGD, dtype=np.uint8)
        gc[y1 - cy1:y2 - cy1 + 1, x1 - cx1:x2 - cx1 + 1] = cv2.GC_PR_FGD
        radius = max(1, min(x2 - x1, y2 - y1) // 20)
        for x, y in np.clip(np.rint(pts), 0, [w - 1, h - 1]).astype(int):
            cv2.circle(gc, (int(x - cx1), int(y - cy1)), radius, int(cv2.GC_FGD), -1)
        if (gc == cv2.GC_BGD).sum() == 0 or (gc != cv2.GC_BGD).sum() == 0:
            return full
        try:
            cv2.setRNGSeed(0)  # GrabCut's k-means initialisation draws from OpenCV's global RNG
            cv2.grabCut(crop, gc, None, np.zeros((1, 65)), np.zeros((1, 65)), self.ITERATIONS,
                        cv2.GC_INIT_WITH_MASK)
        except cv2.error as exc:
            logger.debug("GrabCut failed (%s); using the box as the mask", exc)
            return full
        out = np.zeros((h, w), dtype=bool)
        out[cy1:cy2, cx1:cx2] = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        return out


def make_segmenter(cfg, device: str = "cpu") -> Segmenter:
    """The segmenter named by `cfg` (config.RewardConfig)."""
    if cfg.segmenter == "sam2":
        return Sam2Segmenter(cfg.sam2_config, cfg.sam2_checkpoint, device,
                             cfg.sam2_allow_random_weights, cfg.embedding_cache_size)
    logger.info("reward segmenter: OpenCV GrabCut (weight-free default; set reward.segmenter=sam2 "
                "reward.sam2_checkpoint=PATH for SAM2)")
    return GrabCutSegmenter(cfg.embedding_cache_size)
