"""Weight sync on a real local Ray with real Learner actors (tiny policy, two ZeRO-3 ranks, started by
cluster.learners.LearnerGroup as a job does): cluster.weight_sync's bucket_refs + push_weights, and
RolloutGroup.sync_from and WeightSync.resync over both paths.

The receivers are recording actors with RolloutWorker's weight interface (load_weights(bucket) ->
bytes, commit_weights(version) -> version; for rollout.weight_sync=collective also join_weight_group,
weight_group_epoch, receive_weights, receiving through weight_sync/group.py as vLLM's worker does):
they show exactly which tensors arrive in which bucket, and they can hang, misreport or corrupt on purpose.
The real vLLM receiving side is tested in test_rollout.py,
the whole loop with real rollout workers in test_launch.py and test_modes.py.
"""
import socket
import threading
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from cluster.learners import LearnerGroup  # noqa: E402
from cluster.rollout import RolloutGroup  # noqa: E402
from cluster.weight_sync import WeightChecksumError, bucket_refs, push_weights  # noqa: E402
from config import REPO, Config  # noqa: E402
from policy.prompt import chat_prompt  # noqa: E402
from policy.tiny import build_tiny_policy  # noqa: E402
from tests.helpers import Gate  # noqa: E402
from trajectory import LearnerBatch, LearnerSequence  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,  # never a running cluster
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", layers=2)


@ray.remote(num_cpus=0)
class Ports:
    """Hands out the rendezvous port: first one that is already taken (as when another job grabs the
    port between its pick and rank 0's bind), then free ones."""

    def __init__(self):
        self.taken = socket.socket()
        self.taken.bind(("", 0))
        self.taken.listen()
        self.calls = 0

    def next(self):
        self.calls += 1
        if self.calls == 1:
            return ray.util.get_node_ip_address(), self.taken.getsockname()[1]
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]


@pytest.fixture(scope="module")
def actors(policy_dir):
    """The learner actor and the receivers, started together (each is a process to start). The ranks'
    first rendezvous port is taken: LearnerGroup.ready() starts them again on another."""
    import cluster.learners

    ports = Ports.remote()
    pick = cluster.learners.address_and_port
    cluster.learners.address_and_port = ray.remote(num_cpus=0)(lambda: ray.get(ports.next.remote()))
    cfg = Config()
    cfg.learner.kl_coef = 0.0  # no reference model: only the policy's weights matter here
    # Two ZeRO-3 ranks, every tensor partitioned: each bucket is gathered by both ranks (collective),
    # rank 0 streams it, and bucket_refs drains rank 1's empty stream.
    cfg.cluster.learner_ranks = 2
    cfg.learner.zero_stage = 3
    cfg.learner.zero3_param_persistence_threshold = 0
    cfg.cluster.sync_bucket_mb = 1
    learners = LearnerGroup(cfg, str(policy_dir))
    # One hung receiver per test that hangs one: a hung actor stays hung until it is killed.
    receivers = {name: Receiver.remote(mode) for name, mode in
                 [("a", "ok"), ("b", "ok"), ("hung", "hang"), ("hung2", "hang"), ("wrong", "wrong_version")]}
    learners.ready()
    cluster.learners.address_and_port = pick
    assert ray.get(ports.__ray_call__.remote(lambda self: self.calls)) == 2  # started again once
    ray.get([a.__ray_ready__.remote() for a in receivers.values()], timeout=600)
    yield learners, receivers
    learners.shutdown()
    for actor in receivers.values():
        ray.kill(actor)


@pytest.fixture
def learners(actors):
    return actors[0]


@pytest.fixture
def receivers(actors):
    """The receivers that answer, with nothing recorded, and the hung ones."""
    receivers = actors[1]
    ray.get([receivers[name].reset.remote() for name in ("a", "b", "wrong")])
    return receivers


