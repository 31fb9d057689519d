"""What flows through one GRPO step, as types, and the step's run-time invariants.

    groups, renamed = make_groups(samples, step=7, taken=set())   # ids unique within the step
    # rollout fills group.prompt and group.answers (G Answers), the reward pool group.rewards (G Rewards),
    # the driver group.advantages (learner.grpo.group_advantages)
    batch = learner_batch(groups, image_size, version=2, position=9)   # one LearnerSequence per answer
    check_batch(groups, batch, versions={0, 1, 2}, max_staleness=0)

Nothing is matched by position across separate lists: a sequence carries its group's uid and its
answer's index, a reward the hash of the text it scored, and ``check_batch`` verifies the invariants
of every step (whose reward, whose advantage, trained once, which weight version), raising
``InvariantError`` naming the one that broke.

The neutral module of the house: rollout/, reward/, learner/ and cluster/ import it; it imports none
of them (only ``data``). Plain Python, no Ray, no torch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from data.dataset import Sample


class InvariantError(RuntimeError):
    """A run-time invariant of the GRPO step broke: the step's numbers would be silently wrong."""


def text_hash(text: str) -> str:
    """A short digest of a response's text: what a reward row names as the answer it scored."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


@dataclass
class Answer:
    """One sampled answer: what vLLM returned for it and the weight version that produced it."""
    token_ids: list[int]
    logprobs: list[float]          # the sampled distribution's log p of each token (rollout/worker.py)
    text: str
    finish_reason: str | None
    weight_version: int


@dataclass
class Reward:
    """The reward of one answer: each term and ``total`` (the weighted sum, reward/worker.py), and the
    hash of the response text it was computed from (``text_hash``)."""
    terms: dict[str, float]
    response_hash: str

    @property
    def total(self) -> float:
        return self.terms["total"]


@dataclass
class Group:
    """One prompt of a step and everything made for it.

    ``uid`` is unique within the job (``<step>:<sample id>``, with ``#k`` appended to an id already
    used in the step): the reward pool and the learner batch key on it. ``answers`` is empty when the
    prompt could not be sampled (longer than rollout.max_model_len); such a group is dropped.
    """
    uid: str
    sample: Sample
    prompt: str = ""                                   # the chat text the answers continue
    answers: list[Answer] = field(default_factory=list)
    rewards: list[Reward] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)

    @property
    def totals(self) -> list[float]:
        return [r.total for r in self.rewards]

    def informative(self) -> bool:
        """Whether the G rewards differ: a tied group has zero advantage and no gradient (DAPO)."""
        return len(set(self.totals)) > 1


@dataclass
class LearnerSequence:
    """One sequence the learner trains on or scores: a prompt with its image, and the response tokens.

    GRPO sets every field; the warm start and the parity probe only the first three. ``loss_mask``
    marks the response tokens that carry loss, KL and entropy (None: all of them; a multi-turn episode
    masks the turns the policy did not write)."""
    prompt: str
    image: object                                      # PIL image at model size, shared by a group's G sequences
    response_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # the sampler's, one per response token
    advantage: float = 0.0
    loss_mask: list[int] | None = None
    group: str = ""                                    # the Group's uid
    answer: int = 0                                    # the answer's index in its group
    weight_version: int = 0                            # the weights that sampled it

    @property
    def num_loss_tokens(self) -> int:
        return len(self.response_ids) if self.loss_mask is None else int(sum(self.loss_mask))


@dataclass
class LearnerBatch:
    """The learner's input for one update. ``num_tokens`` and ``num_seqs`` count the WHOLE batch (its
    loss normalisers, learner/grpo.py), also in a rank's shard; None: counted over every rank's
    shard by the learner. ``version`` is the learner's weight version before this update: sequences
    sampled with it are on-policy (the logprob-drift check). ``position``: the update's place in the
    learning-rate schedule (learner/engine.py ``learning_rate``)."""
    sequences: list[LearnerSequence]
    num_tokens: int | None = None
    num_seqs: int | None = None
    version: int = 0
    position: int = 0

    def __len__(self) -> int:
        return len(self.sequences)

    def totals(self) -> tuple[int, int]:
        """(loss tokens, sequences with at least one) of these sequences."""
        return (sum(s.num_loss_tokens for s in self.sequences),
                sum(1 for s in self.sequences if s.num_loss_tokens))

    def shards(self, world: int) -> list["LearnerBatch"]:
        """Sequence i to rank i mod world, each shard carrying the whole batch's counts."""
        tokens, seqs = self.totals()
        return [LearnerBatch(self.sequences[r::world], tokens, seqs, self.version, self.position) for r in range(world)]


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


def learner_batch(groups: list[Group], image_size: int, version: int, position: int = 0) -> LearnerBatch:
    """The learner's sequences: one per answer, in group order, each tagged with its group's uid and
    its answer's index (what check_batch verifies). One image object per group: Ray pickles it once."""
    sequences = []
    for g in groups:
        image = g.sample.model_image(image_size)
        for i, (answer, advantage) in enumerate(zip(g.answers, g.advantages, strict=True)):
            sequences.append(LearnerSequence(g.prompt, image, answer.token_ids, answer.logprobs, advantage,
                                             group=g.uid, answer=i, weight_version=answer.weight_version))
    return LearnerBatch(sequences, version=version, position=position)


