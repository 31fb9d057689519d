"""Operating a running job (real Ray, vLLM, DeepSpeed, reward pool): actors killed mid-run, the reward
pool scaled 1 -> 2 -> 1 through the named controller, one-step off-policy staleness."""
import os
import signal
import threading
import time

import mlflow
import pytest
import ray

from cluster.controller import NAMESPACE
from config import load_config

pytestmark = pytest.mark.slow
B, G, STEPS = 2, 2, 6


def wait_for(predicate, timeout_s, what, job=None, errors=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job is not None and not job.is_alive():
            raise AssertionError(f"the job ended while waiting for {what}: {list(errors) or 'no error'}")
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def kill_one(topology: list[dict], role: str) -> int:
    """SIGKILLs the first actor of a pool (pids from the job's published topology): a crash, as an
    OOM kill or a lost process would be."""
    pid = next(row["pid"] for row in topology if row["role"] == role)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_kills_scaling_and_off_policy(tmp_path):
    import launch

    cfg = load_config(None, [
        f"train.output_dir={tmp_path}", f"train.steps={STEPS}", f"rollout.prompts_per_step={B}",
        f"rollout.group_size={G}", "rollout.max_new_tokens=16", "rollout.off_policy=true", "train.sft_steps=0",
        "data.synthetic_train_size=32", "data.synthetic_eval_size=2", "eval.enabled=false",
        "tracking.log_model=false", "tracking.system_metrics=false", "cluster.job_name=ops-test"])
    # Ray's own processes die with the thread that started them: start it here, not in the job's thread.
    from cluster.start import connect
    connect(cfg)
    errors = []
    job = threading.Thread(target=lambda: _run(launch, cfg, errors), daemon=True)
    job.start()
    controller = wait_for(lambda: ray.get_actor("ops-test", namespace=NAMESPACE),
                          600, "the job's controller", job, errors)
    status = lambda: ray.get(controller.status.remote(), timeout=30)  # noqa: E731
    topology = wait_for(lambda: status().get("step", 0) >= 1 and status()["topology"], 900, "step 1", job, errors)
    ray.get(controller.request.remote(None, 2))
    kill_one(topology, "rollout")
    kill_one(topology, "reward")
    wait_for(lambda: status().get("step", 0) >= 4, 900, "step 4", job, errors)
    ray.get(controller.request.remote(None, 1))
    job.join(timeout=900)
    ray.shutdown()
    assert not job.is_alive() and not errors, errors

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("seg-grpo").experiment_id])
    history = lambda name: [m.value for m in sorted(client.get_metric_history(run.info.run_id, name),  # noqa: E731
                                                    key=lambda m: m.step)]
    # Every step trained on exactly the planned samples: B distinct prompts, G answers each.
    assert history("batch/prompts") == [B] * STEPS
    assert history("batch/sequences") == [B * G] * STEPS
    assert history("seqs") == [B * G] * STEPS
    # The killed rollout actor came back (Ray restart) and got the weights: its prompts were redone when
    # the kill hit a generation, or the weight push was repeated when it hit a sync or an idle worker.
    assert sum(history("rollout/redone_chunks")) + sum(history("sync/worker_restarts")) >= 1
    # The logged reward pool size follows the requests: 1, then 2, then back to 1.
    workers = history("pool/reward_workers")
    assert workers[0] == 1 and 2 in workers and workers[-1] == 1
    # One-step off-policy: no batch was trained with weights more than one version old.
    staleness = history("rollout/staleness")
    assert max(staleness) <= 1 and staleness.count(1) >= STEPS - 2  # a resynced (redone) chunk may be fresher
    assert history("weight_version") == list(range(1, STEPS + 1))


def _run(launch, cfg, errors):
    import traceback

    try:
        launch.train(cfg)
    except Exception:  # reported by the test thread
        errors.append(traceback.format_exc())
