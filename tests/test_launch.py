"""End to end: `python launch.py` with every real engine (Ray, vLLM CPU, DeepSpeed, reward pool, MLflow)."""
import subprocess
import sys

import mlflow
import pytest

from config import REPO

pytestmark = pytest.mark.slow

PER_STEP = ["reward/total", "reward/think_format", "reward/answer_format", "reward/bbox_iou",
            "reward/mask_iou", "adv/mean", "adv/std", "loss", "kl", "clip_frac",
            "response/length_mean", "time/generate", "time/learner", "time/sync", "time/step",
            "perf/samples_per_s", "weight_version"]


def test_two_step_run_logs_every_metric_every_step(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch.py", "train.steps=2", f"train.output_dir={out}",
         "data.synthetic_train_size=16", "data.synthetic_eval_size=4", "rollout.prompts_per_step=2",
         "rollout.group_size=2", "rollout.max_new_tokens=24", "tracking.system_metrics=false"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("seg-grpo").experiment_id])
    assert run.data.params["rollout.group_size"] == "2"
    for name in PER_STEP:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    versions = [m.value for m in client.get_metric_history(run.info.run_id, "weight_version")]
    assert versions == [1.0, 2.0]
    assert (out / "final_policy" / "config.json").exists()
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "final_policy")]
    assert "final_policy/config.json" in artifacts
