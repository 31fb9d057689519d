"""The pieces of operating a job, one at a time: the reward autoscaler's decisions, the learner group's
fail-fast wait and its restart bounds, and cluster.status' text."""
from types import SimpleNamespace

import pytest
import ray

from cluster.autoscale import RewardAutoscaler
from cluster.job import Job
from cluster.learners import LearnerGroup, LearnerLost, get_all
from cluster.state import TrainState
from cluster.status import format_status
from config import RewardAutoscaleConfig, load_config
from tests.helpers import Gate


def test_autoscaler_grows_on_a_queued_tail_and_shrinks_when_it_is_gone():
    scaler = RewardAutoscaler(RewardAutoscaleConfig(enabled=True, min_workers=1, max_workers=3, up_tail_fraction=0.3,
                                                    down_tail_fraction=0.05, cooldown_steps=2))
    decide = lambda workers, tail, queued=0, idle=0: scaler.decide(workers, tail, 1.0, queued, idle)  # noqa: E731
    # A long tail with groups queued behind each other: one more worker.
    assert decide(1, 0.6, queued=2).change == 1
    # Cool-down: nothing for cooldown_steps steps, whatever the tail.
    assert [decide(2, 0.6, queued=2).change for _ in range(2)] == [0, 0]
    assert "cooling down" in scaler.last.reason
    assert decide(2, 0.6, queued=1).workers == 3
    for _ in range(2):
        decide(3, 0.6, queued=1)
    # At max_workers: held, and said so.
    d = decide(3, 0.6, queued=1)
    assert d.change == 0 and "max_workers=3" in d.reason
    # A long tail with nothing queued (one slow group) is not helped by more workers.
    assert decide(3, 0.9, queued=0).change == 0
    # The tail gone for cooldown_steps steps in a row: one fewer; then cool-down again.
    assert decide(3, 0.01).change == 0  # the window still holds the long-tail step before
    assert decide(3, 0.01).workers == 2
    assert [decide(2, 0.01).change for _ in range(2)] == [0, 0]
    # A worker that scored nothing counts as spare too, even with a tail.
    assert decide(2, 0.2, idle=1).change == -1
    # Never below min_workers.
    for _ in range(5):
        assert decide(1, 0.0).workers == 1


def test_autoscale_config_checks_name_the_field():
    with pytest.raises(ValueError, match="cluster.reward_autoscale.max_workers: must be >= min_workers"):
        load_config(None, ["cluster.reward_autoscale.min_workers=3", "cluster.reward_autoscale.max_workers=2"])
    with pytest.raises(ValueError, match="cluster.reward_autoscale.down_tail_fraction"):
        load_config(None, ["cluster.reward_autoscale.down_tail_fraction=0.3"])


def test_learner_restarts_are_bounded():
    lost = LearnerLost("learner rank 0 died: ActorDiedError")
    for limit, restarts in ((0, 0), (1, 1), (2, 2)):
        job = SimpleNamespace(cfg=load_config(None, [f"cluster.max_learner_restarts={limit}"]), checkpoint=None,
                              ops=SimpleNamespace(learner_restarts=restarts))
        with pytest.raises(RuntimeError,
                           match=rf"restarted {limit} time\(s\) already \(cluster.max_learner_restarts\)"):
            Job.recover(job, lost, TrainState())


def test_going_back_to_a_checkpoint_keeps_only_its_own_best_policy(tmp_path):
    """best_policy/ is the checkpoint's best, or it goes: an export of later (redone) steps, or one cut
    short (no best.json), is removed; the checkpoint's own best is kept, even with a NaN standard error."""
    import json

    def restored(best, on_disk):
        job = SimpleNamespace(best_dir=tmp_path / "best_policy")
        job.best_dir.mkdir(exist_ok=True)
        (job.best_dir / "config.json").write_text("{}")
        if on_disk is not None:
            (job.best_dir / "best.json").write_text(json.dumps(on_disk))
        return Job._forget_best_of_later_steps(job, best), job.best_dir.exists()

    own = {"step": 2, "giou": 0.5, "giou_se": float("nan"), "rows": 1}
    assert restored(own, own)[1] and restored(own, own)[0]["step"] == 2
    assert restored(own, {**own, "step": 5}) == (None, False)    # exported after the checkpoint
    assert restored(None, {**own, "step": 5}) == (None, False)
    assert restored(own, None) == (None, False)                   # an export cut short