@pytest.fixture(scope="module")
def checkpoint(policy_dir):
    """The policy's tensors as written to disk (HF checkpoint names), and their module order.

    The order is independent of the learner's code: the module tree of the model as transformers
    builds it, renamed as save_pretrained does (model.visual.* -> visual.*, model.language_model.* ->
    model.*), see weight_sync/buckets.py. The learner trains every parameter (freeze_vision is off).
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(policy_dir))
    order = [n.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
             for n, _ in model.named_parameters()]
    tensors = load_file(str(policy_dir / "model.safetensors"))
    assert sorted(order) == sorted(tensors)
    return order, tensors


@ray.remote(num_cpus=0)
class Receiver:
    """RolloutWorker's weight interface, recording every bucket. mode "hang": load_weights never
    returns; "wrong_version": commit_weights reports the previous version."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.buckets = []

    def load_weights(self, bucket):
        if self.mode == "hang":
            threading.Event().wait()
        self.buckets.append([(name, t.clone()) for name, t in bucket])
        return sum(t.numel() * t.element_size() for _, t in bucket)

    def commit_weights(self, version: int) -> int:
        return version - 1 if self.mode == "wrong_version" else version

    def received(self):
        return self.buckets

    def reset(self):
        self.buckets = []


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# The tiny policy's largest tensors (embedding, lm_head) are 1344 x 128 fp32 = 688 KiB.
def rollout_group(learners, workers, sync_timeout_s=300.0, weight_sync="rpc", call_timeout_s=600.0):
    """A RolloutGroup whose workers are the given receivers (no vLLM engine)."""
    cfg = learners.cfg.model_copy(deep=True)
    cfg.cluster.sync_timeout_s, cfg.cluster.call_timeout_s = sync_timeout_s, call_timeout_s
    cfg.rollout.weight_sync = weight_sync
    group = RolloutGroup(cfg, "unused", reward_pool=None, count=0)
    group.workers = list(workers)
    return group


def sync(learners, workers, version, bucket_bytes):
    return push_weights(workers, bucket_refs(learners, bucket_bytes, version, 300), version, 300)


@pytest.mark.parametrize("bucket_bytes", [1, 100_000, 1 << 20, 1 << 40])
def test_every_parameter_arrives_once_in_order(learners, receivers, checkpoint, bucket_bytes):
    order, tensors = checkpoint
    receivers = [receivers["a"], receivers["b"]]
    loaded = sync(learners, receivers, version=7, bucket_bytes=bucket_bytes)

    total = sum(nbytes(t) for t in tensors.values())
    assert loaded == total
    first, second = ray.get([r.received.remote() for r in receivers])
    assert [[n for n, _ in b] for b in first] == [[n for n, _ in b] for b in second]  # same buckets, same order
    for buckets in (first, second):
        assert [name for bucket in buckets for name, _ in bucket] == order  # each exactly once, module order
        for bucket in buckets:
            for name, t in bucket:
                assert torch.equal(t, tensors[name]), name
    # Buckets: at most bucket_bytes unless a single tensor is larger, and filled greedily.
    sizes = [[nbytes(t) for _, t in bucket] for bucket in first]
    assert all(len(s) == 1 or sum(s) <= bucket_bytes for s in sizes)
    assert all(sum(a) + b[0] > bucket_bytes for a, b in zip(sizes, sizes[1:]))
    if bucket_bytes == 1:
        assert len(first) == len(order)
    if bucket_bytes == 1 << 40:
        assert len(first) == 1
    if bucket_bytes == 100_000:
        assert max(nbytes(t) for t in tensors.values()) > bucket_bytes and 1 < len(first) < len(order)


def test_hung_receiver_raises_timeout_error(learners, receivers):
    ok, hung = receivers["a"], receivers["hung"]
    timeout_s = 5.0
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        rollout_group(learners, [ok, hung], timeout_s).sync_from(learners, version=1)
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 60, f"raised after {elapsed:.0f} s"


def test_timeout_error_names_the_setting(learners, receivers):
    with pytest.raises(TimeoutError, match=r"cluster\.sync_timeout_s"):
        rollout_group(learners, [receivers["hung2"]], 3.0).sync_from(learners, version=1)


def test_wrong_version_raises_runtime_error(learners, receivers):
    ok, wrong = receivers["a"], receivers["wrong"]
    with pytest.raises(RuntimeError, match=r"rollout workers \[1\] report versions \[2\], expected 3"):
        rollout_group(learners, [ok, wrong]).sync_from(learners, version=3)
    assert ray.get(ok.received.remote())  # the weights did arrive; only the version check failed




def test_resync_serves_the_synced_version_without_the_busy_learner(learners, receivers):
    """One-step off-policy: a rollout worker restarted while the learner trains step t+1 must get the
    weights of version t, now, not step t+1's weights (labelled t) after the learner's step."""
    a, b = receivers["a"], receivers["b"]
    group = rollout_group(learners, [a])
    metrics = group.sync_from(learners, version=5)
    assert metrics["sync/bytes"] > 0 and group.versions == {0, 5}
    synced = [(n, t) for bucket in ray.get(a.received.remote()) for n, t in bucket]

    # The learner moves on (an update), then is kept busy until the test releases it.
    image = Image.new("RGB", (112, 112))
    learners.sft_step(LearnerBatch([LearnerSequence(chat_prompt("the red circle"), image, [5, 6, 7])] * 2))
    gate = Gate.remote()
    busy = [r.__ray_call__.remote(lambda self, g: ray.get(g.wait.remote()), gate) for r in learners.ranks]
    group.sync.resync(b)  # returns while every learner rank is busy: it never waits behind the learner
    assert ray.wait(busy, timeout=0)[0] == []
    received = [(n, t) for bucket in ray.get(b.received.remote()) for n, t in bucket]
    assert [n for n, _ in received] == [n for n, _ in synced]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(received, synced))
    gate.open.remote()
    ray.get(busy, timeout=60)
    group.workers = [receivers["a"]]
    ray.get(a.reset.remote())
    group.sync_from(learners, version=6)
    moved = [t for bucket in ray.get(a.received.remote()) for _, t in bucket]
    assert any(not torch.equal(x, y) for x, (_, y) in zip(moved, synced))  # the update did change the weights


