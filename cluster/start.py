"""Connect to Ray and start the actors of a job: learner ranks, rollout workers.

The actors are the plain classes of learner/ and rollout/ made remote with ``ray.remote(cls)``; their
resources come from ``cluster.{rollout,reward,learner}`` in the config.

Placement:
- learner ranks: one placement group (PACK), bundle r = rank r ({CPU, GPU} from ``cluster.learner``);
- rollout workers with ``rollout.tensor_parallel_size`` TP > 1 on GPUs: one placement group per
  engine, TP bundles {GPU: 1, CPU: c}, STRICT_PACK (an engine's GPUs on one node). The rollout actor
  holds no GPU itself and sits in bundle 0; vLLM finds that group as the actor's current placement
  group, picks its Ray executor and starts one worker actor per GPU bundle. Otherwise (TP = 1, or CPU)
  one plain actor with ``cluster.rollout`` resources;
- reward workers: plain actors with ``cluster.reward`` resources (fractional GPUs pack several per GPU).
``PLACEMENT`` remembers which (group, bundle) each actor was started in, for the topology summary and
so that removing a rollout worker frees its group.
"""
from __future__ import annotations

import logging
import os
import socket

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.controller import NAMESPACE
from config import REPO, Config, ResourcesConfig

log = logging.getLogger(__name__)

# actor -> (its placement group, its bundle index), for actors started in a group by this driver.
PLACEMENT: dict[ActorHandle, tuple[PlacementGroup, int]] = {}


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
    ranks = [remote_learner.options(**actor_options(res, scheduling_strategy=in_bundle(r)))
             .remote(cfg, policy_path, rank=r, world_size=world, master_addr=addr, master_port=port)
             for r in range(world)]
    PLACEMENT.update({actor: (pg, r) for r, actor in enumerate(ranks)})
    return ranks


def rollout_placement(cfg: Config, timeout_s: float | None = None) -> tuple[dict, PlacementGroup | None]:
    """Ray actor options for ONE rollout actor (one vLLM engine), and the placement group made for it.

    TP = rollout.tensor_parallel_size > 1 with GPUs (cluster.rollout.num_gpus > 0): a new group of TP
    bundles {GPU: 1, CPU: cluster.rollout.num_cpus}, STRICT_PACK, waited for up to ``timeout_s``; the
    options put the actor in bundle 0 with the bundle's CPUs and no GPU (vLLM's TP worker actors take
    one GPU bundle each), and capture its child tasks/actors in the group. Else: no group, the actor
    asks for ``cluster.rollout`` resources (num_gpus 1 per engine on GPUs, 0 on CPU).
    """
    res, tp = cfg.cluster.rollout, cfg.rollout.tensor_parallel_size
    if tp == 1 or res.num_gpus == 0:
        return actor_options(res), None
    if res.num_gpus != 1:
        raise ValueError(f"cluster.rollout.num_gpus must be 1 (one GPU per tensor-parallel rank) with "
                         f"rollout.tensor_parallel_size={tp}, got {res.num_gpus}")
    bundle = {"GPU": 1, "CPU": res.num_cpus}
    pg = placement_group([bundle] * tp, strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s if timeout_s is not None else cfg.cluster.startup_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise TimeoutError(f"rollout: no node could hold a placement group of {tp} x {bundle} (one vLLM "
                           f"engine, tensor_parallel_size={tp}, STRICT_PACK: all on one node) within the "
                           f"timeout; cluster resources: {ray.cluster_resources()}") from None
    options = actor_options(res, scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
    options["num_gpus"] = 0
    return options, pg


def start_rollout_workers(cfg: Config, policy_path: str, count: int, first_index: int = 0) -> list:
    """``count`` vLLM rollout actors, each placed by ``rollout_placement``; restarted by Ray if they die
    (their prompts are redone), in their own placement group again when they have one."""
    from rollout.worker import RolloutWorker

    remote_worker = ray.remote(RolloutWorker)
    workers = []
    for i in range(count):
        options, pg = rollout_placement(cfg)
        actor = (remote_worker.options(**options, max_restarts=-1, max_task_retries=0)
                 .remote(cfg, policy_path, seed=cfg.train.seed + first_index + i))
        if pg is not None:
            PLACEMENT[actor] = (pg, 0)
        workers.append(actor)
    return workers


def stop_rollout_workers(workers: list) -> None:
    """Kills rollout actors (no restart) and frees their placement groups (vLLM's TP worker actors,
    owned by the rollout actor, die with it)."""
    for actor in workers:
        ray.kill(actor, no_restart=True)
        pg, _ = PLACEMENT.pop(actor, (None, 0))
        if pg is not None:
            remove_placement_group(pg)
