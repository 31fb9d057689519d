"""Test-time scaling (evaluation/voting.py): the pixel vote and the answer that agrees most; evaluate.py
--splits / --samples / --vote end to end on the memorised policy, and its refusals."""
import json
import subprocess
import sys

import numpy as np
import pytest

from config import REPO
from evaluation.voting import mask_iou, vote


def box(y1, x1, y2, x2, shape=(10, 10)):
    m = np.zeros(shape, bool)
    m[y1:y2, x1:x2] = True
    return m


def test_majority_keeps_the_pixels_more_than_half_of_the_masks_hold():
    a, b, c = box(0, 0, 4, 4), box(0, 0, 4, 6), box(0, 2, 4, 6)
    _, voted = vote([a, b, c], (10, 10), "majority")
    # columns 0-1: a and b (2 of 3); 2-3: all three; 4-5: b and c; nothing below row 4
    np.testing.assert_array_equal(voted, box(0, 0, 4, 6))
    _, even = vote([a, b, c, None], (10, 10), "majority")  # 2 of 4 is not more than half
    np.testing.assert_array_equal(even, box(0, 2, 4, 4))


def test_agreement_picks_the_answer_closest_to_the_others():
    near, also_near, far = box(0, 0, 5, 5), box(0, 0, 5, 6), box(6, 6, 9, 9)
    pick, mask = vote([far, near, also_near, None], (10, 10), "agreement")
    assert pick in (1, 2) and mask is (near if pick == 1 else also_near)
    # Ties go to the earliest answer; one answer is its own prediction; an unparsed answer is empty.
    assert vote([near, near], (10, 10), "agreement")[0] == 0
    pick, mask = vote([None], (10, 10), "agreement")
    assert pick == 0 and not mask.any()
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    with pytest.raises(ValueError, match="unknown vote"):
        vote([near], (10, 10), "mean")


@pytest.mark.parametrize("args, message", [
    (["--splits", "a"], "NAME=PATH"),
    (["--splits", "a={split},a={split}"], "distinct names"),
    (["--splits", "a={split},b=/nonexistent.parquet"], "not found: /nonexistent.parquet"),
    (["--split", "{split}", "--samples", "0"], "--samples: must be at least 1"),
    (["--split", "{split}", "--limit", "-1"], "--limit: must be 0 or more"),
    (["--split", "{split}", "--samples", "2", "--protocol", "segzero"], "needs --protocol default"),
])
def test_bad_arguments_stop_with_one_line(args, message, synthetic_split, capsys):
    import evaluate

    assert evaluate.main([a.format(split=synthetic_split) for a in args] + ["--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_evaluate_several_splits_with_voting(tmp_path, synthetic_split, memorised_policy):
    """--splits names two synthetic splits and the papers' benchmarks as data.convert writes them (fixtures
    of ReasonSeg val, RefCOCO testA, RefCOCO+ testA, RefCOCOg val), --samples 4 --vote agreement: each
    split is reported under its name, with its decoding settings, and the memorised sample is still
    segmented well from sampled answers."""
    from data.convert import main as convert
    from tests.test_data_convert import write_reasonseg, write_refcocog

    converted = {"reasonseg_val": ["reasonseg", "--in", str(write_reasonseg(tmp_path / "rs"))]}
    for name, refs, split in (("refcoco", "refs(unc).p", "testA"), ("refcoco+", "refs(unc).p", "testA"),
                              ("refcocog", "refs(umd).p", "val")):
        root, _ = write_refcocog(tmp_path / name, name, refs, split)
        converted[f"{name}_{split}"] = [name, "--in", str(root), "--split", split]
    for name, args in converted.items():
        convert([*args, "--out", str(tmp_path / f"{name}.parquet")])
    benchmarks = ",".join(f"{name}={tmp_path / name}.parquet" for name in converted)
    policy, _ = memorised_policy
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--splits", f"val={synthetic_split},test={synthetic_split},{benchmarks}",
         "--checkpoint", str(policy), "--out", str(out), "--limit", "2", "--overlays", "1", "--samples", "4",
         "--vote", "agreement", f"train.output_dir={tmp_path}", "rollout.max_new_tokens=96"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val: checkpoint policy" in proc.stdout and "test: checkpoint policy" in proc.stdout
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"val", "test", *converted}
    for split, per_policy in results.items():
        (result,) = per_policy.values()
        assert result["split_name"] == split and result["n"] == 2 and 0 <= result["giou_segzero"] <= 1
        assert result["decoding"] == {"greedy": False, "temperature": 0.5, "max_new_tokens": 96, "samples": 4,
                                      "vote": "agreement", "prompts_per_batch": 8, "seed": 0}
    for split in ("val", "test"):
        assert results[split]["checkpoint"]["samples"][0]["parsed"]
        assert results[split]["checkpoint"]["samples"][0]["iou"] > 0.5
    # the same rows, the same seeds: both splits give the same numbers
    assert results["val"]["checkpoint"]["giou_segzero"] == results["test"]["checkpoint"]["giou_segzero"]
    # each split logged to MLflow under its name, with the decoding settings
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("seg-grpo-eval").experiment_id])
    assert sorted(r.data.params["split"] for r in runs) == sorted(["test", "val", *converted])
    assert {r.data.params["decoding.vote"] for r in runs} == {"agreement"}
