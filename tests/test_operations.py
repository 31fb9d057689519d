"""Operating a running job (real Ray, vLLM, DeepSpeed, reward pool), one-step off-policy, both pools
scaled 1 -> 2 -> 1 through the job's named controller, and a failure mid-run:

- ``rpc``: a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head node for the
  driver and the learner, worker nodes with a ``worker_node`` resource for the rollout and reward
  actors). A second worker node joins at step 1; at step 2 the first one is lost, its raylet and every
  process on it killed, while step 3's round generates on it. Ray restarts the actors on the new node.
- ``collective``: one node; the rollout and the reward actor SIGKILLed mid-run (the killed worker and
  the added one join the broadcast group at the next sync).

Every action is tied to the job's own progress: made when the job publishes step 1, 2 or 4, and the
scaling requests name the step they apply to. ``python -m cluster.status`` is read after the kill and
the scale-up. The parity probe runs after every sync, on every worker.
"""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback

import mlflow
import pytest
import ray

from cluster.autoscale import RewardAutoscaler
from config import REPO, load_config

pytestmark = pytest.mark.slow
B, G, STEPS = 2, 2, 6


def kill_one(topology: list[dict], role: str) -> int:
    """SIGKILLs the first actor of a pool (pid from the job's topology): a crash, as an OOM kill or a
    lost process would be."""
    pid = next(row["pid"] for row in topology if row["role"] == role)
    os.kill(pid, signal.SIGKILL)
    return pid


def lose_node(cluster, node, topology: list[dict]) -> list[str]:
    """A node lost as a machine is: its raylet and its processes, the job's actors on it among them, killed
    at once. Returns the actors it held."""
    on_it = [row for row in topology if row["node_id"] == node.node_id]
    cluster.remove_node(node, allow_graceful=False)
    for row in on_it:
        try:
            os.kill(row["pid"], signal.SIGKILL)
        except ProcessLookupError:  # already gone with its raylet
            pass
    return [f"{row['role']} {row['index']}" for row in on_it]


