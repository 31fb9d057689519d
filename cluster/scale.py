"""Change a running job's worker counts: applied between steps, no sample lost or repeated.

    python -m cluster.scale --reward-workers 2 --rollout-workers 2 [--at-step N] [--job seg-grpo] [--address ADDR]

New rollout workers receive the current weights before they generate. Resource requests that no node
can hold stay pending, which is what Ray's autoscaler acts on (it adds nodes when configured).
"""
from __future__ import annotations

import argparse

import ray

from cluster.controller import find_controller


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward-workers", type=int)
    p.add_argument("--rollout-workers", type=int)
    p.add_argument("--at-step", type=int, default=None,
                   help="apply once the job reaches this GRPO step (default: after the current step)")
    p.add_argument("--job", default="seg-grpo", help="cluster.job_name of the running job")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or the local cluster)")
    args = p.parse_args(argv)
    if args.reward_workers is None and args.rollout_workers is None:
        p.error("give --reward-workers and/or --rollout-workers")
    controller = find_controller(args.job, args.address)
    pending = ray.get(controller.request.remote(args.rollout_workers, args.reward_workers, args.at_step), timeout=30)
    print(f"pending requests: {pending}; the job applies them between steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