@pytest.mark.parametrize("keep_best", [True, False])
def test_the_best_policy_is_the_first_evaluation_with_the_highest_validation_giou(tmp_path, keep_best):
    """Evaluations whose best on val is neither the first nor the last, with a later tie, and whose test
    and OOD splits would pick other steps: the policy exported as best is the middle one's (selected on
    val only, its test and OOD scores reported with it), exported only when an evaluation beats every
    earlier one; none with eval.keep_best off."""
    import json

    exports = []

    def export_hf(out):
        exports.append(step)
        out.mkdir(exist_ok=True)

    job = SimpleNamespace(cfg=load_config(None, [f"eval.keep_best={str(keep_best).lower()}"]),
                          best_dir=tmp_path / "best_policy", learners=SimpleNamespace(export_hf=export_hf))
    best = None
    split = lambda giou: {"giou_segzero": giou, "giou_segzero_se": 0.01, "n": 8}  # noqa: E731
    for step, val, test, ood in [(0, 0.30, 0.3, 0.2), (2, 0.50, 0.4, 0.3), (4, 0.40, 0.9, 0.1), (6, 0.50, 0.5, 0.8),
                                 (8, 0.10, 0.6, 0.9)]:
        best = Job.keep_if_best(job, best, step, {"val": split(val), "eval": split(test), "ood": split(ood)})
    assert Job.keep_if_best(job, best, 10, {"eval": split(1.0)}) == best  # no val result: nothing selected
    if keep_best:
        assert best == {"step": 2, "giou": 0.50, "giou_se": 0.01, "rows": 8, "eval_giou": 0.4, "eval_giou_se": 0.01,
                        "ood_giou": 0.3, "ood_giou_se": 0.01} and exports == [0, 2]
        assert json.loads((tmp_path / "best_policy" / "best.json").read_text()) == best
    else:
        assert best is None and exports == [] and not (tmp_path / "best_policy").exists()


@ray.remote(num_cpus=0, max_restarts=0)
class Rank:
    def collective(self, gate):
        ray.get(gate.wait.remote())  # blocked, as a rank waiting for a dead peer in an all-reduce

    def die(self):
        import os

        os._exit(1)


def test_a_dead_rank_fails_the_wait_at_once_not_at_the_timeout():
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        gate, ranks = Gate.remote(), [Rank.remote(), Rank.remote()]
        refs = [ranks[0].collective.remote(gate), ranks[1].die.remote()]
        with pytest.raises(LearnerLost, match="learner rank 1 died"):
            get_all(refs, timeout_s=600)  # returns as soon as rank 1 is dead; rank 0 never answers
        # Whatever error a call of the job raised while a rank is dead means: the learner group was lost.
        group = SimpleNamespace(ranks=ranks)
        lost = LearnerGroup.lost(group, RuntimeError("gloo: connection closed by peer"), wait_s=5)
        assert isinstance(lost, LearnerLost) and "rank(s) [1]" in str(lost) and "connection closed" in str(lost)
        ray.get(gate.open.remote())
        assert get_all([ranks[0].collective.remote(gate)], timeout_s=60) == [None]
        # With every rank up, an error is not a lost learner: it stops the job as it is.
        assert LearnerGroup.lost(SimpleNamespace(ranks=ranks[:1]), RuntimeError("invariant"), wait_s=30) is None
    finally:
        ray.shutdown()


def test_status_text_shows_the_live_actors_events_and_the_autoscaler():
    status = {"step": 4, "steps": 6, "phase": "grpo", "weight_version": 4, "run": "default-seed0",
              "mlflow_run_id": "abc", "learner_restarts": 1,
              "topology": [{"role": "rollout", "index": 0, "node": "10.0.0.2", "pid": 42, "gpus": [], "state": "alive",
                            "restarts": 1, "weight_version": 3, "queue": 1}],
              "nodes": [{"node_id": "n1", "address": "10.0.0.1"}, {"node_id": "n2", "address": "10.0.0.2"}],
              "last_step": {"time/generate": 0.5, "time/step": 1.25},
              "autoscale": {"workers": 2, "change": 1, "reason": "reward tail 80% of the step > 30%, 1 groups queued"},
              "events": [{"step": 3, "kind": "node_lost", "time": 0.0, "node_id": "n3", "actors": ["rollout 0"]}],
              "pending_requests": {"at step 6": {"reward_workers": 1}}}
    text = format_status("seg-grpo", status)
    assert "step 4/6" in text and "learner restarts 1" in text
    row = next(line for line in text.splitlines() if line.startswith("rollout"))
    assert row.split()[:3] == ["rollout", "0", "10.0.0.2"] and "alive" in row and "v3" in row
    assert "nodes alive: 2 (10.0.0.1, 10.0.0.2)" in text and "generate 0.50 s" in text
    assert "reward autoscaler: 2 workers (+1)" in text and "node_lost" in text and "at step 6" in text
    assert format_status("seg-grpo", {}) == "job seg-grpo: starting (no step finished yet)"
