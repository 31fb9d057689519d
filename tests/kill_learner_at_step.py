"""Runs launch.py and SIGKILLs learner rank 0's process at GRPO step N, after the step's rollouts and
rewards, as its update is sent: a learner crash at a point fixed by the job's own progress
(tests/test_launch.py). The job restarts its learner group from the latest checkpoint by itself.

    python -m tests.kill_learner_at_step N [launch.py arguments ...]
"""
import os
import signal
import sys

import ray

import launch
from cluster.learners import LearnerGroup

if __name__ == "__main__":
    kill_at, killed = int(sys.argv[1]), []
    grpo_step, train_step = launch.grpo_step, LearnerGroup.train_step

    def grpo_step_noting_the_step(job, step):
        LearnerGroup.step = step
        return grpo_step(job, step)

    def train_step_after_a_kill(self, batch, while_waiting=None):
        if self.step == kill_at and not killed:
            pid = ray.get(self.ranks[0].__ray_call__.remote(lambda _: os.getpid()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            print(f"killed learner rank 0 (pid {pid}) at GRPO step {kill_at}", file=sys.stderr, flush=True)
        return train_step(self, batch, while_waiting)

    launch.grpo_step, LearnerGroup.train_step = grpo_step_noting_the_step, train_step_after_a_kill
    sys.exit(launch.main(sys.argv[2:]))
