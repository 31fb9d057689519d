"""evaluate.py and infer.py end to end: real vLLM (evaluate), transformers (infer), GrabCut masks."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from config import REPO
from evaluation.overlay import ALPHA, PRED_COLOUR


@pytest.mark.slow
def test_evaluate_writes_table_json_and_overlays(tmp_path, synthetic_split, memorised_policy):
    policy, _ = memorised_policy
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--split", str(synthetic_split), "--checkpoint", str(policy),
         "--out", str(out), "--limit", "4", "--overlays", "2", "--no-mlflow", "--protocol", "segzero",
         f"train.output_dir={tmp_path}", "rollout.max_new_tokens=96"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gIoU" in proc.stdout and "lisa" in proc.stdout and "Seg-Zero's script" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    # Seg-Zero's script on the same answers: GrabCut has one mask and the images are at model size (no
    # rounding), so it agrees with the default protocol (none is skipped: no ground truth is empty).
    assert result["protocol"] == "segzero" and result["scored"] == 4 and result["skipped"] == 0
    assert result["giou"] == pytest.approx(result["giou_segzero"])
    assert result["n"] == 4 and len(result["samples"]) == 4
    # The sample the policy memorised is answered and segmented well (other images may not parse).
    records = result["samples"]
    assert records[0]["parsed"] and records[0]["iou"] > 0.5
    assert result["parse_failure_rate"] == pytest.approx(sum(not r["parsed"] for r in records) / 4)
    assert result["giou_segzero"] == pytest.approx(sum(r["iou"] for r in records) / 4)
    for name in ("lisa", "segzero"):
        assert 0.0 < result[f"giou_{name}"] <= 1.0 and 0.0 < result[f"ciou_{name}"] <= 1.0
    assert len(result["overlays"]) == 2 and all(Image.open(p).format == "PNG" for p in result["overlays"])


def test_infer_writes_mask_and_overlay(tmp_path, memorised_policy):
    policy, sample = memorised_policy
    image_path = tmp_path / "image.png"
    sample.image.save(image_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "infer.py", "--image", str(image_path), "--query", sample.problem,
         "--checkpoint", str(policy), "--out", str(out), "--max-new-tokens", "96"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "<answer>" in proc.stdout
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    overlay = np.asarray(Image.open(out / "overlay.png").convert("RGB")).astype(float)
    image = np.asarray(sample.image.convert("RGB")).astype(float)
    assert mask.shape == image.shape[:2]
    # Same width as the image; the image part on top, a caption panel below.
    assert overlay.shape[1] == image.shape[1] and overlay.shape[0] > image.shape[0]
    assert mask.sum() > 20
    # Mask pixels are blended towards the prediction colour (except where the box outline and point
    # markers are drawn on top); pixels away from mask, box and points are left as they were.
    top = overlay[: image.shape[0]]
    expected = (1 - ALPHA) * image[mask] + ALPHA * PRED_COLOUR
    blended = np.abs(top[mask] - expected).max(axis=1) <= 1.0
    assert blended.sum() >= 10 and blended.mean() > 0.2
    far = ~np.pad(mask, 6)[: mask.shape[0], : mask.shape[1]]
    corner = np.zeros_like(mask)
    corner[:4, :4] = True
    untouched = corner & far & ~mask
    if untouched.any():
        assert np.abs(top[untouched] - image[untouched]).max() < 1.0


def test_overlay_draws_an_inverted_box_instead_of_failing(tmp_path):
    from evaluation.overlay import BOX_COLOUR, save_overlay

    image = Image.new("RGB", (64, 64), (200, 200, 200))
    path = tmp_path / "o.png"
    save_overlay(path, image, query="the red circle", box=[40, 50, 10, 20], points=[[5, 5]], min_width=64)
    pixels = np.asarray(Image.open(path).convert("RGB"))[:64]
    assert (pixels[20:51, 10] == BOX_COLOUR).all(axis=-1).any()  # the left edge, at x = min(x1, x2)


def test_evaluation_scores_answers_with_the_training_reward(synthetic_split):
    """eval reward = the rule terms + the mask term, weighted, as the reward pool scores a training answer."""
    from config import load_config
    from data.dataset import ParquetSource
    from evaluation.run import evaluate_answers
    from reward.worker import RewardWorker

    size = 112
    samples = [s for _, s in zip(range(2), ParquetSource(synthetic_split, shuffle=False).iter_epoch())]
    responses = [samples[0].reference_answer(size), "<think>no idea</think><answer>{'bbox': oops}</answer>"]
    cfg = load_config().reward.model_copy(update={"weights": {}})  # every term weighs 1
    result = evaluate_answers(samples, responses, [10, 10], RewardWorker(cfg, segment=True), size, max_overlays=0)
    records = result["samples"]
    # The reference answer earns every rule term; the malformed one only the think format.
    assert [result[f"reward_{t}"] for t in ("think_format", "answer_format", "bbox_iou", "bbox_l1", "point_l1")] \
        == [1.0, 0.5, 0.5, 0.5, 0.5]
    assert result["reward_mask_iou"] == pytest.approx(records[0]["iou"] / 2) and records[0]["iou"] > 0.5
    terms = [v for k, v in result.items() if k.startswith("reward_")]
    assert result["reward"] == pytest.approx(sum(terms)) and len(terms) == 6
    # Weighted as in training (reward.weights); without the mask term the masks are still measured.
    weighted = cfg.model_copy(update={"weights": {"bbox_iou": 3.0}, "mask_iou": "off"})
    off = evaluate_answers(samples, responses, [10, 10], RewardWorker(weighted, segment=True), size, max_overlays=0)
    assert "reward_mask_iou" not in off
    assert off["reward"] == pytest.approx(result["reward"] - result["reward_mask_iou"] + 2 * result["reward_bbox_iou"])
    assert off["giou_segzero"] == pytest.approx(result["giou_segzero"])


@pytest.mark.slow
def test_evaluate_reports_the_final_and_the_best_policy_of_a_run(tmp_path, synthetic_split, memorised_policy):
    """Without --checkpoint, evaluate.py scores the run's final_policy and best_policy (one engine; the
    second policy's weights are pushed into it): here the memorised policy and the untrained one."""
    import shutil

    from policy.tiny import build_tiny_policy

    policy, _ = memorised_policy
    shutil.copytree(policy, tmp_path / "final_policy")
    build_tiny_policy(tmp_path / "best_policy", image_size=112, seed=1)  # the memorised policy's start
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--split", str(synthetic_split), "--out", str(out), "--limit", "3",
         "--overlays", "0", "--no-mlflow", f"train.output_dir={tmp_path}", "rollout.max_new_tokens=96"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final policy" in proc.stdout and "best policy" in proc.stdout
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"final", "best"}
    assert results["final"]["samples"][0]["parsed"] and results["final"]["samples"][0]["iou"] > 0.5
    assert results["best"]["parse_failure_rate"] == 1.0  # random weights: nothing parses


