"""Segment one object in one image from a query: reasoning + answer printed, mask and overlay written.

    python infer.py --image PATH --query TEXT [--checkpoint HF_DIR] [--out DIR] [section.field=value ...]

The policy (transformers, greedy; one image needs no serving engine) reads the image resized to
model.image_size and the Seg-Zero prompt; its box and points are mapped back to the image and given to
the segmenter of the config (reward.segmenter: sam2 with reward.sam2_checkpoint, or grabcut).
Writes <out>/mask.png (white = object, image size) and <out>/overlay.png (box, points, mask, caption).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--checkpoint", default=None, help="HF directory of the policy (default: the run's final policy, "
                   "as evaluate.py)")
    p.add_argument("--config", default=None)
    p.add_argument("--out", default="infer_out")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from config import load_config_or_exit
    cfg = load_config_or_exit(args.config, args.overrides)
    if not Path(args.image).exists():
        print(f"--image: not found: {args.image}", file=sys.stderr)
        return 2

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data.dataset import Sample
    from evaluation.overlay import save_overlay
    from evaluation.run import predicted_mask
    from policy.family import fixed_size, pixels_per_unit
    from policy.prepare import policies_to_evaluate
    from policy.prompt import chat_prompt
    from reward.segmenters import make_segmenter

    image = Image.open(args.image).convert("RGB")
    size = cfg.model.image_size
    policy = next(iter(policies_to_evaluate(cfg, args.checkpoint).values()))  # final before best
    processor = AutoProcessor.from_pretrained(policy)
    model = AutoModelForImageTextToText.from_pretrained(policy, dtype=torch.float32).eval()
    inputs = processor(text=[chat_prompt(args.query, cfg.reward.rules, cfg.reward.coordinates)],
                       images=[image.resize((size, size), Image.BILINEAR)],
                       return_tensors="pt", size=fixed_size(size))
    with torch.no_grad():
        ids = model.generate(**inputs, do_sample=False,
                             max_new_tokens=args.max_new_tokens or cfg.rollout.max_new_tokens)
    response = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(response)

    sample = Sample(id=Path(args.image).stem, image=image, problem=args.query, mask_rle=None, bbox=[0, 0, 0, 0],
                    points=[[0, 0], [0, 0]], height=image.height, width=image.width, source="infer")
    mask, prompts = predicted_mask(make_segmenter(cfg.reward), cfg.reward.rules, sample, response, size,
                                   pixels_per_unit(cfg.reward.coordinates, size))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if mask is None:
        print("no parseable answer: no mask written", file=sys.stderr)
        mask = np.zeros((image.height, image.width), bool)
    Image.fromarray(mask.astype(np.uint8) * 255).save(out / "mask.png")
    reasoning = response.split("</think>")[0].removeprefix("<think>")
    save_overlay(out / "overlay.png", image, query=args.query, reasoning=reasoning, pred_mask=mask,
                 box=prompts and prompts["box"], points=prompts and prompts["points"], min_width=1)
    print(f"wrote {out / 'mask.png'} and {out / 'overlay.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
