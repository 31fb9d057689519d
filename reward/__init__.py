"""Rewards for reasoning segmentation: rule terms (Seg-Zero, VisionReasoner) and segmenter mask IoU.

`rule_rewards(rules, response, solution)` scores one response by the rule set named in the config
(`segzero`, `segzero_soft`, `multi_object`); `answer_prompts` turns a response into segmenter prompts.
Both never raise. Both take ``pixels_per_unit`` (policy/family.py ``pixels_per_unit`` of
reward.coordinates): the answer's coordinates are converted to pixels of the resized image before any
term or the segmenter reads them, so the same geometric answer scores the same in every convention.
"""
from __future__ import annotations

import numpy as np

from reward import multi_object
from reward import rules as segzero

RULE_TERMS = {"segzero": segzero.TERMS, "segzero_soft": segzero.TERMS, "multi_object": multi_object.TERMS}


def rule_rewards(rules: str, response: str, solution: str, pixels_per_unit: float = 1.0) -> dict[str, float]:
    """One float per rule term of `rules` (RULE_TERMS[rules]) for one response."""
    if rules == "multi_object":
        return multi_object.multi_object_rewards(response, solution, pixels_per_unit)
    if rules in ("segzero", "segzero_soft"):
        return segzero.segzero_rewards(response, solution, rules == "segzero_soft", pixels_per_unit)
    raise ValueError(f"unknown rule set {rules!r}; expected one of {sorted(RULE_TERMS)}")


def answer_prompts(rules: str, response: str, pixels_per_unit: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Segmenter prompts of a response in model space: boxes [n,4] and points [n,P,2] (P = 2 for
    Seg-Zero answers, n = 1; P = 1 per object for multi-object answers), or None when it does not parse."""
    if rules == "multi_object":
        parsed = multi_object.parse_answer_objects(response, pixels_per_unit)
        return None if parsed is None else (parsed[0], parsed[1][:, None, :])
    answer = segzero.parse_answer(response, rules == "segzero_soft", pixels_per_unit)
    if answer is None:
        return None
    return np.array([answer["bbox"]]), np.array([answer["points"]])
