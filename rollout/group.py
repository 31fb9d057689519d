"""What flows through one GRPO step, as types: a ``Group`` per prompt, built once and carried through
generation, reward scoring, dynamic sampling, advantages, the learner batch and the step's metrics.

    groups = make_groups(samples, step=7, taken=set())   # ids unique within the step
    # rollout fills group.prompt and group.answers (G Answers), the reward pool group.rewards
    for g in groups: g.advantages = g.compute_advantages("std")
    batch = learner_batch(groups, image_size)           # one sequence per answer, tagged with its group
    check_batch(groups, batch, versions={0, 1, 2}, newest=2, max_staleness=0, adv_scale="std")

Nothing is matched by position across separate lists: a sequence carries its group's uid and its
answer's index, and ``check_batch`` verifies the run-time invariants of every step (whose advantage,
trained once, which weight version) and raises ``InvariantError`` naming the one that broke.
Plain Python (no Ray); the driver, the rollout round and the tests all use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data.dataset import Sample
from learner.grpo import group_advantages


class InvariantError(RuntimeError):
    """A run-time invariant of the GRPO step broke: the step's numbers would be silently wrong."""


@dataclass
class Answer:
    """One sampled answer: what vLLM returned for it and the weight version that produced it."""
    token_ids: list[int]
    logprobs: list[float]          # log softmax(logits / T)[token], one per token (sampling logprobs)
    text: str
    finish_reason: str | None
    weight_version: int


@dataclass
class Group:
    """One prompt of a step and everything made for it.

    ``uid`` is unique within the job (``<step>:<sample id>``, with ``#k`` appended to an id already
    used in the step): the reward pool and the learner batch key on it. ``answers`` is empty when the
    prompt could not be sampled (longer than rollout.max_model_len); such a group is dropped.
    """
    uid: str
    sample: Sample
    prompt: str = ""                                            # the chat text the answers continue
    answers: list[Answer] = field(default_factory=list)
    rewards: list[dict[str, float]] = field(default_factory=list)  # per answer: each term and "total"
    advantages: list[float] = field(default_factory=list)

    @property
    def totals(self) -> list[float]:
        return [r["total"] for r in self.rewards]

    def informative(self) -> bool:
        """Whether the G rewards differ: a tied group has zero advantage and no gradient (DAPO)."""
        return len(set(self.totals)) > 1

    def compute_advantages(self, scale: str) -> list[float]:
        """This group's rewards normalised within the group (learner.grpo.group_advantages)."""
        return group_advantages(torch.tensor(self.totals), len(self.totals), scale).tolist()


def make_groups(samples: list[Sample], step: int, taken: set[str]) -> tuple[list[Group], int]:
    """One Group per sample, uid ``<step>:<sample id>``. A uid already in ``taken`` (the step's earlier
    groups: an epoch boundary, a dataset smaller than a batch, duplicate ids in a converted file) gets
    ``#k`` appended, so each id appears once per step; returns (groups, how many were renamed).
    ``taken`` is updated."""
    groups, renamed = [], 0
    for sample in samples:
        uid, k = f"{step}:{sample.id}", 1
        while uid in taken:
            k += 1
            uid = f"{step}:{sample.id}#{k}"
        renamed += k > 1
        taken.add(uid)
        groups.append(Group(uid=uid, sample=sample))
    return groups, renamed


def learner_batch(groups: list[Group], image_size: int) -> list[dict]:
    """The learner's sequences: one per answer, in group order, each tagged with its group's uid and
    its answer's index (what check_batch verifies). One image object per group: Ray pickles it once."""
    batch = []
    for g in groups:
        image = g.sample.model_image(image_size)
        for i, (answer, advantage) in enumerate(zip(g.answers, g.advantages, strict=True)):
            batch.append({"group": g.uid, "answer": i, "sample_id": g.sample.id, "prompt": g.prompt, "image": image,
                          "response_ids": answer.token_ids, "logprobs": answer.logprobs, "advantage": advantage,
                          "weight_version": answer.weight_version})
    return batch


def check_batch(groups: list[Group], batch: list[dict], versions: set[int], newest: int, max_staleness: int,
                adv_scale: str) -> None:
    """The run-time invariants of a step; raises InvariantError naming the first one that broke.

    - each group appears once (uid), and has one reward and one advantage per answer;
    - each group's advantages are its own rewards normalised within it (recomputed here);
    - each sequence belongs to a group of the step, each (group, answer) is trained exactly once, and
      its tokens and advantage are that answer's;
    - each answer was sampled with a weight version the learner produced and pushed (``versions``),
      at most ``max_staleness`` versions behind ``newest`` (0 on-policy, 1 one-step off-policy).
    """
    by_uid: dict[str, Group] = {}
    for g in groups:
        if g.uid in by_uid:
            raise InvariantError(f"group {g.uid} appears twice in one step")
        by_uid[g.uid] = g
        if not (len(g.answers) == len(g.rewards) == len(g.advantages)) or not g.answers:
            raise InvariantError(f"group {g.uid}: {len(g.answers)} answers, {len(g.rewards)} rewards, "
                                 f"{len(g.advantages)} advantages")
        own = g.compute_advantages(adv_scale)
        if any(abs(a - b) > 1e-6 for a, b in zip(own, g.advantages)):
            raise InvariantError(f"group {g.uid}: advantages {g.advantages} are not its rewards' {own}")
        for a in g.answers:
            if a.weight_version not in versions:
                raise InvariantError(f"group {g.uid}: an answer reports weight version {a.weight_version}, "
                                     f"which the learner never pushed (pushed: {sorted(versions)[-5:]})")
            if newest - a.weight_version > max_staleness:
                raise InvariantError(f"group {g.uid}: an answer from weight version {a.weight_version} trains "
                                     f"version {newest} (at most {max_staleness} behind)")
    seen = set()
    for seq in batch:
        key = (seq["group"], seq["answer"])
        g = by_uid.get(seq["group"])
        if g is None:
            raise InvariantError(f"a sequence of group {seq['group']} belongs to no group of this step")
        if key in seen:
            raise InvariantError(f"group {key[0]} answer {key[1]} is trained twice in one step")
        seen.add(key)
        answer = g.answers[seq["answer"]]
        if list(seq["response_ids"]) != list(answer.token_ids) or seq["advantage"] != g.advantages[seq["answer"]]:
            raise InvariantError(f"group {key[0]} answer {key[1]}: the sequence's tokens or advantage are "
                                 "not that answer's")
    missing = sum(len(g.answers) for g in groups) - len(seen)
    if missing:
        raise InvariantError(f"{missing} answers of this step's groups are missing from the learner batch")


def batch_metrics(groups: list[Group]) -> dict[str, float]:
    """Mean of every reward term, advantage statistics and response lengths over the trained groups."""
    rewards = [r for g in groups for r in g.rewards]
    terms = sorted({k for r in rewards for k in r})
    m = {f"reward/{k}": sum(r.get(k, 0.0) for r in rewards) / len(rewards) for k in terms}
    adv = torch.tensor([a for g in groups for a in g.advantages])
    lengths = [len(a.token_ids) for g in groups for a in g.answers]
    m.update({"adv/mean": adv.mean().item(), "adv/std": adv.std().item() if len(adv) > 1 else 0.0,
              "adv/min": adv.min().item(), "adv/max": adv.max().item(),
              "response/length_mean": sum(lengths) / len(lengths), "response/length_max": max(lengths),
              "batch/prompts": len(groups), "batch/sequences": len(lengths)})
    return m
