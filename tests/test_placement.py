"""Placement of the job's actors on GPUs, checked on a local Ray with logical (fake) GPUs: Ray schedules
by resource counts, so the placement groups, bundles and GPU ids it hands out are the ones a GPU node
would get. Probe actors stand in for the rollout and reward actors (no vLLM engine on fake GPUs)."""
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")
from ray.util.placement_group import get_current_placement_group, placement_group_table  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from cluster.placement import PLACEMENT, actor_options, rollout_placement  # noqa: E402
from cluster.rollout import RolloutGroup  # noqa: E402
from cluster.topology import format_topology, topology  # noqa: E402
from config import load_config  # noqa: E402

GPUS = 5  # two TP=2 engines + one GPU shared by four reward workers
TP_CFG = ["rollout.tensor_parallel_size=2", "cluster.rollout.num_gpus=1", "cluster.rollout.num_cpus=1",
          "cluster.reward.num_gpus=0.25", "cluster.reward.num_cpus=0.25"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, num_gpus=GPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote
class Probe:
    """Reports where Ray put it, as the rollout/reward actor scheduled with the same options would be."""

    def where(self) -> dict:
        current = get_current_placement_group()  # what vLLM reads to pick its Ray executor and group
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "gpus": ray.get_gpu_ids(), "group": current.id.hex() if current else None}

    def start_tp_workers(self, tp: int) -> list:
        """As vLLM's Ray executor does: one worker per GPU bundle of the current group, 1 GPU, 0 CPU."""
        pg = get_current_placement_group()
        gpu_ids = ray.remote(num_cpus=0, num_gpus=1)(
            lambda: (ray.get_gpu_ids(), ray.get_runtime_context().get_node_id()))
        return ray.get([gpu_ids.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=b)).remote() for b in range(tp)])


