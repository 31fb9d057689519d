"""Turns (prompt, image, response tokens) samples into padded model inputs, and logits into token logprobs.

Layout of a micro-batch: prompts are LEFT-padded and responses RIGHT-padded, so every prompt ends at
the same column P and response token j of every row sits at column P + j:

    [pad pad <prompt ........>][r0 r1 r2 pad pad]
    [<prompt ...............>][r0 r1 r2 r3 r4 ]

The logits that predict the responses are then the last R + 1 positions for every row
(``logits_to_keep = R + 1``; logit at column P + j - 1 predicts r_j), so the model never materialises
vocabulary-sized logits for the prompt. Qwen2.5-VL builds its 3-D (mrope) positions from the attended
tokens only, so padding on either side does not move any position.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def encode_prompt(processor, prompt: str, image) -> dict[str, Tensor]:
    """Processor output for one sample: input_ids [P], mm_token_type_ids [P], pixel_values, image_grid_thw."""
    enc = processor(text=[prompt], images=[image], return_tensors="pt")
    out = {"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"],
           "image_grid_thw": enc["image_grid_thw"]}
    # Qwen2.5-VL needs the modality of every token to place the image in 3-D positions; without it the
    # model silently falls back to 1-D positions.
    if "mm_token_type_ids" in enc:
        out["mm_token_type_ids"] = enc["mm_token_type_ids"][0]
    else:
        out["mm_token_type_ids"] = (enc["input_ids"][0] == processor.image_token_id).int()
    return out


def collate(processor, samples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """samples: dicts with "prompt", "image", "response_ids" -> padded model inputs + response targets.

    Returns model kwargs (input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
    logits_to_keep) plus "response_ids" [B, R] and "response_mask" [B, R] (1 on real response tokens).
    An image/video placeholder token inside a response would make the model look for an image that
    is not there (a hard error), so it enters the model as padding and its position is masked out.
    """
    prompts = [encode_prompt(processor, s["prompt"], s["image"]) for s in samples]
    responses = [torch.as_tensor(list(s["response_ids"]), dtype=torch.long) for s in samples]
    P = max(p["input_ids"].numel() for p in prompts)
    R = max(r.numel() for r in responses)
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
            log.warning("response of sample %s holds %d image/video placeholder tokens: masked out",
                        samples[i].get("sample_id", i), int(bad.sum()))
        input_ids[i, P:P + r.numel()] = r.masked_fill(bad, pad_id)
        response_ids[i, :r.numel()] = r
        response_mask[i, :r.numel()] = (~bad).float()
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types,
        "pixel_values": torch.cat([p["pixel_values"] for p in prompts]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in prompts]),
        "logits_to_keep": R + 1,
        "response_ids": response_ids, "response_mask": response_mask,
    }


MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "logits_to_keep")


def model_inputs(batch: dict, device, dtype: torch.dtype) -> dict:
    """The subset of a collated batch the model takes, on device; pixels in the model's dtype."""
    out = {}
    for k in MODEL_KEYS:
        v = batch[k]
        if isinstance(v, Tensor):
            v = v.to(device, dtype=dtype if v.is_floating_point() else None)
        out[k] = v
    return out


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """logits [B, R + 1, V] (the last R + 1 positions), targets [B, R] -> logp [B, R] (, entropy [B, R]).

    z = logits[:, :-1] / temperature (fp32)
    logp_t = z[t, y_t] - logsumexp(z[t])
    H_t = logsumexp(z[t]) - sum_v softmax(z[t])_v * z[t, v]
    """
    z = logits[:, :-1].float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy
