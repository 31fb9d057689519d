"""cluster.rollout.RolloutGroup.round: streamed scoring (a group goes to the reward pool as soon as its chunk
is generated) vs the plain synchronous loop (stream=False: nothing is scored before all chunks are in).

The rollout actors are stand-ins with RolloutWorker's generate() signature whose second chunk waits
for the test to release it, so the test sees exactly what was submitted while generation was still
running; the reward pool is a recording object with RewardPool's submit/collect. Real vLLM rollouts
through RolloutRound run in test_launch.py and test_operations.py.
"""

import pytest

ray = pytest.importorskip("ray")

from cluster.rollout import RolloutGroup  # noqa: E402
from config import load_config  # noqa: E402
from data.dataset import ParquetSource  # noqa: E402
from tests.helpers import Gate  # noqa: E402
from trajectory import Reward, make_groups, text_hash  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Generator:
    """generate(prompts, n, seed) -> one rollout per prompt, after ``gate`` opens (None: at once)."""

    def __init__(self, gate=None):
        self.gate = gate

    def generate(self, prompts, n, seed=None):
        if self.gate is not None:
            ray.get(self.gate.wait.remote())
        return [{"sample_id": p["sample_id"], "weight_version": 0, "prompt": "chat text",
                 "responses": [{"text": f"answer {k}", "token_ids": [1], "logprobs": [0.0]} for k in range(n)]}
                for p in prompts]


class RecordingPool:
    workers = ["one"]

    def __init__(self):
        self.submitted = []

    def submit(self, key, group):
        self.submitted.append(key)

    def collect(self, keys):
        return {k: [Reward({"total": float(i)}, text_hash(f"answer {i}")) for i in range(4)] for k in keys}


@pytest.mark.parametrize("stream", [True, False])
def test_groups_scored_while_generating_only_when_streaming(stream, synthetic_split):
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=4", f"rollout.stream_rewards={stream}"])
    groups, _ = make_groups(ParquetSource(synthetic_split, shuffle=False).next_batch(4), 1, set())
    gate = Gate.remote()
    pool = RecordingPool()
    rollouts = RolloutGroup(cfg, "unused", pool, count=0)
    rollouts.workers = [Generator.remote(), Generator.remote(gate)]
    round_ = rollouts.round(groups, seed=None, weight_version=0)
    assert len(round_.chunks) == 4  # prompts_per_step // (2 * workers) = 1 prompt per chunk, round robin

    uids = [g.uid for g in groups]
    first_worker = uids[0::2]  # chunks 0 and 2 went to the ungated worker
    for _ in range(120):  # its chunks come in; the other worker's wait at the gate
        if sum(bool(g.answers) for g in groups) == 2:
            break
        assert not round_.pump(timeout_s=1.0)
    assert sorted(g.uid for g in groups if g.answers) == sorted(first_worker)
    assert pool.submitted == (first_worker if stream else [])

    gate.open.remote()
    finished, timings = round_.finish()
    assert finished is groups
    assert sorted(pool.submitted) == sorted(uids)  # every group scored exactly once
    assert all(g.totals == [0.0, 1.0, 2.0, 3.0] and len(g.answers) == 4 and g.prompt == "chat text" for g in groups)
    assert timings["time/generate"] > 0
