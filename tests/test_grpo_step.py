"""launch.grpo_step with fake actor groups: the algorithm's bookkeeping (which groups train, with whose
advantages, from which round, at which weight version), without Ray or engines. The same step runs
with real engines in tests/test_modes.py."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cluster.state import TrainState
from config import load_config
from data.dataset import Sample
from launch import grpo_step
from learner.grpo import group_advantages
from trajectory import Answer, InvariantError, LearnerBatch, Reward, check_batch, learner_batch, make_groups, text_hash


def sample(sid: str) -> Sample:
    return Sample(id=sid, image=Image.new("RGB", (8, 8)), problem=f"the {sid}", mask_rle=None, bbox=[0, 0, 4, 4],
                  points=[[1, 1], [2, 2]], height=8, width=8, source="test")


class Data:
    """next_batch(k): the next k ids of a fixed list, cycling (like an epoch boundary)."""

    def __init__(self, ids):
        self.ids, self.position = list(ids), 0

    def next_batch(self, k):
        out = [sample(self.ids[(self.position + i) % len(self.ids)]) for i in range(k)]
        self.position += k
        return out

    def skipped_metrics(self):
        return {"data/skipped_rows": 0}


class Round:
    """A finished round: answers and rewards made by ``answer(group)`` -> list of (tokens, total)."""

    def __init__(self, groups, weight_version, answer, metrics):
        self.groups, self.weight_version, self.answer, self.metrics = groups, weight_version, answer, metrics
        self.finished = 0

    def pump(self, timeout_s=0.0):
        return True

    def finish(self):
        self.finished += 1
        if self.finished == 1:
            for g in self.groups:
                made = self.answer(g)
                g.prompt = "prompt"
                g.answers = [Answer(tokens, [0.0] * len(tokens), "text", "stop", self.weight_version)
                             for tokens, _ in made]
                g.rewards = [Reward({"think_format": 1.0, "total": total}, text_hash("text")) for _, total in made]
        return self.groups, {**self.metrics, "time/generate": 1.0, "time/reward_tail": 0.5, "rollout/redone_chunks": 0}


class Rollouts:
    def __init__(self, answer, reported_version=None):
        self.answer, self.reported_version = answer, reported_version
        self.versions, self.rounds, self.synced, self.workers = {0}, [], [], ["worker"]

    def round(self, groups, seed, weight_version, metrics=None):
        version = weight_version if self.reported_version is None else self.reported_version
        self.rounds.append(Round(groups, version, self.answer, metrics or {}))
        return self.rounds[-1]

    def sync_from(self, learners, version, pump=None):
        self.versions.add(version)
        self.synced.append(version)
        return {"time/sync": 0.0}


class Learners:
    def __init__(self):
        self.batches, self.pumped = [], 0

    def train_step(self, batch, while_waiting=None):
        if while_waiting is not None:
            while_waiting()
            self.pumped += 1
        self.batches.append(batch)
        return {"loss": 0.0, "tokens": batch.totals()[0], "trained_seqs": len(batch)}


def make_job(answer, ids="abcdefgh", *overrides, reported_version=None):
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=2", "train.steps=5", *overrides])
    pool = SimpleNamespace(stats=lambda reset=False: {"num_workers": 1, "samples_per_s": 0.0, "workers": [],
                                                          "queued_groups": 0, "idle_workers": 0})
    ops = SimpleNamespace(apply_scaling=lambda step: None)
    return SimpleNamespace(cfg=cfg, data=Data(ids), rollouts=Rollouts(answer, reported_version), learners=Learners(),
                           reward_pool=pool, ops=ops, state=TrainState())


def step(job, n):
    return grpo_step(job, job.state, n)


def sample_id(seq):
    return seq.group.split(":", 1)[1]


def distinct(group):
    """Two answers whose rewards differ, and depend on the group's sample id (to trace whose they are)."""
    base = float(ord(group.sample.id[0]))
    return [([1, 2], base), ([3], base + 1.0)]


def test_each_sequence_trains_once_with_its_own_groups_advantage():
    job = make_job(distinct)
    metrics = step(job, 1)
    (batch,) = job.learners.batches
    assert [(s.group, s.answer) for s in batch.sequences] == [("1:a", 0), ("1:a", 1), ("1:b", 0), ("1:b", 1)]
    assert [s.advantage for s in batch.sequences] == pytest.approx([-0.7071, 0.7071] * 2, abs=1e-3)
    assert metrics["batch/sequences"] == 4 and metrics["batch/prompts"] == 2 and metrics["weight_version"] == 1
    assert job.rollouts.synced == [1] and job.state.version == 1


