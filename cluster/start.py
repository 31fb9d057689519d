"""Connect to Ray and start the actors of a job: learner ranks, rollout workers.

The actors are the plain classes of learner/ and rollout/ made remote with ``ray.remote(cls)``; their
resources come from ``cluster.{rollout,reward,learner}`` in the config.
"""
from __future__ import annotations

import logging
import os
import socket

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.controller import NAMESPACE
from config import REPO, Config, ResourcesConfig

log = logging.getLogger(__name__)


def connect(cfg: Config) -> str:
    """Join the Ray cluster the job runs on, else start a local one sized for the configured actors.

    Inside ``ray job submit`` RAY_ADDRESS is set and we join that cluster; ``cluster.address`` forces an
    address. Otherwise a local Ray starts with logical CPUs for twice the configured actors (room to
    scale; actors time-share the physical cores, their torch thread counts are set per actor).
    """
    if ray.is_initialized():
        return "existing"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false",
           # vLLM's per-request INFO lines drown the progress bar; VLLM_LOGGING_LEVEL=INFO brings them back.
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, namespace=NAMESPACE)
        return address
    c = cfg.cluster
    need = (c.rollout_workers * c.rollout.num_cpus + c.reward_workers * c.reward.num_cpus
            + c.learner_ranks * c.learner.num_cpus)
    # Logical CPUs for twice the configured actors, so `cluster.scale` can grow the pools on this machine.
    ray.init(address="local", num_cpus=max(2 * int(need + 0.999), os.cpu_count() or 1), include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=True, namespace=NAMESPACE)
    return "local"


def actor_options(res: ResourcesConfig, **extra) -> dict:
    """Ray actor options for one actor of a pool: resources + thread count of torch/OpenMP."""
    threads = str(res.torch_threads)
    return dict(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
                **extra)


@ray.remote(num_cpus=0)
def _address_and_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def start_learners(cfg: Config, policy_path: str) -> list:
    """One actor per learner rank, packed in a placement group; rank 0's node hosts the rendezvous."""
    from learner.learner import Learner

    res = cfg.cluster.learner
    bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
    pg = placement_group([bundle] * cfg.cluster.learner_ranks, strategy="PACK")
    ray.get(pg.ready(), timeout=cfg.cluster.startup_timeout_s)
    in_bundle = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
    addr, port = ray.get(_address_and_port.options(scheduling_strategy=in_bundle(0)).remote())
    remote_learner = ray.remote(Learner)
    world = cfg.cluster.learner_ranks
    return [remote_learner.options(**actor_options(res, scheduling_strategy=in_bundle(r)))
            .remote(cfg, policy_path, rank=r, world_size=world, master_addr=addr, master_port=port)
            for r in range(world)]


def start_rollout_workers(cfg: Config, policy_path: str, count: int, first_index: int = 0) -> list:
    """``count`` vLLM rollout actors; restarted by Ray if they die (their prompts are redone)."""
    from rollout.worker import RolloutWorker

    remote_worker = ray.remote(RolloutWorker)
    return [remote_worker.options(**actor_options(cfg.cluster.rollout, max_restarts=-1, max_task_retries=0))
            .remote(cfg, policy_path, seed=cfg.train.seed + first_index + i)
            for i in range(count)]
