"""cluster.rollout.RolloutRound: streamed scoring (a group goes to the reward pool as soon as its chunk
is generated) vs the plain synchronous loop (stream=False: nothing is scored before all chunks are in).

The rollout actors are stand-ins with RolloutWorker's generate() signature whose second chunk waits
for the test to release it, so the test sees exactly what was submitted while generation was still
running; the reward pool is a recording object with RewardPool's submit/collect. Real vLLM rollouts
through RolloutRound run in test_launch.py and test_operations.py.
"""
import asyncio

import pytest

ray = pytest.importorskip("ray")

from cluster.rollout import RolloutRound  # noqa: E402
from data.dataset import ParquetSource  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Gate:
    def __init__(self):
        self.event = asyncio.Event()

    async def wait(self):
        await self.event.wait()

    async def open(self):
        self.event.set()


@ray.remote(num_cpus=0)
class Generator:
    """generate(prompts, n, seed) -> one rollout per prompt, after ``gate`` opens (None: at once)."""

    def __init__(self, gate=None):
        self.gate = gate

    def generate(self, prompts, n, seed=None):
        if self.gate is not None:
            ray.get(self.gate.wait.remote())
        return [{"sample_id": p["sample_id"], "weight_version": 0,
                 "responses": [{"text": f"answer {k}", "token_ids": [1], "logprobs": [0.0]} for k in range(n)]}
                for p in prompts]


class RecordingPool:
    def __init__(self):
        self.submitted = []

    def submit(self, key, group):
        self.submitted.append(key)

    def collect(self, keys):
        return {k: [{"total": 0.0}] * 4 for k in keys}


@pytest.mark.parametrize("stream", [True, False])
def test_groups_scored_while_generating_only_when_streaming(stream, synthetic_split):
    samples = ParquetSource(synthetic_split, shuffle=False).next_batch(4)
    gate = Gate.remote()
    pool = RecordingPool()
    round_ = RolloutRound([Generator.remote(), Generator.remote(gate)], pool, samples, group_size=4,
                          model_size=112, chunk_size=2, timeout_s=60, stream=stream).start()

    for _ in range(120):  # the first chunk comes in; the second waits at the gate
        if len(round_.rollouts) == 2:
            break
        assert not round_.pump(timeout_s=1.0)
    assert sorted(round_.rollouts) == sorted(s.id for s in samples[:2])
    first_chunk = [s.id for s in samples[:2]]
    assert pool.submitted == (first_chunk if stream else [])

    gate.open.remote()
    rollouts, rewards, timings = round_.finish()
    assert sorted(pool.submitted) == sorted(s.id for s in samples)  # every group scored exactly once
    assert [r["sample_id"] for r in rollouts] == [s.id for s in samples]
    assert set(rewards) == {s.id for s in samples}
    assert timings["time/generate"] > 0
