"""`python -m reward.score` end to end in a subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEG_SOL = "<box>(10,100),(200,210)</box><points>(30,110),(35,180)</points>"
SEG_GOOD = '<think>x</think><answer>{"bbox": [10,100,200,210], "points_1": [30,110], "points_2": [35,180]}</answer>'
MULTI_SOL = '[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}]'
MULTI_GOOD = f"<think>x.</think><answer>{MULTI_SOL}</answer>"


def run(tmp_path, lines, *args):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    proc = subprocess.run([sys.executable, "-m", "reward.score", "--in", str(src), "--out", str(dst), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    out = [json.loads(line) for line in dst.read_text().splitlines()] if dst.exists() else []
    return proc, out


@pytest.mark.parametrize("rules,good,solution,terms,best", [
    ("segzero", SEG_GOOD, SEG_SOL, ["think_format", "answer_format", "bbox_iou", "bbox_l1", "point_l1"], 5.0),
    ("segzero_soft", SEG_GOOD, SEG_SOL, ["think_format", "answer_format", "bbox_iou", "bbox_l1", "point_l1"], 5.0),
    ("multi_object", MULTI_GOOD, MULTI_SOL, ["think_format", "answer_format", "accuracy", "non_repeat"], 7.0),
])
def test_cli_scores_and_skips_malformed_lines(tmp_path, rules, good, solution, terms, best):
    rows = [{"response": good, "solution": solution, "id": 7},
            {"response": "{" * 50_000 + "\ud83d", "solution": solution},
            {"response": "", "solution": solution}]
    lines = [json.dumps(rows[0]), "not json {", json.dumps(rows[1]), "[1, 2]", "",
             json.dumps({"response": 3, "solution": solution}), json.dumps(rows[2])]
    proc, out = run(tmp_path, lines, "--rules", rules)
    assert proc.returncode == 0, proc.stderr
    assert len(out) == 3
    assert out[0]["id"] == 7 and out[0]["response"] == good
    assert list(out[0])[-len(terms) - 1:] == [*terms, "total"]
    assert out[0]["total"] == best == sum(out[0][t] for t in terms)
    floor = 1.0 if rules == "multi_object" else 0.0  # a text without repeated sentences earns non_repeat
    assert out[1]["total"] == floor and out[2]["total"] == floor
    for line_number in (2, 4, 6):  # reported with their line numbers
        assert f":{line_number}: skipped" in proc.stderr
    assert "scored 3 responses" in proc.stderr


def test_cli_default_rules_and_bad_arguments(tmp_path):
    proc, out = run(tmp_path, [json.dumps({"response": SEG_GOOD, "solution": SEG_SOL})])
    assert proc.returncode == 0 and out[0]["total"] == 5.0
    proc, _ = run(tmp_path, ["{}"], "--rules", "nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_cli_relative_coordinates(tmp_path):
    """Qwen3-VL's answers (0..1000 of a 500-px image) score as their pixel equivalents; read as pixels
    they miss; --coordinates relative_1000 without --image-size is refused with a message."""
    relative = '<think>x</think><answer>{"bbox": [20,200,400,420], "points_1": [60,220], "points_2": [70,360]}</answer>'
    line = json.dumps({"response": relative, "solution": SEG_SOL})
    proc, out = run(tmp_path, [line], "--coordinates", "relative_1000", "--image-size", "500")
    assert proc.returncode == 0, proc.stderr
    assert out[0]["total"] == 5.0
    proc, out = run(tmp_path, [line])
    assert out[0]["bbox_iou"] == out[0]["bbox_l1"] == 0.0
    proc, _ = run(tmp_path, [line], "--coordinates", "relative_1000")
    assert proc.returncode == 2 and "--image-size" in proc.stderr
