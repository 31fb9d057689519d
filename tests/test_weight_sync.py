"""cluster.weight_sync.broadcast_weights on a real local Ray with a real Learner actor (tiny policy,
started by cluster.start.start_learners as a job does).

The receivers are recording actors with RolloutWorker's weight interface (load_weights(bucket) ->
bytes, commit_weights(version) -> version): they show exactly which tensors arrive in which bucket,
and they can hang or misreport on purpose. The real vLLM receiving side is tested in test_rollout.py,
the whole loop with real rollout workers in test_launch.py.
"""
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from cluster.start import start_learners  # noqa: E402
from cluster.weight_sync import broadcast_weights  # noqa: E402
from config import REPO, Config  # noqa: E402
from policy.tiny import build_tiny_policy  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,  # never a running cluster
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", layers=2)


@pytest.fixture(scope="module")
def actors(policy_dir):
    """The learner actor and the receivers, started together (each is a process to start)."""
    cfg = Config()
    cfg.learner.kl_coef = 0.0  # no reference model: only the policy's weights matter here
    # Two ZeRO-3 ranks, every tensor partitioned: each bucket is gathered by both ranks (collective),
    # rank 0 streams it, and broadcast_weights drains rank 1's empty stream.
    cfg.cluster.learner_ranks = 2
    cfg.learner.zero_stage = 3
    cfg.learner.zero3_param_persistence_threshold = 0
    learners = start_learners(cfg, str(policy_dir))
    # One hung receiver per test that hangs one: a hung actor stays hung until it is killed.
    receivers = {name: Receiver.remote(mode) for name, mode in
                 [("a", "ok"), ("b", "ok"), ("hung", "hang"), ("hung2", "hang"), ("wrong", "wrong_version")]}
    ray.get([a.__ray_ready__.remote() for a in [*learners, *receivers.values()]], timeout=600)
    yield learners, receivers
    for actor in [*learners, *receivers.values()]:
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
    model.*), see learner/weights.py. The learner trains every parameter (freeze_vision is off).
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
@pytest.mark.parametrize("bucket_bytes", [1, 100_000, 1 << 20, 1 << 40])
def test_every_parameter_arrives_once_in_order(learners, receivers, checkpoint, bucket_bytes):
    order, tensors = checkpoint
    receivers = [receivers["a"], receivers["b"]]
    stats = broadcast_weights(learners, receivers, version=7, bucket_bytes=bucket_bytes, timeout_s=300)

    total = sum(nbytes(t) for t in tensors.values())
    assert stats["sync/bytes"] == total and stats["sync/gbps"] > 0
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
        broadcast_weights(learners, [ok, hung], version=1, bucket_bytes=1 << 20, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 60, f"raised after {elapsed:.0f} s"


def test_timeout_error_names_the_setting(learners, receivers):
    with pytest.raises(TimeoutError, match=r"cluster\.sync_timeout_s"):
        broadcast_weights(learners, [receivers["hung2"]], version=1, bucket_bytes=1 << 20, timeout_s=3.0)


def test_wrong_version_raises_runtime_error(learners, receivers):
    ok, wrong = receivers["a"], receivers["wrong"]
    with pytest.raises(RuntimeError, match=r"rollout workers \[1\] report versions \[2\], expected 3"):
        broadcast_weights(learners, [ok, wrong], version=3, bucket_bytes=1 << 20, timeout_s=300)
    assert ray.get(ok.received.remote())  # the weights did arrive; only the version check failed
