"""The job's named controller actor: the address operators talk to while a job runs.

The driver publishes its status after every step and applies scaling requests between steps;
``python -m cluster.scale`` and ``python -m cluster.status`` find the actor by name
(``cluster.job_name`` in namespace ``seg-grpo``) on the job's Ray cluster.
"""
from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "seg-grpo"


@ray.remote(num_cpus=0)
class JobController:
    def __init__(self):
        self.requested: list[tuple[int, dict[str, int]]] = []  # (first step it applies to, sizes)
        self.state: dict = {}

    def request(self, rollout_workers: int | None = None, reward_workers: int | None = None,
                at_step: int | None = None) -> dict:
        """Ask for new pool sizes; applied by the driver between steps: at the next chance, or once the
        job reaches step ``at_step`` (before that step's rollouts)."""
        sizes = {}
        for name, value in (("rollout_workers", rollout_workers), ("reward_workers", reward_workers)):
            if value is not None:
                if value < 1:
                    raise ValueError(f"{name} must be >= 1, got {value}")
                sizes[name] = int(value)
        self.requested.append((int(at_step or 0), sizes))
        return self.pending()

    def take_requests(self, step: int) -> dict[str, int]:
        """The sizes due by ``step`` (later requests win), removed from the queue."""
        due = [sizes for at, sizes in self.requested if at <= step]
        self.requested = [(at, sizes) for at, sizes in self.requested if at > step]
        return {k: v for sizes in due for k, v in sizes.items()}

    def pending(self) -> dict:
        return {f"at step {at}" if at else "next step": sizes for at, sizes in self.requested}

    def publish(self, state: dict) -> None:
        self.state = state

    def status(self) -> dict:
        return {**self.state, "pending_requests": self.pending()}


def start_controller(job_name: str):
    """The job's controller; a stale one of a finished job with the same name is replaced."""
    try:
        ray.kill(ray.get_actor(job_name, namespace=NAMESPACE))
    except ValueError:
        pass
    # On the driver's node: operators' requests and the status must outlive any worker node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return JobController.options(name=job_name, namespace=NAMESPACE, lifetime=None, scheduling_strategy=here).remote()


def find_controller(job_name: str, address: str | None):
    """Connects to the job's cluster (address, $RAY_ADDRESS or the local one) and finds the controller."""
    ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    try:
        return ray.get_actor(job_name, namespace=NAMESPACE)
    except ValueError:
        raise SystemExit(f"no running job named {job_name!r} on this Ray cluster (cluster.job_name)") from None
