"""bf16 training with fp32 gradients (learner.learner.deepspeed_config: data_types.grad_accum_dtype fp32,
communication_data_type fp32), as Seg-Zero's fp32-master training does, against the fp32 reference.

One GRPO step of 16 sequences in 16 micro-batches, one rank, from the same weights (the policy's
weights rounded to bf16, so both runs start from identical values): the gradient DeepSpeed hands to the
optimizer under bf16 with fp32 accumulation is compared with the fp32 run's, whole-model relative error
||g - g_fp32|| / ||g_fp32||. What remains is bf16 compute (forward/backward in bf16), the same for every
accumulation scheme; DeepSpeed's bf16 default (bf16 accumulation buffers, no data_types) is measured
beside it and must be no better. Measured on the tiny policy: fp32 accumulation 0.58% (ZeRO-2) and
0.60% (ZeRO-3), bf16 accumulation 0.75% and 0.77%; tolerance 2%. (One rank: the cross-rank reduction,
also fp32 now, is exercised by tests/test_learner_dist.py in fp32 only.)"""
import socket

import pytest
import torch

import learner.learner as ll
from config import Config
from tests.test_learner import make_samples

pytestmark = pytest.mark.slow
MICRO_BATCHES = 16
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def rounded_policy(tmp_path_factory):
    """The tiny policy with every weight rounded to bf16 and stored in fp32."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from policy.tiny import build_tiny_policy

    path = build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    out = tmp_path_factory.mktemp("policy") / "rounded"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(path).save_pretrained(out)
    return str(out)


def step_gradient(policy: str, dtype: str, stage: int) -> torch.Tensor:
    """The whole model's gradient (flat, fp32) that one GRPO step hands to the optimizer."""
    cfg = Config()
    cfg.model.dtype = dtype
    cfg.learner.zero_stage = stage
    cfg.learner.micro_batch_size = 1
    cfg.learner.kl_coef = 0.0
    cfg.learner.zero3_param_persistence_threshold = 0
    cfg.learner.grad_clip = 1e9  # compare the gradients themselves, not their clipped versions
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    learner = ll.Learner(cfg, policy, master_port=port)
    # The fp32 gradient the base optimizer (AdamW) consumes: DeepSpeed has reduced and accumulated it into
    # its flat fp32 partitions (one rank: the whole model) by the time it calls the optimizer's step.
    base, grads = learner.engine.optimizer.optimizer, []
    real_step = base.step

    def capture(*args, **kwargs):
        grads.extend(p.grad.float().reshape(-1).clone() for group in base.param_groups for p in group["params"]
                     if p.grad is not None)
        return real_step(*args, **kwargs)

    base.step = capture
    samples = [s for s in make_samples(MICRO_BATCHES + 1, seed=5) if s["response_ids"]][:MICRO_BATCHES]
    learner.train_step(samples)
    return torch.cat(grads)


def relative_error(g, reference) -> float:
    return float((g - reference).norm() / reference.norm())


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_with_fp32_gradients_matches_the_fp32_reference(rounded_policy, stage, monkeypatch):
    reference = step_gradient(rounded_policy, "float32", stage)
    fp32_grads = relative_error(step_gradient(rounded_policy, "bfloat16", stage), reference)
    real_config = ll.deepspeed_config

    def bf16_gradients(*args, **kwargs):  # DeepSpeed's default for bf16: no data_types, bf16 reduction
        ds = real_config(*args, **kwargs)
        ds.pop("data_types", None)
        ds.pop("communication_data_type", None)
        return ds

    monkeypatch.setattr(ll, "deepspeed_config", bf16_gradients)
    bf16_grads = relative_error(step_gradient(rounded_policy, "bfloat16", stage), reference)
    print(f"ZeRO-{stage}: relative gradient error vs fp32: fp32 accumulation {fp32_grads:.4f}, "
          f"bf16 accumulation {bf16_grads:.4f}")
    assert fp32_grads < TOLERANCE
    assert fp32_grads <= bf16_grads * 1.05