def check_batch(groups: list[Group], batch: LearnerBatch, versions: set[int], max_staleness: int) -> None:
    """The run-time invariants of a step; raises InvariantError naming the first one that broke.

    - each group appears once (uid), and has one reward and one advantage per answer;
    - reward i scored answer i: its response hash is answer i's text's;
    - each group's advantages are its own: they sum to 0 and order its answers as its rewards do
      (equal rewards, equal advantages);
    - each answer was sampled with a weight version the learner produced and pushed (``versions``),
      at most ``max_staleness`` versions behind ``batch.version`` (0 on-policy, 1 one-step off-policy);
    - each sequence belongs to a group of the step, each (group, answer) is trained exactly once, with
      that answer's advantage.
    """
    by_uid: dict[str, Group] = {}
    for g in groups:
        if g.uid in by_uid:
            raise InvariantError(f"group {g.uid} appears twice in one step")
        by_uid[g.uid] = g
        _check_group(g, versions, batch.version, max_staleness)
    seen = set()
    for seq in batch.sequences:
        key = (seq.group, seq.answer)
        g = by_uid.get(seq.group)
        if g is None:
            raise InvariantError(f"a sequence of group {seq.group} belongs to no group of this step")
        if key in seen:
            raise InvariantError(f"group {key[0]} answer {key[1]} is trained twice in one step")
        seen.add(key)
        if seq.advantage != g.advantages[seq.answer]:
            raise InvariantError(f"group {key[0]} answer {key[1]}: the sequence's advantage is not that answer's")
    missing = sum(len(g.answers) for g in groups) - len(seen)
    if missing:
        raise InvariantError(f"{missing} answers of this step's groups are missing from the learner batch")


def _check_group(g: Group, versions: set[int], newest: int, max_staleness: int) -> None:
    if not (len(g.answers) == len(g.rewards) == len(g.advantages)) or not g.answers:
        raise InvariantError(f"group {g.uid}: {len(g.answers)} answers, {len(g.rewards)} rewards, "
                             f"{len(g.advantages)} advantages")
    for i, (answer, reward) in enumerate(zip(g.answers, g.rewards)):
        if reward.response_hash != text_hash(answer.text):
            raise InvariantError(f"group {g.uid}: reward {i} scored another text than answer {i}")
    scale = max(1.0, max(abs(a) for a in g.advantages))
    if abs(sum(g.advantages)) > 1e-4 * scale * len(g.advantages):
        raise InvariantError(f"group {g.uid}: advantages {g.advantages} do not sum to 0 (not normalised within it)")
    for i, (r_i, a_i) in enumerate(zip(g.totals, g.advantages)):
        for r_j, a_j in zip(g.totals[i + 1:], g.advantages[i + 1:]):
            if (r_i - r_j) * (a_i - a_j) < 0 or (r_i == r_j and abs(a_i - a_j) > 1e-6 * scale):
                raise InvariantError(f"group {g.uid}: advantages {g.advantages} do not order its rewards {g.totals}")
    for a in g.answers:
        if a.weight_version not in versions:
            raise InvariantError(f"group {g.uid}: an answer reports weight version {a.weight_version}, "
                                 f"which the learner never pushed (pushed: {sorted(versions)[-5:]})")
        if newest - a.weight_version > max_staleness:
            raise InvariantError(f"group {g.uid}: an answer from weight version {a.weight_version} trains "
                                 f"version {newest} (at most {max_staleness} behind)")


def reward_metrics(groups: list[Group], prefix: str = "reward") -> dict[str, float]:
    """``<prefix>/<term>``: the mean of every reward term over the groups' answers."""
    rewards = [r.terms for g in groups for r in g.rewards]
    if not rewards:
        return {}
    terms = sorted({k for r in rewards for k in r})
    return {f"{prefix}/{k}": sum(r.get(k, 0.0) for r in rewards) / len(rewards) for k in terms}


def batch_metrics(trained: list[Group], generated: list[Group]) -> dict[str, float]:
    """``reward/*`` over every group the step generated (refills and groups dynamic sampling dropped
    included), ``reward/trained/*`` over the trained ones; advantage statistics and response lengths
    of the trained groups."""
    adv = [a for g in trained for a in g.advantages]
    mean = sum(adv) / len(adv)
    std = (sum((a - mean) ** 2 for a in adv) / (len(adv) - 1)) ** 0.5 if len(adv) > 1 else 0.0
    lengths = [len(a.token_ids) for g in trained for a in g.answers]
    return {**reward_metrics(generated), **reward_metrics(trained, "reward/trained"),
            "adv/mean": mean, "adv/std": std, "adv/min": min(adv), "adv/max": max(adv),
            "response/length_mean": sum(lengths) / len(lengths), "response/length_max": max(lengths),
            "batch/prompts": len(trained), "batch/sequences": len(lengths)}