def status(address: str, job: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cluster.status", "--job", job, "--address", address, "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("weight_sync", ["rpc", "collective"])
def test_failures_scaling_and_off_policy(tmp_path, monkeypatch, weight_sync):
    import launch
    from cluster.job import connect
    from cluster.operations import Operations

    multi_node = weight_sync == "rpc"
    overrides = [f"rollout.weight_sync={weight_sync}", "cluster.sync_parity_check=true",
        "cluster.reward_workers=1", f"train.output_dir={tmp_path}", f"train.steps={STEPS}",
        f"rollout.prompts_per_step={B}",
        f"rollout.group_size={G}", "rollout.max_new_tokens=16", "rollout.off_policy=true", "train.sft_steps=0",
        "data.synthetic_train_size=32", "data.synthetic_eval_size=2", "eval.enabled=false",
        "tracking.log_model=false", "tracking.system_metrics=false", "cluster.job_name=ops-test"]
    cluster = None
    if multi_node:
        from ray.cluster_utils import Cluster

        # Node death is noticed within ~1.5 s (Ray's default is ~15 s).
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {"head_node": 1},
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
        first_node = cluster.add_node(num_cpus=4, resources={"worker_node": 2})  # room for one of each
        overrides += [f"cluster.address={cluster.address}", "cluster.learner.resources={head_node: 1}",
                      "cluster.rollout.resources={worker_node: 1}", "cluster.reward.resources={worker_node: 1}"]
    cfg = load_config(None, overrides)
    publish, seen, main_thread = Operations.publish, {}, queue.Queue()

    def in_main_thread(work):
        """Ray's test cluster adds nodes only from the main thread (signal handlers): the job's thread hands
        the work over and waits for it, so it still happens at this point of the job."""
        done = threading.Event()

        def run():
            try:
                seen.update(work())
            finally:
                done.set()
        main_thread.put(run)
        done.wait()

    def operate(job, step, timings, state):
        """Runs in the job's thread as it publishes a step: what an operator does, at fixed steps."""
        publish(job, step, timings, state)
        if step == 1:  # queued now, applied once the job reaches the named step
            ray.get(job.controller.request.remote(2, 2, at_step=3))
            ray.get(job.controller.request.remote(1, 1, at_step=6))
            if multi_node:
                in_main_thread(lambda: {
                    "second_node": cluster.add_node(num_cpus=4, resources={"worker_node": 4}).node_id})
        if step == 2:  # step 3's round is already generating (off-policy): fail into it
            if multi_node:
                in_main_thread(lambda: {"lost": lose_node(cluster, first_node, job.places)})
            else:
                seen["killed"] = [kill_one(job.places, "rollout"), kill_one(job.places, "reward")]
        if step == 4:  # after the failure and the scale-up: what an operator sees once every actor answered
            for _ in range(3):  # a lost actor's first answers may be failed asks made while Ray restarted it
                job.refresh_topology(wait_s=cfg.cluster.startup_timeout_s)
                if all(r["state"] == "alive" for r in job.places):
                    break
            publish(job, step, timings, state)
            seen["status"] = status(ray.get_runtime_context().gcs_address, cfg.cluster.job_name)

    monkeypatch.setattr(Operations, "publish", operate)
    # Ray's own processes die with the thread that started them: start it here, not in the job's thread.
    connect(cfg)
    errors = []
    job = threading.Thread(target=lambda: _run(launch, cfg, errors, main_thread), daemon=True)
    job.start()
    while (work := main_thread.get(timeout=1200)) is not None:  # until the job's thread ends
        work()
    job.join(timeout=1200)
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    assert not job.is_alive() and not errors, errors

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("seg-grpo").experiment_id])
    history = lambda name: [m.value for m in sorted(client.get_metric_history(run.info.run_id, name),  # noqa: E731
                                                    key=lambda m: m.step)]
    # Every step trained on exactly the planned samples: B distinct prompts, G answers each, once.
    assert history("batch/prompts") == [B] * STEPS
    assert history("batch/sequences") == [B * G] * STEPS
    assert history("trained_seqs") == [B * G] * STEPS
    # The lost rollout actor came back (Ray restart; on the other node) and got the weights: its prompts
    # were redone when the failure hit a generation, or the weight push was repeated when it hit a sync.
    assert sum(history("rollout/redone_chunks")) + sum(history("sync/worker_restarts")) >= 1
    # Both pools follow the requests, at the steps they named.
    assert history("pool/reward_workers") == [1, 1, 2, 2, 2, 1]
    assert history("pool/rollout_workers") == [1, 1, 2, 2, 2, 1]
    # One-step off-policy: no batch was trained with weights more than one version old.
    staleness = history("rollout/staleness")
    # a redone chunk may be fresher
    assert max(staleness) <= 1 and staleness[0] == 0 and staleness.count(1) >= STEPS - 2
    assert history("weight_version") == list(range(1, STEPS + 1))
    assert max(history("sync/parity_max_diff")) <= cfg.cluster.sync_parity_tolerance

    # cluster.status after the failure and the scale-up: the live actors, not those captured at start.
    live = seen["status"]
    rows = {(r["role"], r["index"]): r for r in live["topology"]}
    assert sorted(rows) == [("learner", 0), ("reward", 0), ("reward", 1), ("rollout", 0), ("rollout", 1)]
    # The lost actors came back: each answered from a new process (a restart counted); every actor answers.
    assert rows[("rollout", 0)]["restarts"] >= 1 and rows[("reward", 0)]["restarts"] >= 1
    assert all(r["state"] == "alive" for r in rows.values()), rows
    assert live["step"] == 4 and rows[("rollout", 0)]["weight_version"] in (3, 4)
    if multi_node:
        # The lost node held both pools' actors; they run on the node that joined, the learner on the head.
        assert sorted(seen["lost"]) == ["reward 0", "rollout 0"]
        assert {r["node_id"] for k, r in rows.items() if k[0] != "learner"} == {seen["second_node"]}
        events = [json.loads(line) for line in
                  open(client.download_artifacts(run.info.run_id, "events.jsonl", str(tmp_path)))]
        lost = [e for e in events if e["kind"] == "node_lost"]
        assert len(lost) == 1 and lost[0]["node_id"] == first_node.node_id and lost[0]["step"] >= 2
        assert sorted(lost[0]["actors"]) == ["reward 0", "rollout 0"]
        assert [e["node_id"] for e in events if e["kind"] == "node_added"] == [seen["second_node"]]
        assert history("cluster/node_lost") == [1]
        assert any(e["kind"] == "node_lost" for e in live["events"]) or lost[0]["step"] >= 4
    if weight_sync == "collective":
        # The group is rebuilt whenever its members changed since the last sync: after the scale-up and the
        # scale-down (applied during steps 2 and 5, before their syncs), and once the killed worker is back;
        # with the members unchanged (the last step) it is reused.
        rebuilds = history("sync/group_rebuilds")
        assert rebuilds[1] == 1 and rebuilds[4] == 1 and rebuilds[5] == 0, rebuilds