@pytest.mark.slow
def test_evaluate_and_infer_a_qwen3_vl_policy(tmp_path, synthetic_split, memorised_qwen3_vl):
    """A real-vocabulary Qwen3-VL directory that answers one sample in relative 0..1000 coordinates: both
    entry points read the family from the checkpoint, prompt in its convention, and convert its answer to
    pixels, so the memorised sample is segmented as well as in pixels (read as pixels its box would lie
    4.5x too far out, off the object)."""
    policy, sample, reference = memorised_qwen3_vl
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--split", str(synthetic_split), "--checkpoint", str(policy),
         "--out", str(out), "--limit", "2", "--no-mlflow", "--protocol", "segzero", "model.image_size=224",
         f"train.output_dir={tmp_path}", "rollout.max_new_tokens=64"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    first = result["samples"][0]
    assert first["parsed"] and first["iou"] > 0.5 and first["box_iou"] > 0.8, first
    assert result["giou"] == pytest.approx(result["giou_segzero"])  # the paper's script maps it alike

    image_path = tmp_path / "image.png"
    sample.image.save(image_path)
    proc = subprocess.run(
        [sys.executable, "infer.py", "--image", str(image_path), "--query", sample.problem, "--checkpoint",
         str(policy), "--out", str(tmp_path / "out"), "--max-new-tokens", "64", "model.image_size=224"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reference.split("<answer>")[1] in proc.stdout  # the relative answer, as memorised
    from data.masks import decode_rle

    mask, gt = np.asarray(Image.open(tmp_path / "out" / "mask.png")) > 0, decode_rle(sample.mask_rle)
    assert (mask & gt).sum() / (mask | gt).sum() > 0.5
