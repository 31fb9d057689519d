"""RewardWorker: scores one group (G responses to one prompt) with rule terms + segmenter mask IoU.

Plain Python (no Ray): cluster/reward_pool.py runs N of these as actors; tests and benchmarks build
one directly. Per group:

1. rule terms for every response (reward/__init__.py: rule_rewards), never raising;
2. responses whose answer parses become segmenter prompts, mapped from the model's square image
   space (model_size) to the original image; those that do not parse never reach the segmenter;
3. ONE image encoding (or an LRU-cache hit) and ONE batched decode of all the group's prompts;
4. mask_iou per cfg.mask_iou (reward/mask_iou.py); 0 for a response that does not parse; 0 for every
   response when the sample has no ground-truth mask (flagged in last_stats["has_mask"]);
5. total = sum over terms of cfg.weights.get(term, 1.0) * value.
"""
from __future__ import annotations

import hashlib
import io
import logging
import time

import numpy as np
from PIL import Image

from reward import answer_prompts, rule_rewards
from data.masks import decode_rle
from reward.mask_iou import mask_iou, mask_reward, to_original
from reward.segmenters import make_segmenter

logger = logging.getLogger(__name__)

# A multi-object answer can list up to 120 objects; only its first ones are segmented, which bounds
# one decode at G * 16 prompts (the accuracy term still sees them all).
MAX_MASK_PROMPTS_PER_RESPONSE = 16


class RewardWorker:
    def __init__(self, cfg, device: str = "cpu"):
        """cfg: config.RewardConfig. The segmenter is built only when the mask term is on."""
        self.cfg = cfg
        self.segmenter = make_segmenter(cfg, device) if cfg.mask_iou != "off" else None
        self.last_stats: dict = {}

    def score_group(self, group: dict) -> list[dict[str, float]]:
        """group: {"sample_id", "image" (PNG bytes, original), "height", "width", "model_size",
        "solution", "mask" (RLE, original space), "responses": [G str]} -> one dict per response."""
        responses = [r if isinstance(r, str) else "" for r in group["responses"]]
        scores = [rule_rewards(self.cfg.rules, r, group.get("solution", "")) for r in responses]
        self.last_stats = {"encode_s": 0.0, "decode_s": 0.0, "cache_hit": False, "num_prompts": 0,
                           "has_mask": group.get("mask") is not None, "mask_error": None}
        if self.segmenter is not None:
            for score, iou in zip(scores, self._mask_ious(group, responses)):
                score["mask_iou"] = 0.0 if iou is None else mask_reward(iou, self.cfg.mask_iou, self.cfg.mask_threshold)
        for score in scores:
            score["total"] = sum(self.cfg.weights.get(term, 1.0) * value for term, value in score.items())
        return scores

    def _mask_ious(self, group: dict, responses: list[str]) -> list[float | None]:
        """IoU of each response's mask with the ground truth; None where there is none to compute."""
        ious: list[float | None] = [None] * len(responses)
        if group.get("mask") is None:
            return ious
        prompts = {}
        for i, response in enumerate(responses):
            p = answer_prompts(self.cfg.rules, response)
            if p is not None:
                prompts[i] = (p[0][:MAX_MASK_PROMPTS_PER_RESPONSE], p[1][:MAX_MASK_PROMPTS_PER_RESPONSE])
        if not prompts:
            return ious
        try:
            gt = decode_rle(group["mask"])
            image = np.array(Image.open(io.BytesIO(group["image"])).convert("RGB"))  # writable, as torch wants
            height, width = image.shape[:2]
            # The image id is a hash of its bytes: samples that share an image share its embedding.
            image_id = hashlib.blake2b(group["image"], digest_size=16).hexdigest()
            start = time.perf_counter()
            self.last_stats["cache_hit"] = self.segmenter.set_image(image_id, image)
            self.last_stats["encode_s"] = time.perf_counter() - start

            mapped = [to_original(b, p, group["model_size"], height, width) for b, p in prompts.values()]
            boxes = np.concatenate([b for b, _ in mapped])
            points = np.concatenate([p for _, p in mapped])
            start = time.perf_counter()
            masks = self.segmenter.predict(boxes, points)  # one batched decode for the whole group
            self.last_stats["decode_s"] = time.perf_counter() - start
            self.last_stats["num_prompts"] = len(boxes)

            offset = 0
            for i, (b, _) in zip(prompts, mapped):
                pred = masks[offset:offset + len(b)].any(axis=0)  # multi-object: union of object masks
                offset += len(b)
                ious[i] = mask_iou(pred, gt)
        except Exception as exc:  # a corrupt image or mask must not stop training: mask terms are 0
            logger.warning("mask IoU failed for sample %s: %s", group.get("sample_id"), exc)
            self.last_stats["mask_error"] = repr(exc)
            return [None] * len(responses)
        return ious