def _run(launch, cfg, errors, main_thread):
    try:
        launch.train(cfg)
    except Exception:  # reported by the test thread
        errors.append(traceback.format_exc())
    finally:
        main_thread.put(None)


def test_reward_pool_sizes_itself_with_sam2(tmp_path, memorised_policy):
    """cluster.reward_autoscale with the real SAM2 segmenter (random weights: ~4.5 s per image on one CPU
    thread). The policy answers every image with a box and points, so every group is segmented. The first
    8 training rows carry masks (SAM2 encodes each image: a long reward tail, groups queued on one worker),
    the next 16 none (nothing to segment: no tail). The pool grows to 2 workers, then comes back to 1;
    each decision is an event and a metric, and every decision is the autoscaler's rule applied to the
    signals the job logged for its step (reward tail, step time, the pool's queued-group and idle-worker
    counters): replayed here, not inferred from wall-time thresholds. One row is corrupt: skipped and
    counted in MLflow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import launch
    from data.synthetic import write_synthetic

    policy, _ = memorised_policy
    rows = pq.read_table(write_synthetic(tmp_path / "all.parquet", 24, 112, seed=5)).to_pylist()
    for row in rows[8:]:
        row["mask"] = None
    rows[12]["image"] = b"not an image"  # a corrupt row: skipped, counted, logged
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    steps = 10
    cfg = load_config(None, [
        f"model.policy_path={policy}", f"data.train_path={tmp_path / 'train.parquet'}", "data.shuffle=false",
        "data.synthetic_eval_size=2", "reward.segmenter=sam2", "reward.sam2_allow_random_weights=true",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=40", "train.sft_steps=0",
        f"train.steps={steps}", f"train.output_dir={tmp_path}", "eval.enabled=false", "tracking.log_model=false",
        "tracking.system_metrics=false", "cluster.job_name=autoscale-test", "cluster.reward_workers=1",
        "cluster.reward_autoscale.enabled=true", "cluster.reward_autoscale.max_workers=2",
        "cluster.reward_autoscale.up_tail_fraction=0.3", "cluster.reward_autoscale.down_tail_fraction=0.1",
        "cluster.reward_autoscale.cooldown_steps=2",
        # MLflow store and experiment of the user's choosing: the run goes there, not to the output dir's store
        f"tracking.mlflow_uri=sqlite:///{tmp_path / 'tracking' / 'runs.db'}", "tracking.experiment=autoscale-sam2"])
    (tmp_path / "tracking").mkdir()
    launch.train(cfg)

    assert not (tmp_path / "mlflow.db").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'tracking' / 'runs.db'}")
    assert client.get_experiment_by_name("seg-grpo") is None
    (run,) = client.search_runs([client.get_experiment_by_name("autoscale-sam2").experiment_id])
    history = lambda name: [m.value for m in sorted(client.get_metric_history(run.info.run_id, name),  # noqa: E731
                                                    key=lambda m: m.step)]
    sizes, changes, decided = (history("pool/reward_workers"), history("autoscale/change"),
                               history("autoscale/reward_workers"))
    assert len(sizes) == len(decided) == steps and sizes[0] == 1
    # Each decision sizes the next step's pool, and is the rule applied to the step's own signals.
    assert sizes[1:] == decided[:-1]
    replay, workers = RewardAutoscaler(cfg.cluster.reward_autoscale), 1
    for tail, step_s, queued, idle, logged in zip(history("time/reward_tail"), history("time/step"),
                                                  history("pool/queued_groups"), history("pool/idle_workers"), decided):
        workers = replay.decide(workers, tail, step_s, int(queued), int(idle)).workers
        assert workers == logged
    # It grew (groups with masks queued behind each other on one worker) and came back to one.
    assert changes.count(1) == 1 and changes.count(-1) == 1 and changes.index(1) < changes.index(-1), changes
    assert max(sizes) == 2 and decided[-1] == 1
    assert history("cluster/reward_autoscale") == [1, 2]
    skipped = history("data/skipped_rows")
    assert skipped[0] == 0 and skipped[-1] == 1 and history("data/skipped_rows/bad_image")[-1] == 1
    events = [json.loads(line)
              for line in open(client.download_artifacts(run.info.run_id, "events.jsonl", str(tmp_path)))]
    assert [(e["workers_from"], e["workers_to"]) for e in events if e["kind"] == "reward_autoscale"] == [(1, 2), (2, 1)]