# ---------------------------------------------------------------- rollout.weight_sync=collective

@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class GroupReceiver(Receiver.__ray_actor_class__):
    """Receiver that also takes part in the broadcast group, as vLLM's worker extension does
    (weight_sync/group.py). Restarted by Ray when killed (a fresh one: no group, nothing received).
    ``set_mode``: "hang" = receive_weights never returns; "corrupt" = one byte of bucket 1 flips on
    arrival, before the checksum (what a buffer read before its transfer ends looks like)."""

    def __init__(self):
        super().__init__("ok")
        self.group = None
        self.version = 0

    def set_mode(self, mode):
        self.mode = mode

    def join_weight_group(self, address, port, rank_offset, world_size, timeout_s, epoch):
        from weight_sync.group import WeightGroup

        self.group = None
        self.group = WeightGroup(address, port, rank_offset, world_size, timeout_s, epoch, torch.device("cpu"))

    def weight_group_epoch(self):
        return None if self.group is None else self.group.epoch

    def receive_weights(self, plan, version):
        from weight_sync.buckets import checksum, layout, unpack

        if self.mode == "hang":
            threading.Event().wait()
        sums, buckets = [], []
        for k, bucket in enumerate(plan):
            slots, size = layout(bucket)
            buffer = torch.empty(size, dtype=torch.uint8)
            self.group.broadcast(buffer)
            if self.mode == "corrupt" and k == 1:
                buffer[slots[0].offset] ^= 1
            sums.append(checksum(buffer))
            buckets.append([(name, t.clone()) for name, t in unpack(buffer, slots)])
        self.buckets, self.version = buckets, version
        return [sums]

    def commit_weights(self, version):
        self.version = version
        return version

    def state(self):
        return self.version, self.weight_group_epoch(), self.buckets


def learner_weights(learners) -> list:
    """The learner's current trainable weights, over RPC, as (name, tensor) in send order."""
    return [(n, t) for ref in bucket_refs(learners, learners.cfg.cluster.sync_bucket_mb << 20, 0, 300)
            for n, t in ray.get(ref)]


def assert_holds(receiver, version, weights):
    got_version, _, buckets = ray.get(receiver.state.remote())
    received = [(n, t) for bucket in buckets for n, t in bucket]
    assert got_version == version
    assert [n for n, _ in received] == [n for n, _ in weights]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(received, weights))


