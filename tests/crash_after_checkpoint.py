"""Runs launch.py and kills it with SIGKILL right after the checkpoint of GRPO step N is complete: a
crash at a point fixed by the job's own progress, not by a timer (tests/test_launch.py).

    python -m tests.crash_after_checkpoint N [launch.py arguments ...]

Start it in a new session: the whole process group (the driver and the local Ray it started) dies.
"""
import os
import signal
import sys

import launch
from cluster.job import Job

if __name__ == "__main__":
    stop_at = int(sys.argv[1])
    save = Job.save_checkpoint

    def save_then_die(job, state):
        path = save(job, state)
        if state.step == stop_at:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        return path

    Job.save_checkpoint = save_then_die
    sys.exit(launch.main(sys.argv[2:]))