def test_a_group_without_answers_is_dropped_and_counted_never_misaligned():
    """A prompt longer than rollout.max_model_len gets no answers: the other groups keep their own
    advantages (the old driver zipped by position and shifted every later group by one)."""
    def answer(group):
        return ([] if group.sample.id == "a" else [([1], 0.0), ([2], 1.0)] if group.sample.id == "b"
                else [([3], 5.0), ([4], 9.0)])

    job = make_job(answer, "abc", "rollout.prompts_per_step=3")
    metrics = step(job, 1)
    (batch,) = job.learners.batches
    assert [s.group for s in batch.sequences] == ["1:b", "1:b", "1:c", "1:c"]
    assert [s.response_ids for s in batch.sequences] == [[1], [2], [3], [4]]
    assert metrics["batch/dropped_groups/no_answers"] == 1 and metrics["batch/dropped_groups"] == 1
    assert metrics["reward/total"] == pytest.approx((0 + 1 + 5 + 9) / 4)


def test_repeated_sample_ids_are_renamed_and_each_keeps_its_rewards():
    totals = iter([0.0, 1.0, 2.0, 4.0, 10.0, 20.0, 30.0, 70.0])

    def answer(group):
        return [([1], next(totals)), ([2], next(totals))]

    job = make_job(answer, "aa", "rollout.prompts_per_step=4")  # a dataset smaller than a batch
    metrics = step(job, 1)
    (round_,) = job.rollouts.rounds
    assert [g.uid for g in round_.groups] == ["1:a", "1:a#2", "1:a#3", "1:a#4"]
    assert [g.totals for g in round_.groups] == [[0.0, 1.0], [2.0, 4.0], [10.0, 20.0], [30.0, 70.0]]
    assert metrics["batch/renamed_ids"] == 3 and metrics["batch/sequences"] == 8


def test_a_skipped_step_does_not_reuse_its_round_under_off_policy_and_dynamic_sampling():
    """Every group of step 1 ties (no signal): the step is skipped after its refills, and step 2 draws
    new prompts instead of finishing step 1's round again."""
    def answer(group):
        return [([1], 1.0), ([2], 1.0)] if group.sample.id in "abcd" else distinct(group)

    job = make_job(answer, "abcdefgh", "rollout.off_policy=true", "rollout.dynamic_sampling=true",
                   "rollout.max_refills=1")
    skipped = step(job, 1)
    assert skipped["batch/skipped"] == 1 and skipped["batch/refills"] == 1 and skipped["batch/dropped_groups/tied"] == 4
    assert job.learners.batches == [] and job.state.version == 0 and job.state.pending is None
    metrics = step(job, 2)
    (batch,) = job.learners.batches
    assert sorted({sample_id(s) for s in batch.sequences}) == ["e", "f"]
    assert all(r.finished <= 2 for r in job.rollouts.rounds)  # each round taken by one step only
    assert metrics["batch/refills"] == 0 and metrics["batch/skipped"] == 0
    # The learning-rate schedule follows GRPO steps: step 2 trains at step 2's place, skipped step 1 or not.
    assert batch.position == job.cfg.train.sft_steps + 1
    assert job.state.pending is not None  # off-policy: step 3's round started
    assert [g.sample.id for g in job.state.pending.groups] == ["g", "h"]


def test_dynamic_sampling_refills_with_new_prompts_up_to_max_refills():
    def answer(group):
        return [([1], 0.0), ([2], 0.0)] if group.sample.id in "ab" else distinct(group)

    job = make_job(answer, "abcdef", "rollout.dynamic_sampling=true", "rollout.max_refills=3")
    metrics = step(job, 1)
    (batch,) = job.learners.batches
    assert sorted({sample_id(s) for s in batch.sequences}) == ["c", "d"]
    assert metrics["batch/refills"] == 1 and metrics["batch/dropped_groups/tied"] == 2
    # The reward counts every group generated (the dropped ones too), the trained reward the trained ones;
    # the refill round's generation counts in the step's time.
    trained = [t for g in job.rollouts.rounds[1].groups for t in g.totals]
    assert metrics["reward/total"] == pytest.approx((0 + 0 + 0 + 0 + sum(trained)) / 8)
    assert metrics["reward/trained/total"] == pytest.approx(sum(trained) / 4)
    assert metrics["time/generate"] == 2.0 and metrics["time/reward_tail"] == 1.0


def test_off_policy_trains_the_round_started_during_the_previous_update():
    job = make_job(distinct, "abcdefgh", "rollout.off_policy=true")
    step(job, 1)
    next_round = job.state.pending
    assert next_round.weight_version == 0 and job.learners.pumped == 1  # generated during step 1's update
    metrics = step(job, 2)
    assert [sample_id(s) for s in job.learners.batches[1].sequences][::2] == ["c", "d"]
    assert metrics["rollout/staleness"] == 1 and metrics["weight_version"] == 2


