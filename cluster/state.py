"""The training loop's state: one small object the loop (launch.py) owns and alone writes. Checkpoints
save it (cluster/job.py ``save_checkpoint``) and give it back (``restore``); learner recovery returns
the state to continue from (``recover``); everything else of the job (actors, nodes, events) is the
job's own."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0          # the last GRPO step trained
    sft_done: int = 0      # warm-start steps trained
    version: int = 0       # the learner's weight version: one per optimizer step (warm start and GRPO)
    pending: object = None  # one-step off-policy: the next step's round (cluster.rollout RolloutRound/CompletedRound)
    best: dict | None = None  # the best evaluation so far: {"step", "giou", "giou_se", "rows"} (eval.keep_best)
    run_id: str | None = None  # the MLflow run

    def saved(self) -> dict:
        """What a checkpoint stores of it (the pending round as its finished (groups, timings))."""
        return {"step": self.step, "sft_done": self.sft_done, "weight_version": self.version, "best": self.best,
                "mlflow_run_id": self.run_id, "pending": self.pending.finish() if self.pending is not None else None}
