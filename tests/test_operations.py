"""Operating a running job (real Ray, vLLM, DeepSpeed, reward pool): a rollout and a reward actor
SIGKILLed mid-run, both pools scaled 1 -> 2 -> 1 through the job's named controller, in one-step
off-policy mode, with each weight-sync path (rpc; collective: the killed worker and the added one join
the broadcast group at the next sync). Every action is tied to the job's own progress: the kills and the
scaling requests are made when the job publishes step 1 and step 2, and the requests name the step they
apply to. The parity probe runs after every sync, on every worker."""
import os
import signal
import threading
import traceback

import mlflow
import pytest
import ray

from config import load_config

pytestmark = pytest.mark.slow
B, G, STEPS = 2, 2, 6


def kill_one(topology: list[dict], role: str) -> int:
    """SIGKILLs the first actor of a pool (pid from the job's topology): a crash, as an OOM kill or a
    lost process would be."""
    pid = next(row["pid"] for row in topology if row["role"] == role)
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.parametrize("weight_sync", ["rpc", "collective"])
def test_kills_scaling_and_off_policy(tmp_path, monkeypatch, weight_sync):
    import launch
    from cluster.job import Job, connect

    cfg = load_config(None, [f"rollout.weight_sync={weight_sync}", "cluster.sync_parity_check=true",
        "cluster.reward_workers=1", f"train.output_dir={tmp_path}", f"train.steps={STEPS}", f"rollout.prompts_per_step={B}",
        f"rollout.group_size={G}", "rollout.max_new_tokens=16", "rollout.off_policy=true", "train.sft_steps=0",
        "data.synthetic_train_size=32", "data.synthetic_eval_size=2", "eval.enabled=false",
        "tracking.log_model=false", "tracking.system_metrics=false", "cluster.job_name=ops-test"])
    publish, killed = Job.publish, []

    def operate(job, step, timings):
        """Runs in the job's thread as it publishes a step: what an operator does, at fixed steps."""
        publish(job, step, timings)
        if step == 1:  # queued now, applied once the job reaches the named step
            ray.get(job.controller.request.remote(2, 2, at_step=3))
            ray.get(job.controller.request.remote(1, 1, at_step=5))
        if step == 2:  # step 3's round is already generating (off-policy): kill into it
            killed.extend([kill_one(job.places, "rollout"), kill_one(job.places, "reward")])

    monkeypatch.setattr(Job, "publish", operate)
    # Ray's own processes die with the thread that started them: start it here, not in the job's thread.
    connect(cfg)
    errors = []
    job = threading.Thread(target=lambda: _run(launch, cfg, errors), daemon=True)
    job.start()
    job.join(timeout=1200)
    ray.shutdown()
    assert not job.is_alive() and not errors, errors
    assert len(killed) == 2

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("seg-grpo").experiment_id])
    history = lambda name: [m.value for m in sorted(client.get_metric_history(run.info.run_id, name),  # noqa: E731
                                                    key=lambda m: m.step)]
    # Every step trained on exactly the planned samples: B distinct prompts, G answers each, once.
    assert history("batch/prompts") == [B] * STEPS
    assert history("batch/sequences") == [B * G] * STEPS
    assert history("trained_seqs") == [B * G] * STEPS
    # The killed rollout actor came back (Ray restart) and got the weights: its prompts were redone when
    # the kill hit a generation, or the weight push was repeated when it hit a sync or an idle worker.
    assert sum(history("rollout/redone_chunks")) + sum(history("sync/worker_restarts")) >= 1
    # Both pools follow the requests, at the steps they named.
    assert history("pool/reward_workers") == [1, 1, 2, 2, 1, 1]
    assert history("pool/rollout_workers") == [1, 1, 2, 2, 1, 1]
    # One-step off-policy: no batch was trained with weights more than one version old.
    staleness = history("rollout/staleness")
    assert max(staleness) <= 1 and staleness[0] == 0 and staleness.count(1) >= STEPS - 2  # a redone chunk may be fresher
    assert history("weight_version") == list(range(1, STEPS + 1))
    assert max(history("sync/parity_max_diff")) <= cfg.cluster.sync_parity_tolerance
    if weight_sync == "collective":
        # The group is rebuilt whenever its members changed since the last sync: after the scale-up and the
        # scale-down (applied during steps 2 and 4, before their syncs), and once the killed worker is back;
        # with the members unchanged (the last step) it is reused.
        rebuilds = history("sync/group_rebuilds")
        assert rebuilds[1] == 1 and rebuilds[3] == 1 and rebuilds[5] == 0, rebuilds

def _run(launch, cfg, errors):
    try:
        launch.train(cfg)
    except Exception:  # reported by the test thread
        errors.append(traceback.format_exc())
