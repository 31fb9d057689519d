from types import SimpleNamespace

from launch import informative_groups


def test_groups_with_equal_rewards_are_dropped():
    samples = [SimpleNamespace(id=i) for i in "abc"]
    rollouts = [{"sample_id": i} for i in "abc"]
    rewards = {"a": [{"total": 1.0}, {"total": 1.0}],   # no signal: dropped
               "b": [{"total": 0.0}, {"total": 2.5}],
               "c": [{"total": 0.0}, {"total": 0.0}]}   # no signal: dropped
    kept, kept_rollouts, dropped, _ = informative_groups(samples, rollouts, rewards)
    assert [s.id for s in kept] == ["b"] and kept_rollouts == [{"sample_id": "b"}] and dropped == 2
