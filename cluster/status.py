"""Print a running job's live state: step, actors (role, node, pid, state, restarts, weight version, queue
depth, placement), nodes, the last step's time breakdown, the reward autoscaler's last decision, recent
events (node lost, learner restarted, pool autoscaled) and pending scaling requests.

    python -m cluster.status [--job seg-grpo] [--address ADDR] [--json] [--watch [SECONDS]]

The job refreshes what it publishes after every GRPO step; an actor's row changes as soon as it has
answered (a busy rollout worker answers when its generation ends).
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime

import ray

from cluster.controller import find_controller
from cluster.topology import format_topology


def format_status(job: str, status: dict) -> str:
    if not status.get("step") and not status.get("topology"):
        return f"job {job}: starting (no step finished yet)"
    lines = [f"job {job} ({status.get('run')}, MLflow run {status.get('mlflow_run_id')}): step "
             f"{status.get('step')}/{status.get('steps')}, phase {status.get('phase')}, learner weight version "
             f"{status.get('weight_version')}, learner restarts {status.get('learner_restarts', 0)}",
             format_topology(status.get("topology", [])),
             f"nodes alive: {len(status.get('nodes', []))} "
             f"({', '.join(n['address'] for n in status.get('nodes', []))})",
             "last step: " + ", ".join(f"{k.removeprefix('time/')} {v:.2f} s"
                                       for k, v in status.get("last_step", {}).items())]
    if status.get("autoscale"):
        a = status["autoscale"]
        lines.append(f"reward autoscaler: {a['workers']} workers ({a['change']:+d}): {a['reason']}")
    if status.get("pending_requests"):
        lines.append(f"pending scaling requests: {status['pending_requests']}")
    for e in status.get("events", []):
        details = {k: v for k, v in e.items() if k not in ("step", "kind", "time")}
        lines.append(f"event {datetime.fromtimestamp(e['time']):%H:%M:%S} step {e['step']}: {e['kind']} {details}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="seg-grpo", help="cluster.job_name of the running job")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or the local cluster)")
    p.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="print it again every SECONDS (default 2) until interrupted")
    args = p.parse_args(argv)
    controller = find_controller(args.job, args.address)
    while True:
        status = ray.get(controller.status.remote(), timeout=30)
        text = json.dumps(status, indent=2, default=str) if args.json else format_status(args.job, status)
        if args.watch is None:
            print(text)
            return 0
        print("\033[2J\033[H" + text if not args.json else text, flush=True)  # clear the screen between prints
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
