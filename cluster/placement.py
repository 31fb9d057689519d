"""Where the job's actors go: their Ray options and placement groups.

The actors are the plain classes of learner/, rollout/ and reward/ made remote with ``ray.remote(cls)``
(cluster/learners.py, cluster/rollout.py, cluster/reward_pool.py); their resources come from
``cluster.{rollout,reward,learner}`` in the config.

Placement:
- learner ranks: one placement group (PACK), bundle r = rank r ({CPU, GPU} from ``cluster.learner``);
- rollout workers with ``rollout.tensor_parallel_size`` TP > 1 on GPUs: one placement group per
  engine, TP bundles {GPU: 1, CPU: c}, STRICT_PACK (an engine's GPUs on one node). The rollout actor
  holds no GPU itself and sits in bundle 0; vLLM finds that group as the actor's current placement
  group, picks its Ray executor and starts one worker actor per GPU bundle. Otherwise (TP = 1, or CPU)
  one plain actor with ``cluster.rollout`` resources;
- reward workers: plain actors with ``cluster.reward`` resources (fractional GPUs pack several per GPU).
``PLACEMENT`` remembers which (group, bundle) each actor was started in, for the topology summary and
so that removing a rollout worker frees its group. ``wait_until_alive``: an actor Ray restarts answers again.
"""
from __future__ import annotations

import logging
import os
import socket
import time

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from config import Config, ResourcesConfig

log = logging.getLogger(__name__)

# actor -> (its placement group, its bundle index), for actors started in a group by this driver.
PLACEMENT: dict[ActorHandle, tuple[PlacementGroup, int]] = {}


def actor_options(res: ResourcesConfig, **extra) -> dict:
    """Ray actor options for one actor of a pool: resources + thread count of torch/OpenMP."""
    threads = str(res.torch_threads)
    return dict(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
                **({"resources": res.resources} if res.resources else {}), **extra)


@ray.remote(num_cpus=0)
def address_and_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def cuda_index(assigned: list, visible: str | None) -> int:
    """The CUDA device index of an actor's first assigned GPU. Ray normally sets CUDA_VISIBLE_DEVICES to
    the actor's GPUs, so that GPU is device 0; with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES (or any
    other CUDA_VISIBLE_DEVICES) it is the assigned id's position among the visible devices."""
    if not assigned:
        raise RuntimeError("no GPU assigned to this actor by Ray (cluster.*.num_gpus is 0)")
    gpu = str(assigned[0])
    if visible is None or visible == "":
        return int(gpu)
    ids = [v.strip() for v in visible.split(",")]
    if gpu not in ids:
        raise RuntimeError(f"Ray assigned GPU {gpu}, which CUDA_VISIBLE_DEVICES={visible} hides")
    return ids.index(gpu)


def assigned_cuda_device() -> int:
    """Inside an actor: the CUDA index of the GPU Ray assigned to it (the learner ranks call this)."""
    return cuda_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))


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
    bundle = {"GPU": 1, "CPU": res.num_cpus, **res.resources}
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
    options.pop("resources", None)  # the bundle holds them
    return options, pg


def free_placement(actor) -> None:
    """Forgets an actor's placement and removes its group when the actor had one of its own (a TP
    engine's); shared groups (the learner ranks') are removed by their owner."""
    pg, bundle = PLACEMENT.pop(actor, (None, 0))
    if pg is not None and bundle == 0 and not any(other_pg == pg for other_pg, _ in PLACEMENT.values()):
        remove_placement_group(pg)


def wait_until_alive(actor, deadline: float, setting: str = "cluster.call_timeout_s") -> None:
    """Blocks until a (restarting) actor answers; Ray says "unavailable" while it restarts. ``setting``:
    the config field the deadline comes from, named in the error."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"a restarted rollout worker did not come back before its deadline ({setting})")
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=left)
            return
        except (ActorUnavailableError, GetTimeoutError):
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
