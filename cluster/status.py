"""Print a running job's state: step, topology, weight versions, queue depths, last step timings.

    python -m cluster.status [--job seg-grpo] [--address ADDR] [--json]
"""
from __future__ import annotations

import argparse
import json

import ray

from cluster.controller import find_controller
from cluster.topology import format_topology


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="seg-grpo")
    p.add_argument("--address", default=None)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    args = p.parse_args(argv)
    status = ray.get(find_controller(args.job, args.address).status.remote(), timeout=30)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    if not status.get("step") and not status.get("topology"):
        print(f"job {args.job}: starting (no step finished yet)")
        return 0
    print(f"job {args.job}: step {status.get('step')}/{status.get('steps')}, phase {status.get('phase')}, "
          f"learner weight version {status.get('weight_version')}")
    print(format_topology(status.get("topology", [])))
    print("rollout weight versions:", status.get("rollout_versions"))
    print("reward queue depth per worker:", status.get("reward_inflight"))
    if status.get("pending_requests"):
        print("pending scaling requests:", status["pending_requests"])
    timings = {k: round(v, 3) for k, v in status.get("last_step", {}).items()}
    print("last step:", timings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
