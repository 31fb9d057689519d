"""Rewards for reasoning segmentation: rule terms (Seg-Zero, VisionReasoner) and segmenter mask IoU.

`rule_rewards(rules, response, solution)` scores one response by the rule set named in the config
(`segzero`, `segzero_soft`, `multi_object`); `answer_prompts` turns a response into segmenter prompts.
Both never raise.
"""
from __future__ import annotations

import numpy as np

from reward import multi_object
from reward import rules as segzero

RULE_TERMS = {"segzero": segzero.TERMS, "segzero_soft": segzero.TERMS, "multi_object": multi_object.TERMS}


def rule_rewards(rules: str, response: str, solution: str) -> dict[str, float]:
    """One float per rule term of `rules` (RULE_TERMS[rules]) for one response."""
    if rules == "multi_object":
        return multi_object.multi_object_rewards(response, solution)
    if rules in ("segzero", "segzero_soft"):
        return segzero.segzero_rewards(response, solution, soft=rules == "segzero_soft")
    raise ValueError(f"unknown rule set {rules!r}; expected one of {sorted(RULE_TERMS)}")


def answer_prompts(rules: str, response: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Segmenter prompts of a response in model space: boxes [n,4] and points [n,P,2] (P = 2 for
    Seg-Zero answers, n = 1; P = 1 per object for multi-object answers), or None when it does not parse."""
    if rules == "multi_object":
        parsed = multi_object.parse_answer_objects(response)
        return None if parsed is None else (parsed[0], parsed[1][:, None, :])
    answer = segzero.parse_answer(response, soft=rules == "segzero_soft")
    if answer is None:
        return None
    return np.array([answer["bbox"]]), np.array([answer["points"]])
