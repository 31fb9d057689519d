"""Seg-Zero's prompt (v1) and chat formatting, shared by rollout, learner, evaluation and inference.

The model sees: system "You are a helpful assistant.", then a user turn holding the image followed by
the text below, with ``Question = problem.lower().strip(".")``. Coordinates in the answer live in the
resized image (model.image_size; Seg-Zero: 840).
"""
from __future__ import annotations

SYSTEM_PROMPT = "You are a helpful assistant."
EXAMPLE_ANSWER = "{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180]}"
SEGZERO_TEMPLATE = (
    "Please find '{question}' with bbox and points."
    "Compare the difference between objects and find the most closely matched one."
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "Output the one bbox and points of two largest inscribed circles inside the interested object in JSON format."
    "i.e., <think> thinking process here </think><answer>{answer}</answer>"
)
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def question_text(problem: str) -> str:
    """The user text after the image: Seg-Zero's template with the lower-cased query."""
    return SEGZERO_TEMPLATE.format(question=problem.lower().strip("."), answer=EXAMPLE_ANSWER)


def chat_prompt(problem: str) -> str:
    """Full chat-formatted prompt string (Qwen2.5-VL layout) ending where the assistant starts.

    Written out rather than rendered through a tokenizer's chat template so that rollout (vLLM) and
    learner (transformers) provably see the same text for every checkpoint.
    """
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{VISION_PLACEHOLDER}{question_text(problem)}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
