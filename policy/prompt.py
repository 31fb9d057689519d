"""The prompts the policy is trained and evaluated with, and their chat formatting, shared by rollout,
learner, evaluation and inference. The rule set (config ``reward.rules``) decides which one:

- ``segzero``, ``segzero_soft``: Seg-Zero's prompt (v1), one box and two points, ``Question =
  problem.lower().strip(".")``, the example answer ``{'bbox': [...], 'points_1': [...], 'points_2': [...]}``.
- ``multi_object``: VisionReasoner's training prompt (``verl/utils/rl_dataset.py`` in Seg-Zero's
  repository): every matching object as a JSON list ``[{"bbox_2d": [...], "point_2d": [...]}, ...]``,
  with a newline between the image and the text, as its training code writes it.

The model sees: system "You are a helpful assistant.", then a user turn holding the image followed by
the text. Coordinates in the answer live in the resized image (model.image_size; both papers: 840), in
the convention of ``reward.coordinates`` (policy/family.py): in pixels both papers' prompts verbatim;
in ``relative_1000`` (Qwen3-VL's own) the example answer is the same one in 0..1000 of an 840-pixel
image, and one sentence before "i.e." says so.
"""
from __future__ import annotations

import re

from policy.family import to_answer_units

SYSTEM_PROMPT = "You are a helpful assistant."
EXAMPLE_ANSWER = "{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180]}"
SEGZERO_TEMPLATE = (
    "Please find '{question}' with bbox and points."
    "Compare the difference between objects and find the most closely matched one."
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "Output the one bbox and points of two largest inscribed circles inside the interested object in JSON format."
    "{coordinates}i.e., <think> thinking process here </think><answer>{answer}</answer>"
)
MULTI_OBJECT_EXAMPLE_ANSWER = ('[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}, '
                               '{"bbox_2d": [225,296,706,786], "point_2d": [302,410]}]')
MULTI_OBJECT_TEMPLATE = (
    "\nPlease find \"{question}\" with bboxs and points."
    "Compare the difference between object(s) and find the most closely matched object(s)."
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "Output the bbox(es) and point(s) inside the interested object(s) in JSON format."
    "{coordinates}i.e., <think> thinking process here </think><answer>{answer}</answer>"
)
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
RELATIVE_NOTE = "The coordinates are relative to the image, from 0 to 1000 across its width and its height."
EXAMPLE_IMAGE_SIZE = 840  # the pixel examples' image (both papers')


def example_answer(rules: str, coordinates: str) -> str:
    """The prompt's example answer for the rule set, its numbers in the coordinate convention."""
    example = MULTI_OBJECT_EXAMPLE_ANSWER if rules == "multi_object" else EXAMPLE_ANSWER
    return re.sub(r"\d+", lambda m: str(to_answer_units([int(m[0])], coordinates, EXAMPLE_IMAGE_SIZE)[0]), example)


def question_text(problem: str, rules: str = "segzero", coordinates: str = "pixels") -> str:
    """The user text after the image: the rule set's template with the lower-cased query, its example
    answer and coordinate note in the convention ``coordinates`` (config reward.coordinates)."""
    template = MULTI_OBJECT_TEMPLATE if rules == "multi_object" else SEGZERO_TEMPLATE
    note = RELATIVE_NOTE if coordinates == "relative_1000" else ""
    return template.format(question=problem.lower().strip("."), answer=example_answer(rules, coordinates),
                           coordinates=note)


def chat_prompt(problem: str, rules: str = "segzero", coordinates: str = "pixels") -> str:
    """Full chat-formatted prompt string (Qwen2.5-VL layout) ending where the assistant starts.

    Written out rather than rendered through a tokenizer's chat template so that rollout (vLLM) and
    learner (transformers) provably see the same text for every checkpoint.
    """
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{VISION_PLACEHOLDER}{question_text(problem, rules, coordinates)}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
