"""Seg-Zero rule terms pinned on hand-made cases (boundaries as in Seg-Zero's seg_restrict.py)."""
import json

import pytest

from reward.rules import box_iou_inclusive, parse_answer, segzero_rewards

SOL = "<box>(10,100),(200,210)</box><points>(30,110),(35,180)</points>"
ALL = {"think_format": 1.0, "answer_format": 1.0, "bbox_iou": 1.0, "bbox_l1": 1.0, "point_l1": 1.0}


def answer(bbox=(10, 100, 200, 210), p1=(30, 110), p2=(35, 180), **extra):
    return json.dumps({"bbox": list(bbox), "points_1": list(p1), "points_2": list(p2), **extra})


def wrap(ans, think="the knife is left of the bread"):
    return f"<think>{think}</think><answer>{ans}</answer>"


def test_perfect_answer_scores_every_term():
    assert segzero_rewards(wrap(answer()), SOL) == ALL
    assert parse_answer(wrap(answer())) == {"bbox": [10.0, 100.0, 200.0, 210.0],
                                            "points": [[30.0, 110.0], [35.0, 180.0]]}


def test_think_format_is_a_fullmatch():
    assert segzero_rewards(wrap(answer()) + " trailing", SOL)["think_format"] == 0.0
    assert segzero_rewards("x" + wrap(answer()), SOL)["think_format"] == 0.0
    # whitespace between </think> and <answer> is allowed, newlines inside tags too (DOTALL)
    assert segzero_rewards(f"<think>a\nb</think> \n <answer>\n{answer()}\n</answer>", SOL) == ALL
    # text after </answer> costs only the think term
    assert segzero_rewards(wrap(answer()) + "\nDone.", SOL) == {**ALL, "think_format": 0.0}
    assert segzero_rewards("<think>x</think><answer></answer>", SOL) == {**dict.fromkeys(ALL, 0.0), "think_format": 1.0}