def test_answers_from_a_weight_version_never_pushed_stop_the_run():
    job = make_job(distinct, reported_version=7)
    with pytest.raises(InvariantError, match="weight version 7"):
        step(job, 1)


def test_answers_staler_than_the_mode_allows_stop_the_run():
    job = make_job(distinct, reported_version=0)
    job.state.version = 2
    job.rollouts.versions |= {1, 2}
    with pytest.raises(InvariantError, match="at most 0 behind"):
        step(job, 1)


@pytest.mark.parametrize("learner_metrics, message", [
    ({"loss": float("nan")}, "not finite"),
    ({"loss": 0.5, "grad_norm": float("inf")}, "not finite"),
    ({"loss": 0.5, "tokens_current": 40, "logprob_drift_current": float("nan")}, "differ from vLLM's by nan"),
    ({"loss": 0.5, "tokens_current": 40, "logprob_drift_current": 0.2}, "differ from vLLM's by 0.2"),
])
def test_a_non_finite_update_or_a_drift_past_the_bound_stops_the_run(learner_metrics, message):
    job = make_job(distinct)
    job.learners.train_step = lambda batch, while_waiting=None: {"tokens": 4, "trained_seqs": 4, **learner_metrics}
    with pytest.raises(InvariantError, match=message):
        step(job, 1)
    job.learners.train_step = lambda batch, while_waiting=None: {"loss": 0.5, "grad_norm": 1.0, "tokens": 4,
                                                                 "tokens_current": 40, "logprob_drift_current": 1e-6}
    step(job, 2)  # a finite update within the bound goes on


def _groups():
    groups, _ = make_groups([sample("a"), sample("b")], 3, set())
    for g, totals in zip(groups, ([0.0, 1.0], [5.0, 2.0])):
        g.answers = [Answer([i], [0.0], f"t{i}", "stop", 0) for i in range(2)]
        g.rewards = [Reward({"total": t}, text_hash(f"t{i}")) for i, t in enumerate(totals)]
        g.advantages = group_advantages(torch.tensor(totals), 2, "std").tolist()
    return groups


def test_check_batch_names_the_broken_invariant():
    groups = _groups()
    batch = learner_batch(groups, 8, version=0)
    check_batch(groups, batch, {0}, 0)
    swapped = learner_batch(groups, 8, version=0)
    swapped.sequences[0].advantage, swapped.sequences[2].advantage = (
        batch.sequences[2].advantage, batch.sequences[0].advantage)
    with pytest.raises(InvariantError, match="not that answer's"):
        check_batch(groups, swapped, {0}, 0)
    with pytest.raises(InvariantError, match="trained twice"):
        check_batch(groups, LearnerBatch(batch.sequences + batch.sequences[:1]), {0}, 0)
    with pytest.raises(InvariantError, match="missing"):
        check_batch(groups, LearnerBatch(batch.sequences[1:]), {0}, 0)
    with pytest.raises(InvariantError, match="appears twice"):
        check_batch([groups[0], groups[0]], LearnerBatch([]), {0}, 0)


def test_advantages_from_another_group_stop_the_run():
    """Group b's rewards are [5, 2]: group a's advantages (for [0, 1]) order them the wrong way."""
    groups = _groups()
    groups[1].advantages = groups[0].advantages
    with pytest.raises(InvariantError, match="do not order its rewards"):
        check_batch(groups, learner_batch(groups, 8, version=0), {0}, 0)
    groups = _groups()
    groups[1].advantages = [a + 1.0 for a in groups[1].advantages]  # not normalised within the group
    with pytest.raises(InvariantError, match="do not sum to 0"):
        check_batch(groups, learner_batch(groups, 8, version=0), {0}, 0)


def test_a_reward_of_another_answer_stops_the_run():
    """Reward i must have scored answer i's text: rewards in the wrong order are caught by their hashes."""
    groups = _groups()
    groups[0].rewards.reverse()
    groups[0].advantages.reverse()
    with pytest.raises(InvariantError, match="reward 0 scored another text than answer 0"):
        check_batch(groups, learner_batch(groups, 8, version=0), {0}, 0)


def test_make_groups_renames_ids_taken_earlier_in_the_step():
    groups, renamed = make_groups([sample("a"), sample("b"), sample("a")], 4, {"4:b"})
    assert [g.uid for g in groups] == ["4:a", "4:b#2", "4:a#2"] and renamed == 2
    assert [g.sample.id for g in groups] == ["a", "b", "a"]
