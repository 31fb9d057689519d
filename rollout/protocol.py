"""The rollout protocol: how a step's groups become requests to the rollout workers, and how their
answers come back into the groups, turn by turn. Plain Python (no Ray): cluster/rollout.py's
RolloutRound only schedules it (dispatch, wait, redo, hand finished groups to the reward pool).

    chunks = plan_chunks(groups, chunk_size(B, workers), seed)   # Chunk(index, groups, seed + index)
    requests(chunk.groups, image_size)          # what RolloutWorker.generate takes for the next turn
    stale(outputs, version)                     # answers from older weights: the chunk is redone
    take_answers(group, output)                 # fills the group; True: its episode is over

A chunk is sampled with seed ``seed + index``, so a redone or resumed chunk draws the same answers.
One turn (Seg-Zero's protocol): each group's episode ends with its first G answers. A protocol of
several turns returns False from ``take_answers`` and builds the next turn's requests from the group's
answers so far (and tool results such as the segmenter's masks); the loss then covers only the
policy's own tokens (``trajectory.LearnerSequence.loss_mask``).
"""
from __future__ import annotations

from dataclasses import dataclass

from trajectory import Answer, Group


@dataclass
class Chunk:
    index: int
    groups: list[Group]
    seed: int | None


def chunk_size(prompts_per_step: int, workers: int) -> int:
    """Two chunks per worker, so that finished chunks reach the reward pool while others generate."""
    return max(1, prompts_per_step // (2 * workers))


def plan_chunks(groups: list[Group], size: int, seed: int | None) -> list[Chunk]:
    return [Chunk(i, groups[start:start + size], None if seed is None else seed + i)
            for i, start in enumerate(range(0, len(groups), size))]


def requests(groups: list[Group], image_size: int) -> list[dict]:
    """One request per group (the uid names it): the query and the image at model size."""
    return [{"sample_id": g.uid, "problem": g.sample.problem, "image": g.sample.model_image(image_size)}
            for g in groups]


def stale(outputs: list[dict], version: int) -> list[int]:
    """Weight versions older than the round's among the outputs (a worker restarted since the last sync)."""
    return [o["weight_version"] for o in outputs if o["weight_version"] < version]


def take_answers(group: Group, output: dict) -> bool:
    """The worker's output for the group (RolloutWorker.generate) as its prompt and Answers; whether the
    group's episode is over (always, with one turn). A prompt that did not fit gets no answers."""
    group.prompt = output["prompt"]
    group.answers = [Answer(r["token_ids"], r["logprobs"], r["text"], r.get("finish_reason"),
                            output["weight_version"]) for r in output["responses"]]
    return True
