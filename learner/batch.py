"""Turns (prompt, image, response tokens) samples into padded model inputs (logits into token logprobs:
learner/logprobs.py).

Layout of a micro-batch: prompts are LEFT-padded and responses RIGHT-padded, so every prompt ends at
the same column P and response token j of every row sits at column P + j:

    [pad pad <prompt ........>][r0 r1 r2 pad pad]
    [<prompt ...............>][r0 r1 r2 r3 r4 ]

The logits that predict the responses are then the last R + 1 positions for every row
(``logits_to_keep = R + 1``; logit at column P + j - 1 predicts r_j), so the model never materialises
vocabulary-sized logits for the prompt. Both families build their 3-D (mrope) positions from the
attended tokens only, so padding on either side does not move any position. The images enter as their
vision features, in the family's form (policy/family.py: Qwen3-VL's deepstack features included).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from policy.family import family_of_model, fixed_size
from trajectory import LearnerSequence

log = logging.getLogger(__name__)


def encode_prompt(processor, prompt: str, image) -> dict[str, Tensor]:
    """Processor output for one sample: input_ids [P], mm_token_type_ids [P], pixel_values, image_grid_thw.
    The image is taken at its size (pre-resized to model.image_size), as vLLM takes it (``fixed_size``)."""
    enc = processor(text=[prompt], images=[image], return_tensors="pt", size=fixed_size(*image.size))
    out = {"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"],
           "image_grid_thw": enc["image_grid_thw"]}
    # Qwen2.5-VL needs the modality of every token to place the image in 3-D positions; without it the
    # model silently falls back to 1-D positions.
    if "mm_token_type_ids" in enc:
        out["mm_token_type_ids"] = enc["mm_token_type_ids"][0]
    else:
        out["mm_token_type_ids"] = (enc["input_ids"][0] == processor.image_token_id).int()
    return out


def image_key(sample: LearnerSequence) -> tuple[str, int]:
    """What identifies a sample's prompt and image within one learner call: the G answers of a group
    share one prompt string and one image object (trajectory.learner_batch; Ray unpickles a shard's
    shared objects as shared objects), so they are encoded and seen by the vision tower once."""
    return sample.prompt, id(sample.image)


def collate(processor, samples: list[LearnerSequence], pad_id: int, encoded: dict | None = None) -> dict:
    """samples -> padded model inputs + response targets.

    Returns model kwargs (input_ids, attention_mask, mm_token_type_ids, image_grid_thw, logits_to_keep),
    "response_ids" [B, R] and "response_mask" [B, R] (1 on response tokens that carry loss: the
    sequence's ``loss_mask``, all of them by default), and the images once
    each: "pixel_values" and "unique_grid_thw" of the distinct (prompt, image) pairs in first-seen
    order, "image_keys" their ``image_key``s and "image_index" [B] the pair of each row. The vision
    tower runs on the distinct images and its features are repeated per row (Learner._forward).
    ``encoded``: a dict kept by the caller over several micro-batches, so each pair is run through the
    processor once per call (key -> ``encode_prompt``).
    An image/video placeholder token inside a response would make the model look for an image that
    is not there (a hard error), so it enters the model as padding and its position is masked out.
    R is at least 1 (a masked pad column when every response is empty), so every micro-batch runs the
    same forward passes: under ZeRO-3 each pass gathers weights, a collective all ranks must join.
    """
    encoded = {} if encoded is None else encoded
    keys = [image_key(s) for s in samples]
    for key, s in zip(keys, samples):
        if key not in encoded:
            encoded[key] = encode_prompt(processor, s.prompt, s.image)
    unique = list(dict.fromkeys(keys))
    prompts = [encoded[k] for k in keys]
    responses = [torch.as_tensor(list(s.response_ids), dtype=torch.long) for s in samples]
    P = max(p["input_ids"].numel() for p in prompts)
    R = max(1, max(r.numel() for r in responses))
    B = len(samples)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P + R, dtype=torch.long)
    mm_types = torch.zeros(B, P + R, dtype=torch.int)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long)
    response_mask = torch.zeros(B, R)
    placeholders = torch.tensor([processor.image_token_id, processor.video_token_id])
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = p["input_ids"].numel()
        input_ids[i, P - n:P] = p["input_ids"]
        mm_types[i, P - n:P] = p["mm_token_type_ids"]
        attention_mask[i, P - n:P + r.numel()] = 1
        bad = torch.isin(r, placeholders)
        if bad.any():
            log.warning("response of group %s answer %d holds %d image/video placeholder tokens: masked out",
                        samples[i].group, samples[i].answer, int(bad.sum()))
        input_ids[i, P:P + r.numel()] = r.masked_fill(bad, pad_id)
        response_ids[i, :r.numel()] = r
        keep = (~bad).float()
        if samples[i].loss_mask is not None:
            keep = keep * torch.as_tensor(list(samples[i].loss_mask), dtype=torch.float)
        response_mask[i, :r.numel()] = keep
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types,
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in prompts]),
        "logits_to_keep": R + 1,
        "pixel_values": torch.cat([encoded[k]["pixel_values"] for k in unique]),
        "unique_grid_thw": torch.cat([encoded[k]["image_grid_thw"] for k in unique]),
        "image_keys": unique, "image_index": [unique.index(k) for k in keys],
        "response_ids": response_ids, "response_mask": response_mask,
    }


# The images enter as vision features (mm_encoder_outputs, Learner._forward), not as pixel_values.
MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "logits_to_keep")


def model_inputs(hf, batch: dict, device, dtype: torch.dtype, image_features: tuple | None) -> dict:
    """The model's kwargs for a collated batch, on device, floats in the model's dtype. The images enter
    as ``image_features`` (one entry per distinct image, ``image_features``), repeated per row, through
    transformers' ``mm_encoder_outputs`` in the form of ``hf``'s family; None: as each row's pixel values
    (the tower runs per row)."""
    out = {}
    for k in MODEL_KEYS:
        v = batch[k]
        if isinstance(v, Tensor):
            v = v.to(device, dtype=dtype if v.is_floating_point() else None)
        out[k] = v
    if image_features is None:
        out["pixel_values"] = torch.cat([image_pixels(batch, i) for i in batch["image_index"]]).to(device, dtype)
    else:
        per_row = [image_features[i] for i in batch["image_index"]]
        out["mm_encoder_outputs"] = family_of_model(hf).encoder_outputs(per_row)
    return out


def image_pixels(batch: dict, i: int) -> Tensor:
    """The processor's pixel rows of the batch's i-th distinct image."""
    sizes = batch["unique_grid_thw"].prod(-1).tolist()
    start = sum(sizes[:i])
    return batch["pixel_values"][start:start + sizes[i]]


def image_features(model, batch: dict, device, dtype: torch.dtype) -> tuple[tuple[Tensor, ...], ...]:
    """The vision tower of ``model`` (a family's ``...ForConditionalGeneration``) on the batch's distinct
    images, in ``batch["image_keys"]`` order: per image, its tokens' [tokens, hidden] features and, for
    Qwen3-VL, its deepstack features (policy/family.py). The tower attends within each image only, so an
    image's features do not depend on the others in the call."""
    return family_of_model(model).image_features(model, batch["pixel_values"].to(device, dtype=dtype),
                                                 batch["unique_grid_thw"].to(device))


def shared_prompt_logits(module, hf, batch: dict, features: tuple | None, device, dtype: torch.dtype) -> Tensor:
    """``module`` (the model, or the DeepSpeed engine around it; ``hf`` the model; ``features`` the
    distinct images' vision features, or None to run the tower in the prompt pass): the logits of
    ``model_inputs(batch)``'s forward ([B, R + 1, V], the last R + 1 positions), with
    each distinct prompt run once (learner.shared_prompt):

        prompt pass:  the U distinct prompts [U, P] (their rows' first P columns, images included) ->
                      keys/values of every layer, and the logit at column P - 1 (predicts r_0)
        answer pass:  the B responses [B, R] on top of their prompt's keys/values (repeated per row,
                      so their gradients add up on the prompt), attention mask [B, P + R] -> logits
                      at columns P .. P + R - 1

    Positions are the full rows' 3-D (mrope) positions (the model's own get_rope_index: Qwen3-VL's
    interleaved sections have the same call), split at P. Qwen3-VL's deepstack features enter in the
    prompt pass, where the image tokens are.
    Every row's prompt part depends on its prompt alone, so this is the same computation as the full
    rows, without repeating the prompt's G - 1 times."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    types, grid = batch["mm_token_type_ids"].to(device), batch["image_grid_thw"].to(device)
    P = ids.shape[1] - (batch["logits_to_keep"] - 1)
    positions, _ = hf.model.get_rope_index(ids, types, grid, attention_mask=mask)
    rows = torch.tensor(batch["image_index"], device=device)
    first = torch.tensor([batch["image_index"].index(u) for u in range(len(batch["image_keys"]))], device=device)
    images = ({"pixel_values": batch["pixel_values"].to(device, dtype)} if features is None else
              {"mm_encoder_outputs": family_of_model(hf).encoder_outputs(features)})
    prompt = module(input_ids=ids[first, :P], attention_mask=mask[first, :P], mm_token_type_ids=types[first, :P],
                    position_ids=positions[:, first, :P], image_grid_thw=grid[first], **images,
                    use_cache=True, logits_to_keep=1)
    cache = prompt.past_key_values
    cache.batch_select_indices(rows)
    answers = module(input_ids=ids[:, P:], attention_mask=mask, position_ids=positions[:, :, P:],
                     past_key_values=cache, use_cache=True, logits_to_keep=0)
    return torch.cat([prompt.logits[rows], answers.logits], dim=1)
