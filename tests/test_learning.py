"""It learns: GRPO improves the held-out answers over the warm start (the default run, seed 0).

Everything real (launch.py: vLLM rollouts, the reward pool, the DeepSpeed learner, weight sync). The run
is the embedded default with seed 0, evaluated only after the warm start and at the end (greedy answers
on the 48 held-out rows). It is deterministic (seeded data order, seeded vLLM sampling;
tests/test_launch.py checks that a resumed run reproduces every reward), so the margins are set against
what the default gave, with room for another machine's float rounding. Default runs, seeds 0 / 1 / 2,
warm start -> after 70 GRPO steps:
- held-out gIoU (mean mask IoU of the greedy answers): +0.268 / +0.105 / +0.200. Issue #5 asks for +0.10 on every
  seed; the test asks seed 0 for >= GIOU_GAIN = 0.10.
- held-out reward (the training reward of the greedy answers, 0..6): +0.75 / +0.40 / +0.20. The test asks for
  >= HELD_OUT_REWARD_GAIN = 0.10, half the smallest seed's gain. Greedy answers are deterministic, so
  weights that never reach vLLM give exactly 0, and a sign error in the loss or the advantages makes
  the reward fall.
- training reward, mean of the last 10 GRPO steps minus the first 10 (4 prompts a step, so single
  steps are noisy): +0.48 / +0.63 / +0.17; the test asks for >= REWARD_GAIN = 0.10.
"""
import subprocess
import sys

import mlflow
import pytest

from config import REPO

pytestmark = pytest.mark.slow

HELD_OUT_REWARD_GAIN = 0.10
GIOU_GAIN = 0.10
REWARD_GAIN = 0.10


def test_grpo_improves_held_out_reward_and_iou_over_the_warm_start(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "launch.py", f"train.output_dir={out}", "tracking.system_metrics=false",
            "tracking.log_model=false", "eval.every_n_steps=0"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("seg-grpo").experiment_id])[0]
    history = lambda name: dict(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)))  # noqa: E731
    steps = int(run.data.params["train.steps"])
    rewards = history("reward/total")
    assert sorted(rewards) == list(range(1, steps + 1))
    values = list(rewards.values())
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last - first >= REWARD_GAIN, rewards
    held_out = history("eval/reward")
    assert sorted(held_out) == [0, steps]
    assert held_out[steps] - held_out[0] >= HELD_OUT_REWARD_GAIN, held_out
    giou = history("eval/giou_segzero")
    assert giou[steps] - giou[0] >= GIOU_GAIN, giou
    assert (out / "learning_curve.png").stat().st_size > 10_000
