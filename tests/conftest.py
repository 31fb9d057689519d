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
# The real-vocabulary families at their smallest (policy/build.py) and the image size each runs at: a
# multiple of the family's patch x merge (28, 32) and of the synthetic scenes' 28-px cells.
FAMILY_IMAGE_SIZE = {"qwen2_5_vl": 112, "qwen3_vl": 224}
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


def memorise(path, sample, size: int, coordinates: str = "pixels", steps: int = 150):
    """Fine-tunes the HF policy at ``path`` in place (plain transformers) to answer ``sample``'s reference
    answer, in the coordinate convention given; it then answers every image with that box and points."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from policy.family import fixed_size, pixels_per_unit

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    image = sample.model_image(size)
    prompt = processor(text=[chat_prompt(sample.problem, coordinates=coordinates)], images=[image],
                       return_tensors="pt", size=fixed_size(size))
    reference = sample.reference_answer(size, unit=pixels_per_unit(coordinates, size))
    answer = processor.tokenizer(reference + "<|im_end|>", add_special_tokens=False, return_tensors="pt").input_ids
    inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], answer], 1),
                  attention_mask=torch.ones(1, prompt["input_ids"].shape[1] + answer.shape[1], dtype=torch.long))
    if "mm_token_type_ids" in inputs:  # the answer holds no image tokens (keeps Qwen's 3-D positions)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    labels = inputs["input_ids"].clone()
    labels[:, :prompt["input_ids"].shape[1]] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:
            break
    # The tests that use it need the answer itself: a policy that did not converge answers something else.
    assert loss.item() < 0.01, f"the memorised policy did not converge: loss {loss.item():.4f} after {steps} steps"
    model.save_pretrained(path)
    return reference


@pytest.fixture(scope="session")
def memorised_policy(tmp_path_factory, synthetic_split):
    """The tiny policy fine-tuned (~100 steps) to answer one sample's reference answer."""
    path = build_tiny_policy(tmp_path_factory.mktemp("policy") / "memorised", image_size=IMAGE_SIZE, seed=1)
    sample = next(ParquetSource(synthetic_split, shuffle=False).iter_epoch())
    memorise(path, sample, IMAGE_SIZE)
    return path, sample


@pytest.fixture(scope="session")
def memorised_qwen3_vl(tmp_path_factory, synthetic_split):
    """A real-vocabulary Qwen3-VL directory (policy/build.py) fine-tuned to answer one sample's reference
    answer in its relative coordinates, at its image size: (path, sample, reference answer)."""
    from policy.build import build_policy

    path = build_policy("qwen3_vl", tmp_path_factory.mktemp("qwen3_vl_memorised") / "policy", seed=1)
    sample = next(ParquetSource(synthetic_split, shuffle=False).iter_epoch())
    reference = memorise(path, sample, FAMILY_IMAGE_SIZE["qwen3_vl"], "relative_1000", steps=300)
    return path, sample, reference


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



@pytest.fixture(scope="session")
def family_policy(tmp_path_factory):
    """family_policy(family) -> a random-weight HF directory of that family with Qwen's real vocabulary
    (``python -m policy.build``), built on first use."""
    from policy.build import build_policy

    built = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(build_policy(family, tmp_path_factory.mktemp(family) / "policy"))
        return built[family]

    return get