def wait_for(check, what: str, timeout_s: float = 20.0):
    """Ray updates resource views asynchronously: poll ``check`` until truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_tp1_and_cpu_engines_get_plain_actors_and_bad_gpu_count_is_refused():
    cfg = load_config(None, ["cluster.rollout.num_gpus=1"])
    options, pg = rollout_placement(cfg)
    assert pg is None and options["num_gpus"] == 1 and "scheduling_strategy" not in options
    options, pg = rollout_placement(load_config(None, ["rollout.tensor_parallel_size=2"]))  # CPU: vLLM's own TP
    assert pg is None and options["num_gpus"] == 0
    with pytest.raises(ValueError, match="cluster.rollout.num_gpus must be 1"):
        rollout_placement(load_config(None, ["rollout.tensor_parallel_size=2", "cluster.rollout.num_gpus=2"]))


@pytest.mark.slow  # starts a local Ray
def test_tp_engines_each_get_a_strict_pack_group_and_removal_frees_it(local_ray):
    cfg = load_config(None, TP_CFG)
    placed = [rollout_placement(cfg) for _ in range(2)]
    groups = [pg for _, pg in placed]
    assert len({pg.id for pg in groups}) == 2
    for pg in groups:
        table = placement_group_table(pg)
        assert table["strategy"] == "STRICT_PACK"
        assert list(table["bundles"].values()) == [{"CPU": 1.0, "GPU": 1.0}] * 2
        assert len(set(table["bundles_to_node_id"].values())) == 1  # one engine's GPUs on one node
    assert wait_for(lambda: ray.available_resources().get("GPU", 0) == GPUS - 4, "4 GPUs held by the groups")

    probes = [Probe.options(**options, max_restarts=-1).remote() for options, _ in placed]
    places = ray.get([p.where.remote() for p in probes], timeout=60)
    for (_, pg), place in zip(placed, places):
        assert place["group"] == pg.id.hex() and place["gpus"] == []  # in the group, holds no GPU itself
        # In bundle 0: that bundle's CPU is taken, bundle 1's is free; both GPUs left for the engine.
        free = ray.available_resources()
        gid = pg.id.hex()
        assert free.get(f"CPU_group_0_{gid}", 0) == 0 and free[f"CPU_group_1_{gid}"] == 1.0
        assert free[f"GPU_group_0_{gid}"] == 1.0 and free[f"GPU_group_1_{gid}"] == 1.0
    # vLLM's TP workers (one per GPU bundle) fit beside the actor, on two GPUs of its node.
    workers = ray.get(probes[0].start_tp_workers.remote(2), timeout=60)
    assert len({tuple(g) for g, _ in workers}) == 2 and {n for _, n in workers} == {places[0]["node"]}

    # The summary names each engine's group, bundle and GPUs.
    for probe, (_, pg) in zip(probes, placed):
        PLACEMENT[probe] = (pg, 0)  # as RolloutGroup records it
    rows = topology({"rollout": probes})
    assert [(r["group"], r["bundle"], r["bundles"], r["group_gpus"]) for r in rows] == \
        [(pg.id.hex(), 0, 2, 2) for pg in groups]
    text = format_topology(rows)
    assert f"pg {groups[1].id.hex()[:8]} bundle 0 of 2 STRICT_PACK" in text and "2 gpus (engine's TP workers)" in text

    # Ray restarts a crashed engine actor in bundle 0 of the same group.
    os.kill(places[0]["pid"], signal.SIGKILL)
    again = wait_for(lambda: (w := _where_or_none(probes[0])) and w["pid"] != places[0]["pid"] and w,
                     "the restarted probe")
    assert again["group"] == groups[0].id.hex()
    assert ray.available_resources().get(f"CPU_group_0_{groups[0].id.hex()}", 0) == 0

    # Scale down (RolloutGroup.resize): the last actor dies and its group is gone, its GPUs free again;
    # the other engine keeps its own.
    rollouts = RolloutGroup(cfg, "unused", reward_pool=None, count=0)
    rollouts.workers = list(probes)
    rollouts.resize(1)
    assert probes[1] not in PLACEMENT and placement_group_table(groups[1])["state"] == "REMOVED"
    assert placement_group_table(groups[0])["state"] == "CREATED"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(probes[1].where.remote(), timeout=30)
    assert wait_for(lambda: ray.available_resources().get("GPU", 0) == GPUS - 2, "the removed group's GPUs")
    rollouts.resize(0)
    assert not any(p in PLACEMENT for p in probes)  # (the registry is process-wide: other tests add learners)


def _where_or_none(actor):
    try:
        return ray.get(actor.where.remote(), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


@pytest.mark.slow  # starts a local Ray
def test_engine_group_that_cannot_be_placed_fails_clearly_and_leaves_nothing(local_ray):
    cfg = load_config(None, TP_CFG + ["rollout.tensor_parallel_size=8"])
    with pytest.raises(TimeoutError, match="tensor_parallel_size=8"):
        rollout_placement(cfg, timeout_s=1)
    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())


@pytest.mark.slow  # starts a local Ray
def test_reward_actors_with_quarter_gpus_pack_four_to_a_gpu(local_ray):
    cfg = load_config(None, TP_CFG)
    free_before = wait_for(lambda: ray.available_resources().get("GPU"), "free GPUs")
    probes = [Probe.options(**actor_options(cfg.cluster.reward)).remote() for _ in range(4)]
    places = ray.get([p.where.remote() for p in probes], timeout=60)
    assert len({tuple(p["gpus"]) for p in places}) == 1 and len(places[0]["gpus"]) == 1
    assert ray.available_resources().get("GPU", 0) == pytest.approx(free_before - 1)
    rows = topology({"reward": probes}, placements={})
    assert all(r["gpu_share"] == 0.25 for r in rows)
    assert f"gpu {places[0]['gpus'][0]} (0.25)" in format_topology(rows)
    for p in probes:
        ray.kill(p)


def test_cuda_index_follows_what_ray_made_visible():
    from cluster.placement import cuda_index

    assert cuda_index([3], "3") == 0            # Ray set CUDA_VISIBLE_DEVICES to the actor's GPU
    assert cuda_index([3], None) == 3           # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: all visible
    assert cuda_index(["2"], "0,1,2,3") == 2    # visible set by someone else: the id's position
    with pytest.raises(RuntimeError, match="hides"):
        cuda_index([5], "0,1")
    with pytest.raises(RuntimeError, match="no GPU assigned"):
        cuda_index([], "0")


@pytest.mark.parametrize("noset", [False, True])
def test_learner_rank_device_is_the_gpu_ray_assigned(local_ray, noset):
    """The learner ranks take their CUDA device from Ray's assignment (cluster.placement.assigned_cuda_device,
    what LearnerGroup passes to Learner), not rank % device_count: with a rank on fake GPU k the index is
    0 when Ray sets CUDA_VISIBLE_DEVICES, k when it does not."""
    from cluster.placement import assigned_cuda_device

    env = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}} if noset else {}
    # Actors hold their GPU while they live: every fake GPU goes to a different one.
    ranks = [Probe.options(num_gpus=1, num_cpus=0, runtime_env=env).remote() for _ in range(GPUS)]
    seen = ray.get([r.__ray_call__.remote(lambda self: (ray.get_gpu_ids(), assigned_cuda_device())) for r in ranks],
                   timeout=120)
    assert sorted(int(gpus[0]) for gpus, _ in seen) == list(range(GPUS))
    for gpus, index in seen:
        assert index == (int(gpus[0]) if noset else 0)
    for r in ranks:
        ray.kill(r)
