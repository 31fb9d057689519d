"""RewardWorker: scores one group (G responses to one prompt) with rule terms + segmenter mask IoU.

Plain Python (no Ray): cluster/reward_pool.py runs N of these as actors; evaluation (evaluation/run.py)
builds one in its process, so training and evaluation score answers the same way; tests and
benchmarks build one directly. A group is made by ``reward_group`` (one sample, its G responses, the
solution string of the rule set). Per group:

1. rule terms for every response (reward/__init__.py: rule_rewards), never raising; answers in
   relative coordinates (cfg.coordinates) converted to model-space pixels first;
2. responses whose answer parses become segmenter prompts, mapped from the model's square image
   space (model_size) to the original image; those that do not parse never reach the segmenter;
3. ONE image encoding (or an LRU-cache hit) and ONE batched decode of all the group's prompts;
4. mask_iou per cfg.mask_iou (reward/mask_iou.py); 0 for a response that does not parse; 0 for every
   response when the sample has no ground-truth mask (flagged in last_stats["has_mask"]);
5. total = sum over terms of cfg.weights.get(term, 1.0) * value.

The reward pool calls ``rewards``: the same scores as typed ``trajectory.Reward`` rows, each naming
the hash of the response text it scored (the driver checks it against the answer it trains).
"""
from __future__ import annotations

import hashlib
import io
import logging
import time

import numpy as np
from PIL import Image

from data.masks import decode_rle
from policy.family import pixels_per_unit
from reward import answer_prompts, rule_rewards
from reward.mask_iou import mask_iou, mask_reward, to_original
from reward.segmenters import make_segmenter
from trajectory import Reward, text_hash

logger = logging.getLogger(__name__)

# A multi-object answer can list up to 120 objects; only its first ones are segmented, which bounds
# one decode at G * 16 prompts (the accuracy term still sees them all).
MAX_MASK_PROMPTS_PER_RESPONSE = 16


def reward_group(sample, responses: list[str], rules: str, model_size: int, key: str | None = None) -> dict:
    """The group a RewardWorker scores: the sample's original image (encoded bytes) and ground-truth mask,
    the solution string of rule set ``rules`` in model space, and the responses. ``key`` names it in
    logs (default: the sample id)."""
    image = sample.image_bytes
    if not image:
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        image = buf.getvalue()
    return {"sample_id": key or sample.id, "image": image, "height": sample.height, "width": sample.width,
            "model_size": model_size, "solution": sample.solution(model_size, rules), "mask": sample.mask_rle,
            "responses": list(responses)}


class RewardWorker:
    def __init__(self, cfg, device: str = "cpu", segment: bool = False):
        """cfg: config.RewardConfig. The segmenter is built when the mask term is on, or with ``segment``
        (evaluation measures the masks whatever the reward's terms)."""
        self.cfg = cfg
        self.segmenter = make_segmenter(cfg, device) if cfg.mask_iou != "off" or segment else None
        self.last_stats: dict = {}

    def score_group(self, group: dict, with_masks: bool = False):
        """group (``reward_group``): {"sample_id", "image" (PNG bytes, original), "height", "width",
        "model_size", "solution", "mask" (RLE, original space), "responses": [G str]} -> one dict per
        response; with_masks: also the predicted mask of each response (original pixels; None when its
        answer does not parse or the mask term is off), what evaluation measures gIoU on."""
        responses = [r if isinstance(r, str) else "" for r in group["responses"]]
        unit = pixels_per_unit(self.cfg.coordinates, group["model_size"])
        scores = [rule_rewards(self.cfg.rules, r, group.get("solution", ""), unit) for r in responses]
        self.last_stats = {"encode_s": 0.0, "decode_s": 0.0, "cache_hit": False, "num_prompts": 0,
                           "has_mask": group.get("mask") is not None, "mask_error": None}
        masks: list = [None] * len(responses)
        mask_term = self.cfg.mask_iou != "off"
        if self.segmenter is not None and (mask_term or with_masks):
            masks, ious = self._masks(group, responses, with_masks, unit)
            for score, iou in zip(scores, ious if mask_term else ()):
                score["mask_iou"] = 0.0 if iou is None else mask_reward(iou, self.cfg.mask_iou, self.cfg.mask_threshold)
        for score in scores:
            score["total"] = weighted_total(score, self.cfg.weights)
        return (scores, masks) if with_masks else scores

    def rewards(self, group: dict) -> list[Reward]:
        """``score_group`` as one Reward per response, with the hash of the text scored."""
        return [Reward(terms, text_hash(response if isinstance(response, str) else ""))
                for terms, response in zip(self.score_group(group), group["responses"])]

    def _masks(self, group: dict, responses: list[str], wanted: bool, unit: float) -> tuple[list, list[float | None]]:
        """Each response's predicted mask and its IoU with the ground truth (None where there is none:
        an answer that does not parse; no IoU either when the sample has no ground-truth mask, and no
        segmentation at all then unless the masks are ``wanted``)."""
        masks: list = [None] * len(responses)
        ious: list[float | None] = [None] * len(responses)
        prompts = {}
        for i, response in enumerate(responses):
            p = answer_prompts(self.cfg.rules, response, unit)
            if p is not None:
                prompts[i] = (p[0][:MAX_MASK_PROMPTS_PER_RESPONSE], p[1][:MAX_MASK_PROMPTS_PER_RESPONSE])
        if not prompts or (group.get("mask") is None and not wanted):
            return masks, ious
        try:
            gt = decode_rle(group["mask"]) if group.get("mask") is not None else None
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
            # The G answers often repeat a box and points: each distinct prompt is segmented once (the
            # segmenters are deterministic per prompt), and its mask shared.
            rows = np.concatenate([boxes.reshape(len(boxes), -1), points.reshape(len(points), -1)], axis=1)
            distinct, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
            start = time.perf_counter()
            predicted = self.segmenter.predict(boxes[first], points[first])[inverse.reshape(-1)]  # one batched decode
            self.last_stats["decode_s"] = time.perf_counter() - start
            self.last_stats["num_prompts"] = len(distinct)

            offset = 0
            for i, (b, _) in zip(prompts, mapped):
                masks[i] = predicted[offset:offset + len(b)].any(axis=0)  # multi-object: union of object masks
                offset += len(b)
                ious[i] = mask_iou(masks[i], gt) if gt is not None else None
        except Exception as exc:  # a corrupt image or mask must not stop training: mask terms are 0
            logger.warning("mask IoU failed for sample %s: %s", group.get("sample_id"), exc)
            self.last_stats["mask_error"] = repr(exc)
            return [None] * len(responses), [None] * len(responses)
        return masks, ious


def weighted_total(terms: dict[str, float], weights: dict[str, float]) -> float:
    """total = sum over terms of weights.get(term, 1) * value (config reward.weights)."""
    return sum(weights.get(term, 1.0) * value for term, value in terms.items() if term != "total")
