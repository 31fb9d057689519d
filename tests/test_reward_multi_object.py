"""VisionReasoner multi-object terms pinned on hand-made cases."""
import json

import numpy as np
import pytest

from reward import answer_prompts, rule_rewards
from reward.multi_object import accuracy_reward, multi_object_rewards, non_repeat_reward

A = {"bbox_2d": [10, 10, 50, 50], "point_2d": [30, 30]}
B = {"bbox_2d": [100, 100, 180, 160], "point_2d": [140, 130]}
SOL = json.dumps([A, B])


def wrap(objs, think="two cups. one is red."):
    return f"<think>{think}</think><answer>{json.dumps(objs) if not isinstance(objs, str) else objs}</answer>"


def test_perfect_answer_in_any_order():
    expected = {"think_format": 1.0, "answer_format": 2.0, "accuracy": 3.0, "non_repeat": 1.0}
    assert multi_object_rewards(wrap([A, B]), SOL) == expected
    assert multi_object_rewards(wrap([B, A]), SOL) == expected  # Hungarian matching
    assert rule_rewards("multi_object", wrap([B, A]), SOL) == expected


def test_accuracy_divides_by_the_longer_list():
    extra = {"bbox_2d": [300, 300, 310, 310], "point_2d": [305, 305]}
    assert accuracy_reward(wrap([A, B, extra]), SOL) == pytest.approx(6 / 3)
    assert accuracy_reward(wrap([A]), SOL) == pytest.approx(3 / 2)


def test_point_threshold_30px_strict_and_inside_own_box():
    gt = json.dumps([A])
    at_30 = {"bbox_2d": [10, 10, 50, 50], "point_2d": [30, 60]}  # 30 px below, and outside the box
    assert accuracy_reward(wrap([at_30]), gt) == 2.0
    big_box = [10, 10, 50, 70]  # L1 5: still IoU > 0.5 and L1 < 10
    assert accuracy_reward(wrap([{"bbox_2d": big_box, "point_2d": [30, 60]}]), gt) == 2.0  # dist == 30
    assert accuracy_reward(wrap([{"bbox_2d": big_box, "point_2d": [30, 59.9]}]), gt) == 3.0


def test_iou_and_l1_boundaries():
    gt = json.dumps([{"bbox_2d": [0, 0, 9, 9], "point_2d": [5, 5]}])
    half = {"bbox_2d": [0, 0, 9, 19], "point_2d": [5, 5]}  # IoU exactly 0.5, L1 2.5
    assert accuracy_reward(wrap([half]), gt) == 2.0
    l1_10 = {"bbox_2d": [10, 10, 19, 19], "point_2d": [40, 40]}  # L1 exactly 10, no overlap, far point
    assert accuracy_reward(wrap([l1_10]), gt) == 0.0
    # VisionReasoner's intersection is max(0, ix2 - ix1 + 1): a one-pixel box on itself has IoU 1
    gt1 = json.dumps([{"bbox_2d": [5, 5, 5, 5], "point_2d": [5, 5]}])
    assert accuracy_reward(wrap([{"bbox_2d": [5, 5, 5, 5], "point_2d": [5, 5]}]), gt1) == 3.0


def test_answer_format_is_mean_of_per_item_checks():
    answer_format_reward = lambda r: multi_object_rewards(r, SOL)["answer_format"]  # noqa: E731 (never raises)
    assert answer_format_reward(wrap([{"bbox_2d": [1, 2, 3, 4]}])) == 1.0
    assert answer_format_reward(wrap([{"bbox_2d": [1, 2, 3, 4]}, {"point_2d": [1, 2]}, {}])) == pytest.approx(2 / 3)
    assert answer_format_reward(wrap([A, 5])) == 1.0  # a non-object item ends the count
    assert answer_format_reward(wrap([5, A])) == 0.0
    assert answer_format_reward(wrap([])) == 0.0
    assert answer_format_reward(wrap(A)) == 0.0  # an object, not a list
    assert answer_format_reward(wrap("[{'bbox_2d': [1,2,3,4], 'point_2d': [1,2]}]")) == 0.0  # single quotes


def test_answer_is_the_first_answer_block_stripped():
    two = wrap([A, B]) + "<answer>[]</answer>"
    assert accuracy_reward(two, SOL) == 3.0
    assert multi_object_rewards(f"<answer>\n  {json.dumps([A])}  \n</answer>", SOL)["answer_format"] == 2.0
    assert multi_object_rewards(f"<answer>{json.dumps([A])}", SOL)["answer_format"] == 0.0  # unclosed


def test_non_repeat():
    assert non_repeat_reward("a. b. c.") == 1.0
    assert non_repeat_reward("a. a. b.") == 1.0  # one repeat is allowed
    assert non_repeat_reward("a. a. a.") == 0.0
    assert non_repeat_reward("a. b. a. b.") == 0.0
    assert non_repeat_reward(" . .. ") == 1.0


@pytest.mark.parametrize("objs", [[{"bbox_2d": [1, 2, 3], "point_2d": [1, 2]}],
                                  [{"bbox_2d": [1, 2, 3, "4"], "point_2d": [1, 2]}],
                                  [{"bbox_2d": [1, 2, 3, 4]}]])
def test_malformed_items_zero_accuracy(objs):
    assert accuracy_reward(wrap(objs + [A]), SOL) == 0.0
    assert answer_prompts("multi_object", wrap(objs + [A])) is None


def test_booleans_count_as_numbers_as_in_numpy():
    """VisionReasoner builds np.array of the values: True is 1 there; the segmenter refuses them."""
    text = wrap([{"bbox_2d": [True, 2, 3, 4], "point_2d": [1, 2]}, A])
    assert accuracy_reward(text, SOL) == 1.5  # A matches its object (3 points) / max(2, 2)
    assert answer_prompts("multi_object", text) is None


def test_non_finite_values():
    inf_box = wrap('[{"bbox_2d": [10, 10, Infinity, 50], "point_2d": [30, 30]}]')
    r = multi_object_rewards(inf_box, json.dumps([A]))
    # IoU 41*41/inf = 0 and L1 inf earn nothing; the point (inside [10, inf]) still does
    assert r["answer_format"] == 2.0 and r["accuracy"] == 1.0
    assert answer_prompts("multi_object", inf_box) is None
    huge = wrap('[{"bbox_2d": [%s, 10, 20, 50], "point_2d": [30, 30]}]' % ("9" * 400))
    assert multi_object_rewards(huge, json.dumps([A]))["accuracy"] == 0.0


def test_bad_solution_and_degenerate_responses():
    assert multi_object_rewards(wrap([A]), "not json")["accuracy"] == 0.0
    assert multi_object_rewards(wrap([A]), "[]")["accuracy"] == 0.0
    for r in ["", "<answer>" * 10_000, "[" * 100_000, "<answer>" + "[" * 100_000 + "</answer>", None]:
        out = multi_object_rewards(r, SOL)
        assert out["accuracy"] == 0.0 and out["answer_format"] == 0.0


def test_answer_prompts_shapes():
    boxes, points = answer_prompts("multi_object", wrap([A, B]))
    assert boxes.shape == (2, 4) and points.shape == (2, 1, 2)
    np.testing.assert_array_equal(points[1, 0], [140, 130])
    boxes, points = answer_prompts("segzero",
                                   '<answer>{"bbox": [1,2,3,4], "points_1": [1,2], "points_2": [2,3]}</answer>')
    assert boxes.shape == (1, 4) and points.shape == (1, 2, 2)