@pytest.fixture(scope="module")
def members():
    actors = [GroupReceiver.remote() for _ in range(3)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    yield actors
    for a in actors:
        ray.kill(a, no_restart=True)


def test_collective_sync_membership_restart_and_scaling(learners, members, checkpoint):
    """Every trainable tensor reaches every member through the group, bit for bit, with the sender's
    checksums; the group is built once and reused; a worker restarted by Ray (no group) and a worker
    added by scaling (served over RPC first) join at the next sync; after a scale-down no one waits."""
    a, b, c = members
    weights = learner_weights(learners)
    assert [n for n, _ in weights] == checkpoint[0]  # every parameter (freeze_vision is off), module order
    group = rollout_group(learners, [a, b], weight_sync="collective")
    first = group.sync_from(learners, version=11)
    assert first["sync/group_rebuilds"] == 1 and first["sync/worker_restarts"] == 0
    assert first["sync/bytes"] >= sum(nbytes(t) for _, t in weights)
    for r in (a, b):
        assert_holds(r, 11, weights)
    assert group.sync.kept[1] is None  # synchronous mode keeps no copy in the object store
    assert group.sync_from(learners, version=12)["sync/group_rebuilds"] == 0  # same members, same group
    epoch = ray.get(a.weight_group_epoch.remote())

    # Restart: Ray brings b back without a group; the next sync rebuilds the group with it.
    ray.kill(b, no_restart=False)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(b.state.remote())
    third = group.sync_from(learners, version=13)
    assert third["sync/group_rebuilds"] == 1
    for r in (a, b):
        assert_holds(r, 13, weights)
    assert ray.get(b.weight_group_epoch.remote()) == epoch + 1

    # Scale-up: c gets version 13 over RPC at once (from the idle learner), and joins at the next sync.
    group.workers.append(c)
    group.sync.resync(c)
    assert ray.get(c.state.remote())[0] == 13 and ray.get(c.weight_group_epoch.remote()) is None
    fourth = group.sync_from(learners, version=14)
    assert fourth["sync/group_rebuilds"] == 1
    for r in (a, b, c):
        assert_holds(r, 14, weights)

    # Scale-down: the group of three is dropped for one of two; nobody waits on the removed worker.
    group.workers.pop()
    fifth = group.sync_from(learners, version=15)
    assert fifth["sync/group_rebuilds"] == 1 and fifth["sync/worker_restarts"] == 0
    assert ray.get(c.state.remote())[0] == 14
    for r in (a, b):
        assert_holds(r, 15, weights)


@pytest.mark.parametrize("where", ["busy before the sync", "inside the broadcast"])
def test_collective_hung_worker_is_named_restarted_and_synced(learners, members, caplog, where):
    """A worker that hangs is named, restarted, the group rebuilt, the weights sent again, and the sync
    returns: the job goes on. Busy before the sync (stuck in generation): it is found at the end of
    cluster.call_timeout_s, the generation's bound, before the sync's own deadline starts; hung inside
    the broadcast: within cluster.sync_timeout_s."""
    a, b, _ = members
    weights = learner_weights(learners)
    group = rollout_group(learners, [a, b], sync_timeout_s=16, weight_sync="collective", call_timeout_s=12)
    group.sync_from(learners, version=20)
    if where == "busy before the sync":  # e.g. stuck in generation: the barrier never gets an answer
        gate = Gate.remote()
        b.__ray_call__.remote(lambda self, g: ray.get(g.wait.remote()), gate)
    else:  # enters the update, never receives: the others fail after half the timeout, b stays silent
        ray.get(b.set_mode.remote("hang"))
    with caplog.at_level("ERROR", logger="cluster.weight_sync"):
        metrics = group.sync_from(learners, version=21)
    if where == "busy before the sync":
        assert "rollout workers [1] still busy after 12 s (cluster.call_timeout_s: hung)" in caplog.text
        assert metrics["time/sync_wait"] >= 12 and metrics["time/sync"] < metrics["time/sync_wait"]
    else:
        assert "rollout workers [1] did not answer within 16 s (cluster.sync_timeout_s: hung)" in caplog.text
    assert metrics["sync/worker_restarts"] == 1
    for r in (a, b):
        assert_holds(r, 21, weights)
    assert ray.get(b.weight_group_epoch.remote()) == ray.get(a.weight_group_epoch.remote())


def test_collective_checksum_mismatch_is_an_error(learners, members):
    a, b, _ = members
    group = rollout_group(learners, [a, b], weight_sync="collective")
    ray.get(b.set_mode.remote("corrupt"))
    try:
        with pytest.raises(WeightChecksumError, match=r"rollout worker 1 \(TP rank 0\) received buckets \[1\]"):
            group.sync_from(learners, version=30)
    finally:
        ray.get(b.set_mode.remote("ok"))


@pytest.mark.parametrize("weight_sync", ["rpc", "collective"])
def test_a_generation_longer_than_the_sync_timeout_is_waited_for(learners, receivers, members, weight_sync):
    """One-step off-policy: a worker still generating the next round when the sync starts. Its
    generation (here a call blocked on a gate) outlasts cluster.sync_timeout_s; the sync waits for it
    (``time/sync_wait``, bounded by the call timeout) and only then starts its own deadline: no
    timeout, no healthy worker restarted as hung, and ``time/sync`` without the generation."""
    a, b = (receivers["a"], receivers["b"]) if weight_sync == "rpc" else members[:2]
    group = rollout_group(learners, [a, b], sync_timeout_s=4, weight_sync=weight_sync)
    group.sync_from(learners, version=40)  # the collective group is built now, outside the measured sync
    gate = Gate.remote()
    generating = b.__ray_call__.remote(lambda self, g: ray.get(g.wait.remote()), gate)
    start = time.monotonic()

    def pump():  # the round's pump; the generation ends once the sync's deadline would have passed
        if time.monotonic() > start + 4 + 2:
            gate.open.remote()

    metrics = group.sync_from(learners, version=41, pump=pump)
    ray.get(generating, timeout=60)
    assert metrics["sync/worker_restarts"] == 0
    assert metrics["time/sync_wait"] > 4 > metrics["time/sync"]
    if weight_sync == "collective":
        assert metrics["sync/group_rebuilds"] == 0
        for r in (a, b):
            assert ray.get(r.state.remote())[0] == 41
    else:
        assert all(ray.get(r.received.remote()) for r in (a, b))
