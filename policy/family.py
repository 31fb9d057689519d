"""Policy families: everything that differs between a Qwen2.5-VL and a Qwen3-VL checkpoint, in one place.

The family is the checkpoint's ``config.json`` ``model_type`` (``family_of``); an unknown one stops the
job at start with the list of known ones. What differs:

| | Qwen2.5-VL (``qwen2_5_vl``) | Qwen3-VL (``qwen3_vl``) |
|---|---|---|
| vision patch x spatial merge | 14 x 2: image sides multiple of 28 | 16 x 2: multiple of 32 |
| vision features into the model | one embedding per image token | the same, plus deepstack features |
|  |  | added to the first decoder layers' hidden states |
| positions (mrope) | 3-D sections | interleaved sections (the model's own ``get_rope_index``, same call) |
| answer coordinates | absolute pixels of the resized image | relative: 0..1000 across the image's width and height |

Also per family, read from the model by transformers and vLLM themselves: the weight names
(``weight_sync.buckets.checkpoint_names`` asks transformers' own renaming; vLLM's loader maps those),
the vision tower (``model.model.visual``, deepstack mergers included: what ``learner.freeze_vision``
freezes and the sync then leaves out) and the published shapes (``configs/models/``).

Coordinates (``reward.coordinates``): ``pixels`` or ``relative_1000``; ``auto`` (the default) takes the
policy's family's, resolved once at start (``resolve``). The rules, the segmenter and the evaluation
work in pixels of the resized image: an answer in ``relative_1000`` is converted with
``pixels = value x image_size / 1000`` before any of them reads it (reward/__init__.py), and the warm
start's reference answers and the prompt's example answer are written in the convention
(``to_answer_units``, policy/prompt.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

COORDINATES = ("pixels", "relative_1000")
RELATIVE_RANGE = 1000


@dataclass(frozen=True)
class Family:
    model_type: str   # config.json "model_type"
    name: str
    patch_size: int   # vision patch side in pixels; the tower merges 2 x 2 patches into one token
    coordinates: str  # the convention its answers use (COORDINATES)
    deepstack: bool   # vision features also enter the first decoder layers (Qwen3-VL)

    @property
    def image_multiple(self) -> int:
        """Image sides must be a multiple of this (patch x merge), or a processor resizes the image."""
        return self.patch_size * 2

    def check_image_size(self, image_size: int) -> None:
        """A side that is not a multiple of ``image_multiple`` would be resized by the processors, so the
        answer's pixels would not be the image's: refused at start, naming the field."""
        m = self.image_multiple
        if image_size % m:
            below, above = image_size // m * m, (image_size // m + 1) * m
            raise ValueError(f"model.image_size: {image_size} is not a multiple of {m} ({self.name}: patch "
                             f"{self.patch_size} x merge 2); use {below or above} or {above}")

    def image_features(self, model, pixel_values, grid_thw) -> tuple[tuple, ...]:
        """The vision tower of ``model`` (the family's ``...ForConditionalGeneration``) on a batch of images:
        per image, (token embeddings [tokens, hidden], *its deepstack features, one per deepstack layer)."""
        out = model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        layers = out.deepstack_features if self.deepstack else []
        return tuple((embeds, *(layer[i] for layer in layers)) for i, embeds in enumerate(out.pooler_output))

    def encoder_outputs(self, features) -> dict:
        """``image_features``' per-image tuples (one per row that shows the image) as the model's
        ``mm_encoder_outputs``: what its forward would have computed from the pixels."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled = tuple(f[0] for f in features)
        if not self.deepstack:
            return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        depth = len(features[0]) - 1
        deep = [tuple(f[1 + layer] for f in features) for layer in range(depth)]
        return {"image": BaseModelOutputWithDeepstackFeatures(pooler_output=pooled, deepstack_features=deep)}


FAMILIES = {
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2.5-VL", patch_size=14, coordinates="pixels", deepstack=False),
    "qwen3_vl": Family("qwen3_vl", "Qwen3-VL", patch_size=16, coordinates="relative_1000", deepstack=True),
}
QWEN2_5_VL = FAMILIES["qwen2_5_vl"]


def family_of(policy_path: str | Path) -> Family:
    """The family of the HF checkpoint directory ``policy_path``, from its config.json's model_type."""
    config = Path(policy_path, "config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"model.policy_path: cannot read {config}: {exc}") from exc
    if model_type not in FAMILIES:
        raise RuntimeError(f"model.policy_path: {policy_path} is a {model_type!r} checkpoint; this trainer "
                           f"knows {', '.join(sorted(FAMILIES))} (config.json model_type)")
    return FAMILIES[model_type]


def family_of_model(model) -> Family:
    """The family of a loaded HF model (its config's model_type)."""
    return FAMILIES[model.config.model_type]


def resolve(cfg, policy_path: str | Path) -> Family:
    """The family of the policy a job runs, checked against the config: the image size fits its patches,
    and ``reward.coordinates=auto`` becomes the family's convention (every part of the job then reads the
    concrete one)."""
    family = family_of(policy_path)
    family.check_image_size(cfg.model.image_size)
    if cfg.reward.coordinates == "auto":
        cfg.reward.coordinates = family.coordinates
    return family


def fixed_size(width: int, height: int | None = None) -> dict:
    """The image processors' ``size`` that keeps a pre-resized image as it is (min = max = its pixels):
    vLLM's and the learner's processors both get it, whatever pixel bounds the checkpoint ships (Qwen3-VL's
    stock minimum, 256 x 256, would upscale a smaller image on one side only)."""
    pixels = width * (height or width)
    return {"shortest_edge": pixels, "longest_edge": pixels}


def pixels_per_unit(coordinates: str, image_size: int) -> float:
    """Pixels of the resized image per answer coordinate unit: 1 for ``pixels`` (and an unresolved
    ``auto``: no policy in sight, e.g. reward.score without --coordinates), image_size / 1000 for
    ``relative_1000``."""
    return image_size / RELATIVE_RANGE if coordinates == "relative_1000" else 1.0


def to_answer_units(pixels, coordinates: str, image_size: int) -> list[int]:
    """Integer pixel coordinates of the resized image -> the convention's integers (reference answers)."""
    scale = pixels_per_unit(coordinates, image_size)
    return [int(round(v / scale)) for v in pixels]