def test_iou_boundary_is_strict_and_areas_inclusive():
    sol = "<box>(0,0),(9,9)</box><points>(2,2),(5,5)</points>"  # area (9-0+1)^2 = 100
    exactly_half = wrap(answer(bbox=(0, 0, 9, 19), p1=(2, 2), p2=(5, 5)))  # inter 100 / union 200
    above_half = wrap(answer(bbox=(0, 0, 9, 18), p1=(2, 2), p2=(5, 5)))  # 100 / 190
    assert box_iou_inclusive([0, 0, 9, 19], [0, 0, 9, 9]) == 0.5
    assert segzero_rewards(exactly_half, sol)["bbox_iou"] == 0.0
    assert segzero_rewards(above_half, sol)["bbox_iou"] == 1.0
    # Seg-Zero's intersection needs ix1 < ix2: a one-pixel box on itself has IoU 0
    assert box_iou_inclusive([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0
    # an inverted box whose negative area cancels the other's: 0, not a ZeroDivisionError (a warm start's
    # greedy answer did this and cost the run its step-0 evaluation)
    assert box_iou_inclusive([10, 10, 8, 12], [0, 0, 2, 0]) == 0.0
    assert box_iou_inclusive([10, 10, 8, 12], [0, 0, 1, 0]) == 0.0


def test_l1_boundary_is_strict():
    def shifted(d):
        return wrap(answer(bbox=(10 + d, 100 + d, 200 + d, 210 + d)))
    assert segzero_rewards(shifted(10), SOL)["bbox_l1"] == 0.0
    assert segzero_rewards(shifted(9.99), SOL)["bbox_l1"] == 1.0
    assert segzero_rewards(shifted(-9), SOL)["bbox_l1"] == 1.0
    # mean over coordinates: one coordinate off by 39 -> 9.75
    assert segzero_rewards(wrap(answer(bbox=(10, 100, 239, 210))), SOL)["bbox_l1"] == 1.0
    assert segzero_rewards(wrap(answer(bbox=(10, 100, 240, 210))), SOL)["bbox_l1"] == 0.0


def test_points_inside_box_edges_included():
    on_edge = wrap(answer(bbox=(30, 110, 200, 210), p1=(30, 110), p2=(200, 210)))
    assert segzero_rewards(on_edge, SOL)["point_l1"] == 1.0
    outside = wrap(answer(bbox=(30, 110, 200, 210), p1=(29, 110), p2=(35, 180)))
    assert segzero_rewards(outside, SOL)["point_l1"] == 0.0
    # int() truncation, as in Seg-Zero: 30.9 -> 30 < box x1 30.5 -> outside
    truncated = wrap(answer(bbox=(30.5, 100, 200, 210), p1=(30.9, 110), p2=(35, 180)))
    assert segzero_rewards(truncated, SOL)["point_l1"] == 0.0


def test_point_distance_order_invariant_and_strict():
    swapped = wrap(answer(p1=(35, 180), p2=(30, 110)))
    assert segzero_rewards(swapped, SOL)["point_l1"] == 1.0
    exactly_100 = wrap(answer(p1=(130, 110), p2=(135, 180)))  # both 100 px right of the truth
    assert segzero_rewards(exactly_100, SOL)["point_l1"] == 0.0
    under_100 = wrap(answer(p1=(129, 110), p2=(134, 180)))
    assert segzero_rewards(under_100, SOL)["point_l1"] == 1.0


def test_single_quotes_do_not_parse():
    single = wrap(answer().replace('"', "'"))
    assert segzero_rewards(single, SOL) == {**dict.fromkeys(ALL, 0.0), "think_format": 1.0}
    assert parse_answer(single) is None


def test_first_json_object_wins_even_inside_think():
    decoy = answer(bbox=(500, 500, 600, 600), p1=(550, 550), p2=(560, 560))
    r = segzero_rewards(wrap(answer(), think=f"maybe {decoy}?"), SOL)
    assert r == {**ALL, "bbox_iou": 0.0, "bbox_l1": 0.0, "point_l1": 0.0}
    only_in_think = f"<think>{answer()}</think><answer>the knife</answer>"
    assert segzero_rewards(only_in_think, SOL) == ALL


def test_nested_braces_cut_at_first_closing_brace():
    nested = wrap(answer(meta={"a": 1}))
    assert segzero_rewards(nested, SOL) == {**dict.fromkeys(ALL, 0.0), "think_format": 1.0}
    # an empty "{}" is skipped by {[^}]+}: the next object is used
    assert segzero_rewards(wrap("{} " + answer()), SOL) == ALL


FORMAT_ONLY = {**dict.fromkeys(ALL, 0.0), "think_format": 1.0, "answer_format": 1.0}


@pytest.mark.parametrize("bad, expected, prompt", [
    # Seg-Zero checks lists and lengths only, then computes with whatever the values are (to the letter):
    ('"10"', FORMAT_ONLY, True),                          # a string among numbers raises in every term
    ('"ten"', FORMAT_ONLY, False),
    ("NaN", FORMAT_ONLY, False),                          # NaN compares False everywhere
    ("true", FORMAT_ONLY, False),                         # True is the int 1: a box 210 px too short
    # a valid int of 400 digits, and inf: IoU ~0, L1 huge, but both points lie inside the (tall) box
    ("1" * 400, {**FORMAT_ONLY, "point_l1": 1.0}, False),
    ("1e400", {**FORMAT_ONLY, "point_l1": 1.0}, False),
])
def test_values_are_used_as_they_come(bad, expected, prompt):
    text = wrap('{"bbox": [10, 100, 200, %s], "points_1": [30, 110], "points_2": [35, 180]}' % bad)
    assert segzero_rewards(text, SOL) == expected
    assert (parse_answer(text) is not None) == prompt  # the segmenter takes finite numbers (or numeric strings)


def test_points_written_as_strings_are_truncated_like_seg_zero():
    """Seg-Zero int()s the point values: ["30", "110"] is the point (30, 110); only the points are
    converted, so the same strings in the box score 0 on the box terms."""
    text = wrap('{"bbox": [10, 100, 200, 210], "points_1": ["30", "110"], "points_2": ["35", "180"]}')
    assert segzero_rewards(text, SOL) == ALL
    assert parse_answer(text) == {"bbox": [10.0, 100.0, 200.0, 210.0], "points": [[30.0, 110.0], [35.0, 180.0]]}
    assert segzero_rewards(wrap('{"bbox": [10, 100, 200, 210], "points_1": ["30.5", "110"], "points_2": [35, 180]}'),
                           SOL) == {**ALL, "point_l1": 0.0}  # int("30.5") raises
    strings_in_box = wrap('{"bbox": ["10", "100", "200", "210"], "points_1": [30, 110], "points_2": [35, 180]}')
    assert segzero_rewards(strings_in_box, SOL) == FORMAT_ONLY
    # a point of three values: the format fails (length), the point term reads the first two
    assert segzero_rewards(wrap(answer(p1=(30, 110, 1))), SOL) == {**ALL, "answer_format": 0.0}
    # a 2-character string is a "list of 2" for the soft format and a point of two digits for the point term
    soft = wrap('{"bbox": [10, 100, 200, 210], "points_1": "31", "points_2": [35, 180]}')
    assert segzero_rewards(soft, SOL, soft=True)["answer_format"] == 1.0
    assert segzero_rewards(soft, SOL)["answer_format"] == 0.0


def test_huge_digit_strings_do_not_raise():
    text = wrap('{"bbox": [%s, 1, 2, 3], "points_1": [1, 1], "points_2": [1, 1]}' % ("9" * 5000))
    assert segzero_rewards(text, SOL)["answer_format"] == 0.0


def test_negative_and_float_coordinates_are_computed():
    sol = "<box>(0,0),(9,9)</box><points>(2,2),(5,5)</points>"
    neg = wrap(answer(bbox=(-5, -5, 9, 9), p1=(-1, -1), p2=(5, 5)))  # IoU 100/225, L1 2.5
    assert segzero_rewards(neg, sol) == {**ALL, "bbox_iou": 0.0}
    flt = wrap(answer(bbox=(0.5, 0.25, 9.5, 9.75), p1=(2.7, 2.2), p2=(5.1, 5.9)))
    assert segzero_rewards(flt, sol) == ALL


def test_strict_and_soft_keys():
    soft_keys = wrap(json.dumps({"BBox_2d": [10, 100, 200, 210], "points_a": [30, 110], "Points_b": [35, 180]}))
    assert segzero_rewards(soft_keys, SOL) == {**dict.fromkeys(ALL, 0.0), "think_format": 1.0}
    assert segzero_rewards(soft_keys, SOL, soft=True) == ALL
    assert parse_answer(soft_keys) is None and parse_answer(soft_keys, soft=True) is not None
    # Seg-Zero's soft format counts keys containing "point", its point term keys containing "points"
    singular = wrap(json.dumps({"bbox": [10, 100, 200, 210], "point_a": [30, 110], "point_b": [35, 180]}))
    assert segzero_rewards(singular, SOL, soft=True) == {**ALL, "point_l1": 0.0}
    one_point = wrap(json.dumps({"bbox": [10, 100, 200, 210], "point": [30, 110]}))
    assert segzero_rewards(one_point, SOL, soft=True) == {**ALL, "answer_format": 0.0, "point_l1": 0.0}


def test_box_terms_independent_of_points():
    no_points = wrap(json.dumps({"bbox": [10, 100, 200, 210]}))
    assert segzero_rewards(no_points, SOL) == {**ALL, "answer_format": 0.0, "point_l1": 0.0}


@pytest.mark.parametrize("solution", ["", "<box>(10,100),(200)</box>", "<box>(-1,0),(5,5)</box>", None, 17])
def test_unusable_solution_scores_zero_on_geometry(solution):
    r = segzero_rewards(wrap(answer()), solution)
    assert r == {**dict.fromkeys(ALL, 0.0), "think_format": 1.0, "answer_format": 1.0}


@pytest.mark.parametrize("response", ["", "\x00", "{", "}", "{}", "🙂" * 1000, "{" * 100_000, None, 42])
def test_degenerate_responses(response):
    r = segzero_rewards(response, SOL)
    assert r == dict.fromkeys(ALL, 0.0)
    assert parse_answer(response) is None
