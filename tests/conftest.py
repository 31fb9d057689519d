"""Shared fixtures: the tiny policy, a synthetic split, and a tiny policy that has memorised one answer
(so that greedy decoding produces a parseable box and points without a training run)."""
import os

import pytest
import torch

from data.dataset import ParquetSource
from data.synthetic import write_synthetic
from policy.prompt import chat_prompt
from policy.tiny import build_tiny_policy

IMAGE_SIZE = 112
# A real launch.py job that warm-starts the tiny policy as the default does (200 steps, batch 16, lr 1e-3),
# then one GRPO step: what the end-to-end tests start from, so that their answers parse and score.
WARM_START = ["train.steps=1", "train.sft_steps=200", "train.sft_batch_size=16", "train.sft_lr=1e-3",
              "learner.warmup_steps=20", "data.synthetic_train_size=128", "data.synthetic_eval_size=4",
              "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=48",
              "eval.enabled=false", "tracking.system_metrics=false", "tracking.log_model=false"]


@pytest.fixture(autouse=True)
def own_mlflow_store():
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into the environment: a job one test runs
    in this process must not send a later test's subprocess jobs to its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def synthetic_split(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("data") / "split.parquet", 6, IMAGE_SIZE, seed=3)


@pytest.fixture(scope="session")
def memorised_policy(tmp_path_factory, synthetic_split):
    """The tiny policy fine-tuned (plain transformers, ~100 steps) to answer one sample's reference
    answer; it answers every image with that box and points."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_policy(tmp_path_factory.mktemp("policy") / "memorised", image_size=IMAGE_SIZE, seed=1)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    sample = next(ParquetSource(synthetic_split, shuffle=False).iter_epoch())
    prompt = processor(text=[chat_prompt(sample.problem)], images=[sample.model_image(IMAGE_SIZE)], return_tensors="pt")
    answer = processor.tokenizer(sample.reference_answer(IMAGE_SIZE) + "<|im_end|>", add_special_tokens=False,
                                 return_tensors="pt").input_ids
    inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], answer], 1),
                  attention_mask=torch.ones(1, prompt["input_ids"].shape[1] + answer.shape[1], dtype=torch.long))
    if "mm_token_type_ids" in inputs:  # the answer holds no image tokens (keeps Qwen's 3-D positions)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    labels = inputs["input_ids"].clone()
    labels[:, :prompt["input_ids"].shape[1]] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:
            break
    # The tests that use it need the answer itself: a policy that did not converge answers something else.
    assert loss.item() < 0.01, f"the memorised policy did not converge: loss {loss.item():.4f} after 150 steps"
    model.save_pretrained(path)
    return path, sample



@pytest.fixture(scope="session")
def warm_policy(tmp_path_factory):
    """warm_policy(rules) -> the tiny policy warm-started on that rule set's answer format (Seg-Zero's
    object for segzero and segzero_soft, VisionReasoner's list for multi_object), built on first use."""
    import launch
    from config import load_config

    built = {}

    def get(rules: str) -> str:
        key = "segzero" if rules == "segzero_soft" else rules
        if key not in built:
            out = tmp_path_factory.mktemp(f"warm_{key}")
            launch.train(load_config(None, WARM_START + [f"reward.rules={key}", f"train.output_dir={out}"]))
            built[key] = str(out / "warm_start_policy")
        return built[key]

    return get
