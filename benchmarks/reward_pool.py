"""Reward scoring cost: naive per-answer SAM2 vs one encode + one batched decode per group; Ray pool scaling.

    python benchmarks/reward_pool.py [--sam2-config configs/sam2.1/sam2.1_hiera_t.yaml] [--group-size 8]
                                     [--height 480 --width 640] [--pool-groups 4] [--pool-segmenter sam2|grabcut]
                                     [--pool-rounds 1] [--pool-only]

1. One group of G answers, SAM2 with random weights (the cost does not depend on the weights):
   naive = for every answer: encode the image, decode its one prompt;
   ours  = RewardWorker.score_group: one encode (cache miss), one batched decode of the G prompts
           (plus parsing, coordinate mapping and mask IoU); also shown with the embedding cached.
2. RewardPool samples/s with 1 then 2 Ray actors (num_cpus=1 each) on --pool-groups groups of
   distinct images, after a warm-up group per actor (actor start and model build excluded), and the
   ratio; --pool-rounds N alternates 1 and 2 workers N times (means), --pool-only skips part 1.
Numbers from a 2-core machine shared with other jobs are noisy: compare only numbers from one run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import RewardConfig  # noqa: E402
from reward import answer_prompts  # noqa: E402
from reward.mask_iou import to_original  # noqa: E402
from reward.worker import RewardWorker  # noqa: E402

MODEL_SIZE = 112


def make_group(seed: int, g: int, height: int, width: int) -> dict:
    """A coloured rectangle on a grey background, its mask, and G answers jittered around its box."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(220, 5, (height, width, 3)), 0, 255).astype(np.uint8)
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    gt = np.zeros((height, width), bool)
    gt[y:y + height // 3, x:x + width // 3] = True
    image[gt] = rng.integers(0, 180, 3)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    rle = mask_utils.encode(np.asfortranarray(gt.astype(np.uint8)))
    sx, sy = MODEL_SIZE / width, MODEL_SIZE / height
    box = [int(x * sx), int(y * sy), int((x + width // 3) * sx), int((y + height // 3) * sy)]
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    responses = []
    for _ in range(g):
        j = rng.integers(-3, 4, 4).tolist()
        ans = {"bbox": [b + d for b, d in zip(box, j)], "points_1": [cx - 2, cy], "points_2": [cx + 2, cy + 1]}
        responses.append(f"<think>the one</think><answer>{json.dumps(ans)}</answer>")
    return {"sample_id": f"b{seed}", "image": png.getvalue(), "height": height, "width": width,
            "model_size": MODEL_SIZE, "solution": f"<box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"
            f"<points>({cx - 2},{cy}),({cx + 2},{cy + 1})</points>",
            "mask": {"size": rle["size"], "counts": rle["counts"].decode()}, "responses": responses}


def naive_group(worker: RewardWorker, group: dict) -> float:
    """Seconds to segment a group the naive way: encode + single-prompt decode for every answer."""
    predictor = worker.segmenter.predictor
    image = np.array(Image.open(io.BytesIO(group["image"])).convert("RGB"))
    start = time.perf_counter()
    for response in group["responses"]:
        boxes, points = to_original(*answer_prompts("segzero", response), MODEL_SIZE, *image.shape[:2])
        with worker.segmenter._torch.inference_mode():
            predictor.set_image(image)
            predictor.predict(point_coords=points, point_labels=np.ones((1, 2)), box=boxes, multimask_output=False)
    return time.perf_counter() - start


def pool_rate(cfg: RewardConfig, workers: int, groups: list[dict]) -> float:
    from cluster.reward_pool import RewardPool

    pool = RewardPool(cfg, num_workers=workers, resources={"num_cpus": 1, "num_gpus": 0}, call_timeout_s=3600)
    for i in range(workers):  # warm-up: actor start + model build, one group each
        pool.submit(f"warm{i}", {**groups[0], "image": make_group(10_000 + i, 1, 64, 64)["image"]})
    pool.collect([f"warm{i}" for i in range(workers)])
    start = time.perf_counter()
    for i, g in enumerate(groups):
        pool.submit(i, g)
    pool.collect(range(len(groups)))
    elapsed = time.perf_counter() - start
    pool.shutdown()
    return sum(len(g["responses"]) for g in groups) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--pool-groups", type=int, default=4)
    p.add_argument("--pool-segmenter", choices=["sam2", "grabcut"], default="sam2")
    p.add_argument("--pool-rounds", type=int, default=1, help="alternate 1 and 2 workers this many times")
    p.add_argument("--pool-only", action="store_true", help="only part 2, the Ray pool with 1 and 2 workers")
    args = p.parse_args()
    import torch

    cfg = RewardConfig(segmenter="sam2", sam2_config=args.sam2_config, sam2_allow_random_weights=True)
    g = args.group_size
    print("# Numbers from a 2-core machine shared with other jobs are noisy: compare only numbers from one run.")
    if not args.pool_only:
        group_cost(cfg, args, torch.get_num_threads())

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool_cfg = cfg if args.pool_segmenter == "sam2" else RewardConfig()
        groups = [make_group(100 + i, g, args.height, args.width) for i in range(args.pool_groups)]
        rates = {1: [], 2: []}
        for _ in range(args.pool_rounds):
            for n in rates:
                rates[n].append(pool_rate(pool_cfg, n, groups))
    finally:
        ray.shutdown()
    mean = {n: sum(r) / len(r) for n, r in rates.items()}
    print(f"# Ray RewardPool ({args.pool_segmenter}), {args.pool_groups} groups x G={g}, image {args.height}x"
          f"{args.width}, num_cpus=1 (1 torch thread) per actor, {args.pool_rounds} round(s)")
    for n, rate in mean.items():
        print(f"{n} worker{'s' if n > 1 else ' '}: {rate:8.2f} samples/s" +
              (f"   (rounds: {', '.join(f'{r:.2f}' for r in rates[n])})" if args.pool_rounds > 1 else ""))
    print(f"scaling 2 vs 1 workers: {mean[2] / mean[1]:.2f}x (ideal 2x on two free cores)")


def group_cost(cfg: RewardConfig, args, threads: int) -> None:
    """Part 1: one group scored the naive way and ours, SAM2 with random weights, no Ray."""
    worker = RewardWorker(cfg, device="cpu")
    g = args.group_size
    print(f"# SAM2 {args.sam2_config}, random weights, CPU ({threads} threads), "
          f"image {args.height}x{args.width}, G={g}")
    group = make_group(0, g, args.height, args.width)
    worker.score_group(make_group(99, 1, args.height, args.width))  # warm-up (lazy inits, allocator)

    naive_s = naive_group(worker, group)
    start = time.perf_counter()
    worker.score_group(group)
    ours_s = time.perf_counter() - start
    miss = dict(worker.last_stats)
    start = time.perf_counter()
    worker.score_group(group)
    cached_s = time.perf_counter() - start
    print(f"{'approach':<44}{'s/group':>10}{'s/answer':>10}")
    print(f"{'naive: encode + decode 1 prompt per answer':<44}{naive_s:>10.2f}{naive_s / g:>10.3f}")
    print(f"{'ours: 1 encode + 1 batched decode':<44}{ours_s:>10.2f}{ours_s / g:>10.3f}"
          f"   (encode {miss['encode_s']:.2f} s, decode {miss['decode_s']:.2f} s)")
    print(f"{'ours, embedding cached':<44}{cached_s:>10.2f}{cached_s / g:>10.3f}")
    print(f"speed-up naive/ours: {naive_s / ours_s:.1f}x (target >= 5x); with cache: {naive_s / cached_s:.1f}x")


if __name__ == "__main__":
    main()
