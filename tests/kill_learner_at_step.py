"""Runs launch.py and SIGKILLs learner rank 0's process at points fixed by the job's own progress
(tests/test_launch.py), each once:

    python -m tests.kill_learner_at_step POINTS [launch.py arguments ...]

POINTS, comma-separated: ``grpoN`` (GRPO step N, after its rollouts and rewards, as its update is sent),
``sftN`` (warm-start step N, as its update is sent), ``export`` (the final policy's export, after the
final evaluation and checkpoint). The job restarts its learner group by itself each time.
"""
import os
import signal
import sys

import ray

import launch
from cluster.learners import LearnerGroup

done: set[str] = set()
counts = {"sft": 0}


def kill_rank0(group, point: str) -> None:
    pid = ray.get(group.ranks[0].__ray_call__.remote(lambda _: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    done.add(point)
    print(f"killed learner rank 0 (pid {pid}) at {point}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    points = set(sys.argv[1].split(","))
    grpo_step, train_step = launch.grpo_step, LearnerGroup.train_step
    sft_step, export_hf = LearnerGroup.sft_step, LearnerGroup.export_hf

    def grpo_step_noting_the_step(job, state, step):
        LearnerGroup.step = step
        return grpo_step(job, state, step)

    def train_step_after_a_kill(self, batch, while_waiting=None):
        point = f"grpo{self.step}"
        if point in points - done:
            kill_rank0(self, point)
        return train_step(self, batch, while_waiting)

    def sft_step_after_a_kill(self, batch):
        counts["sft"] += 1
        point = f"sft{counts['sft']}"
        if point in points - done:
            kill_rank0(self, point)
        return sft_step(self, batch)

    def export_after_a_kill(self, out_dir):
        if str(out_dir).endswith("final_policy") and "export" in points - done:
            kill_rank0(self, "export")
        return export_hf(self, out_dir)

    launch.grpo_step = grpo_step_noting_the_step
    LearnerGroup.train_step, LearnerGroup.sft_step = train_step_after_a_kill, sft_step_after_a_kill
    LearnerGroup.export_hf = export_after_a_kill
    sys.exit(launch.main(sys.argv[2:]))
