"""Fuzz: 100,000 generated responses at every rule set; nothing raises, every term stays in range."""
import json
import math
import random
import re

import pytest

from reward import RULE_TERMS, answer_prompts, rule_rewards
from reward.multi_object import answer_text
from reward.rules import first_brace_block, parse_answer

N = 100_000
SEG_SOL = "<box>(10,100),(200,210)</box><points>(30,110),(35,180)</points>"
MULTI_SOL = json.dumps([{"bbox_2d": [10, 100, 200, 210], "point_2d": [30, 110]},
                        {"bbox_2d": [300, 20, 400, 90], "point_2d": [350, 50]}])
RANGES = {"think_format": (0, 1), "answer_format": (0, 2), "bbox_iou": (0, 1), "bbox_l1": (0, 1),
          "point_l1": (0, 1), "accuracy": (0, 3), "non_repeat": (0, 1)}
BINARY = {"think_format", "bbox_iou", "bbox_l1", "point_l1", "non_repeat"}
TOKENS = ["{", "}", "[", "]", '"', "'", ",", ":", " ", "\n", ".", "NaN", "Infinity", "-Infinity", "-1e999",
          "1e308", "9" * 60, "-0", "true", "null", "<think>", "</think>", "<answer>", "</answer>", "bbox",
          '"bbox"', '"points_1"', '"points_2"', '"bbox_2d"', '"point_2d"', "🙂", "\u202e", "\x00", "\ud800"]


def number(rng):
    return rng.choice([rng.randint(-50, 900), round(rng.uniform(-100, 1000), rng.randint(0, 4)),
                       rng.randint(0, 10**30), 10.0, 1e308, -0.0])


def seg_answer(rng):
    obj = {"bbox": [number(rng) for _ in range(4)], "points_1": [number(rng) for _ in range(2)],
           "points_2": [number(rng) for _ in range(2)]}
    return f"<think>{'reason. ' * rng.randint(0, 5)}</think><answer>{json.dumps(obj)}</answer>"


def multi_answer(rng):
    objs = [{"bbox_2d": [number(rng) for _ in range(4)], "point_2d": [number(rng) for _ in range(2)]}
            for _ in range(rng.randint(0, 4))]
    return f"<think>count. </think><answer>{json.dumps(objs)}</answer>"


def mutate(text, rng):
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        i = rng.randint(0, len(chars))
        op = rng.random()
        if op < 0.4:
            chars.insert(i, rng.choice(TOKENS))
        elif op < 0.7 and chars:
            del chars[min(i, len(chars) - 1)]
        elif chars:
            chars[min(i, len(chars) - 1)] = rng.choice(TOKENS)
    return "".join(chars)


def generate(rng):
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.randint(0, 120)).decode("utf-8", "replace")
    if kind < 0.25:
        return "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(0, 60)))
    if kind < 0.40:
        text = rng.choice([seg_answer, multi_answer])(rng)
        return text[:rng.randint(0, len(text))]  # truncated
    if kind < 0.75:
        return mutate(rng.choice([seg_answer, multi_answer])(rng), rng)
    if kind < 0.85:
        return "".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 80)))
    if kind < 0.9995:
        return rng.choice([seg_answer, multi_answer])(rng)
    # rare: deep nesting and very long strings
    depth = rng.randint(1_000, 50_000)
    return rng.choice(["<think>x</think><answer>" + "{" * depth + "</answer>",
                       "<answer>" + "[" * depth + "</answer>", '{"bbox": ' + "[" * depth + "}",
                       seg_answer(rng) + "a" * depth, "<think>" + "</think><answer>" * (depth // 100)])


def check(rules, response, solution):
    out = rule_rewards(rules, response, solution)
    assert tuple(out) == RULE_TERMS[rules]
    for term, value in out.items():
        lo, hi = RANGES[term]
        assert isinstance(value, float) and math.isfinite(value) and lo <= value <= hi, (term, value, response)
        if term in BINARY or (term == "answer_format" and rules != "multi_object"):
            assert value in (0.0, 1.0)
    if rules != "multi_object":  # a prompt for the segmenter => the format point (not conversely: Seg-Zero
        # checks lengths only, the segmenter needs numbers)
        if parse_answer(response, soft=rules == "segzero_soft") is not None:
            assert out["answer_format"] == 1.0
    else:
        answer_prompts(rules, response)


@pytest.mark.slow
def test_fuzz_every_rule_set_never_raises_and_stays_in_range():
    rng = random.Random(1234)
    for i in range(N):
        response = generate(rng)
        for rules in RULE_TERMS:
            check(rules, response, MULTI_SOL if rules == "multi_object" else SEG_SOL)
        if i % 1000 == 0:  # odd solutions too
            check("segzero", response, response)
            check("multi_object", response, response)


def test_linear_scans_match_the_regexes():
    """first_brace_block == re.search(r"{[^}]+}") and answer_text == Seg-Zero's <answer> regex."""
    rng = random.Random(7)
    brace, answer = re.compile(r"{[^}]+}"), re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
    alphabet = ["{", "}", "a", " ", "\n", "<answer>", "</answer>", "\u2003"]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        m = brace.search(text)
        assert first_brace_block(text) == (m.group(0) if m else None), text
        m = answer.search(text)
        assert answer_text(text) == (m.group(1) if m else None), text
