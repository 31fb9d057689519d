"""Learner on one rank (ZeRO-2, CPU, gloo) with the tiny policy: GRPO/SFT steps, logprobs, weight buckets,
checkpoints, HF export. Multi-rank and ZeRO-3 tests are in test_learner_dist.py."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from cluster.checkpoint import rng_state, set_rng_state
from config import Config
from policy.prompt import chat_prompt
from policy.tiny import build_tiny_policy
from trajectory import LearnerBatch, LearnerSequence


def make_samples(n: int, seed: int = 0, image_size: int = 112) -> list[LearnerSequence]:
    """n GRPO samples with different prompt and response lengths (one response is empty)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = 0 if i == 2 else int(rng.integers(1, 9))
        prompt = chat_prompt("the red square" + " left" * int(rng.integers(0, 4)))
        image = Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
        samples.append(LearnerSequence(prompt, image, rng.integers(300, 1300, length).tolist(), [-7.0] * length,
                                       float(rng.normal()), group=f"s{i}"))
    return samples


def hf_logprobs(model, processor, sample) -> torch.Tensor:
    """Independent reference: one unpadded forward of prompt + response, log_softmax, gather."""
    enc = processor(text=[sample.prompt], images=[sample.image], return_tensors="pt")
    response = torch.tensor([sample.response_ids], dtype=torch.long)
    n, p = response.shape[1], enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], response], dim=1)
    types = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, n, dtype=enc["mm_token_type_ids"].dtype)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits
    return logits[0, p - 1:p - 1 + n].float().log_softmax(-1).gather(-1, response[0, :, None])[:, 0]


def learner_config(stage: int = 2, **learner) -> Config:
    cfg = Config()
    cfg.learner.zero_stage = stage
    cfg.learner.lr = 1e-3
    cfg.learner.micro_batch_size = 2
    cfg.learner.kl_coef = 0.05
    cfg.learner.warmup_steps = 3
    cfg.learner.zero3_param_persistence_threshold = 0  # partition even the tiny model's small tensors
    for k, v in learner.items():
        setattr(cfg.learner, k, v)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads mostly wait for each other
    (measured here: the same forward/backward 3-6x slower in wall time with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", layers=2)


@pytest.fixture(scope="module")
def learner(policy_dir):
    from learner.learner import Learner

    return Learner(learner_config(2), str(policy_dir), master_port=_free_port())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_weights(learner) -> dict[str, torch.Tensor]:
    return {k: v for bucket in learner.weight_buckets(1 << 40, trainable_only=False) for k, v in bucket}


def test_logprobs_match_unpadded_hf_forward(learner, policy_dir):
    from transformers import AutoModelForImageTextToText

    samples = make_samples(5, seed=1)
    got = learner.logprobs(samples, sampled=False)
    model = AutoModelForImageTextToText.from_pretrained(str(policy_dir)).eval()
    assert [len(g) for g in got] == [len(s.response_ids) for s in samples]
    for g, s in zip(got, samples):
        if s.response_ids:
            want = hf_logprobs(model, learner.processor, s)
            assert torch.allclose(torch.tensor(g), want, atol=1e-5), (g, want)


def test_weight_buckets_every_param_once_in_order(learner, policy_dir):
    params = [(n, p) for n, p in learner.model.named_parameters()]
    with safe_open(str(policy_dir / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
        original = {k: f.get_tensor(k) for k in file_keys}
    expected = [learner.weight_names[n] for n, _ in params]
    assert set(expected) == file_keys  # names are the checkpoint's, not the module tree's
    largest = max(p.numel() * p.element_size() for _, p in params)
    for bucket_bytes in (1, 4096, 100_000, largest, 1 << 40):
        buckets = list(learner.weight_buckets(bucket_bytes, trainable_only=False))
        # the plan a broadcast receiver gets beforehand: the same buckets, dtypes and shapes
        assert learner.weight_plan(bucket_bytes, trainable_only=False) == [
            [(k, str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in b] for b in buckets]
        names = [k for b in buckets for k, _ in b]
        assert names == expected
        for b in buckets:
            size = sum(t.numel() * t.element_size() for _, t in b)
            assert size <= bucket_bytes or len(b) == 1
            for _, t in b:
                assert t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
        if bucket_bytes == 1:
            assert len(buckets) == len(params)
        if bucket_bytes == 1 << 40:
            assert len(buckets) == 1
    # Untrained learner: the tensors are the checkpoint's, bit for bit.
    weights = _all_weights(learner)
    for k, t in weights.items():
        assert torch.equal(t, original[k]), k


def test_train_step_moves_logprobs_along_advantages(learner):
    samples = make_samples(4, seed=2)
    samples[0].advantage, samples[1].advantage = 1.0, -1.0
    samples[3].advantage = 0.0
    before_w = _all_weights(learner)
    before = learner.logprobs(samples)
    for s, lp in zip(samples, before):
        s.logprobs = [x + 0.1 for x in lp]  # the sampler's logprobs, off by exactly 0.1
    m = learner.train_step(LearnerBatch(samples))
    after = learner.logprobs(samples)
    assert sum(after[0]) > sum(before[0]) + 0.1  # positive advantage: more likely
    assert sum(after[1]) < sum(before[1]) - 0.1  # negative advantage: less likely
    changed = [k for k, v in _all_weights(learner).items() if not torch.equal(v, before_w[k])]
    assert len(changed) == len(before_w)
    n_tok = sum(len(s.response_ids) for s in samples)
    assert m["tokens"] == n_tok and m["seqs"] == 3  # the empty response is not a sequence
    assert m["logprob_drift"] == pytest.approx(0.1, abs=1e-4)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0)
    assert m["lr"] == pytest.approx(1e-3 / 3)  # first of 3 warm-up steps
    assert m["grad_norm"] > 0 and np.isfinite(m["loss"])
    assert m["loss"] == pytest.approx(m["pg_loss"] + 0.05 * m["kl"], abs=1e-6)
    # pg_loss of a token_mean GRPO step with ratio 1: -sum_i A_i * n_i / n_tokens.
    want = -sum(s.advantage * len(s.response_ids) for s in samples) / n_tok
    assert m["pg_loss"] == pytest.approx(want, rel=1e-5)
    m2 = learner.train_step(LearnerBatch(samples, position=1))
    assert m2["kl"] > 0  # the reference stayed where the policy was
    assert m2["lr"] == pytest.approx(2e-3 / 3)


def test_off_policy_ratio_uses_sampling_logprobs(learner):
    samples = make_samples(3, seed=9)
    for s, lp in zip(samples, learner.logprobs(samples)):
        s.logprobs = [x + 0.1 for x in lp]  # sampled by weights that liked these tokens a bit more
    learner.cfg.rollout.off_policy = True
    try:
        m = learner.train_step(LearnerBatch(samples))
    finally:
        learner.cfg.rollout.off_policy = False
    assert m["ratio_mean"] == pytest.approx(np.exp(-0.1), abs=1e-4)  # exp(logp - sampled logp)
    assert m["ratio_max"] == pytest.approx(np.exp(-0.1), abs=1e-4) and m["clip_frac"] == 0.0


def grouped_samples(groups: int = 2, answers: int = 3,
                    seed: int = 4) -> tuple[list[LearnerSequence], list[LearnerSequence]]:
    """(grouped, separate): ``groups`` prompts with ``answers`` responses each; in ``grouped`` the answers
    of a prompt share its image object (as trajectory.learner_batch sends them), in ``separate``
    every row has its own copy of the image."""
    samples = make_samples(groups * answers, seed=seed)
    for i, s in enumerate(samples):
        first = samples[i - i % answers]
        s.prompt, s.image = first.prompt, first.image
    return samples, [replace(s, image=s.image.copy()) for s in samples]


@pytest.mark.parametrize("path", ["grouped_features", "shared_prompt", "shared_prompt_pixels"])
def test_grouped_paths_give_the_per_row_logprobs_and_gradients(policy_dir, path):
    """A trained vision tower, two prompts with three answers each. grouped_features: the tower on each
    distinct image once, features repeated per row; shared_prompt: besides, each prompt runs once and
    its answers on its cached keys/values (learner.batch.shared_prompt_logits); shared_prompt_pixels: the
    same with the tower inside the prompt pass (ZeRO-3, trained tower). All give the logprobs and
    the gradient of every parameter (the rows' gradients add up on their image and prompt) of
    transformers' own per-row forward (pixel values and whole prompt per row)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from learner.batch import MODEL_KEYS, collate, image_features, model_inputs, shared_prompt_logits
    from learner.logprobs import token_logprobs

    model = AutoModelForImageTextToText.from_pretrained(str(policy_dir))
    processor = AutoProcessor.from_pretrained(str(policy_dir))
    grouped, _ = grouped_samples()
    results = []
    for mode in (path, "per_row"):
        model.zero_grad()
        batch = collate(processor, grouped, processor.tokenizer.pad_token_id)
        if mode == "per_row":
            pixels = torch.cat([processor(text=[s.prompt], images=[s.image], return_tensors="pt")["pixel_values"]
                                for s in grouped])
            logits = model(**{k: batch[k] for k in MODEL_KEYS}, pixel_values=pixels).logits
        else:
            assert batch["image_index"] == [0, 0, 0, 1, 1, 1] and batch["pixel_values"].shape[0] == 2 * 64
            features = image_features(model, batch, "cpu", torch.float32)
            if mode == "grouped_features":
                logits = model(**model_inputs(model, batch, "cpu", torch.float32, features)).logits
            else:
                logits = shared_prompt_logits(model, model, batch, None if mode.endswith("pixels") else features,
                                              "cpu", torch.float32)
        logp, _ = token_logprobs(logits, batch["response_ids"])
        (logp * batch["response_mask"] * torch.linspace(-1, 1, len(grouped))[:, None]).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (logp_g, grads_g), (logp_r, grads_r) = results
    assert torch.allclose(logp_g, logp_r, atol=1e-5)
    assert grads_g.keys() == grads_r.keys() and any(n.startswith("model.visual") for n in grads_g)
    for name, g in grads_g.items():
        assert torch.allclose(g, grads_r[name], atol=1e-5 * max(1.0, g.abs().max().item())), name


def test_frozen_vision_runs_once_per_image_per_step_with_the_same_numbers(policy_dir):
    """ZeRO-2, frozen tower: one tower forward per distinct image per learner call, across micro-batches
    (micro-batch 2, groups of 3) and the reference forward; logprobs and a GRPO step's metrics equal
    those of rows with their own image copies (one tower forward each)."""
    from learner.learner import Learner

    learner = Learner(learner_config(2, freeze_vision=True, kl_coef=0.05), str(policy_dir), master_port=_free_port())
    calls = []
    for module in (learner.model, learner.ref):
        module.model.visual.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    grouped, separate = grouped_samples()
    got = {}
    for name, samples in (("grouped", grouped), ("separate", separate)):
        calls.clear()
        got[name] = learner.logprobs(samples)
        got[name + "_calls"] = len(calls)
    assert got["grouped_calls"] == 2 and got["separate_calls"] == 3  # 3 micro-batches of distinct images
    for a, b in zip(got["grouped"], got["separate"]):
        assert np.allclose(a, b, atol=1e-5)
    state = {k: v.clone() for k, v in learner.engine.module.state_dict().items()}
    metrics = {}
    for name, samples in (("grouped", grouped), ("separate", separate)):
        learner.engine.module.load_state_dict(state)
        calls.clear()
        metrics[name] = learner.train_step(LearnerBatch(samples))
        assert calls == ([64] * 4 if name == "grouped" else [128] * 6), calls  # policy + reference
    for key in ("loss", "kl", "entropy", "logprob_drift"):
        assert metrics["grouped"][key] == pytest.approx(metrics["separate"][key], rel=1e-5, abs=1e-7), key
    assert {f"time/learner/{phase}" for phase in ("collate", "vision", "reference", "forward", "loss", "backward",
                                                  "optimizer")} <= metrics["grouped"].keys()


def test_shared_prompt_trains_like_whole_rows(policy_dir):
    """learner.shared_prompt through the learner (DeepSpeed engine, reference model, micro-batch 4 with
    groups of 3 answers, so groups span micro-batches): two GRPO steps give the metrics of whole-row
    forwards, and the logprobs after them agree. (Gradients are compared exactly in
    test_grouped_paths_give_the_per_row_logprobs_and_gradients; weights after AdamW are not a fair
    comparison: it turns round-off in gradients that are zero in exact arithmetic, such as the key
    biases', into lr-sized steps.)"""
    from learner.learner import Learner

    grouped, _ = grouped_samples(groups=3, answers=3, seed=6)
    runs = {}
    for shared in (False, True):
        cfg = learner_config(2, micro_batch_size=4, kl_coef=0.05, shared_prompt=shared)
        learner = Learner(cfg, str(policy_dir), master_port=_free_port())
        runs[shared] = ([learner.train_step(LearnerBatch(grouped)) for _ in range(2)], learner.logprobs(grouped))
    (m_full, lp_full), (m_shared, lp_shared) = runs[False], runs[True]
    for a, b in zip(m_full, m_shared):
        for key in ("loss", "kl", "entropy", "grad_norm", "logprob_drift"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(lp_full, lp_shared):
        assert np.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("off_policy", [False, True])
def test_update_threads_while_nothing_else_computes(learner, off_policy):
    """cluster.learner_update_threads: the update runs with that many torch threads when the rollout
    workers wait for it (on-policy, warm start), the usual ones off-policy; restored after."""
    seen = {"train": set(), "sft": set()}
    learner.cfg.cluster.learner_update_threads, learner.cfg.rollout.off_policy = 2, off_policy
    try:
        for phase, step in (("train", learner.train_step), ("sft", learner.sft_step)):
            hook = learner.model.register_forward_hook(lambda *_, p=phase: seen[p].add(torch.get_num_threads()))
            step(LearnerBatch(make_samples(2)))
            hook.remove()
    finally:
        learner.cfg.cluster.learner_update_threads, learner.cfg.rollout.off_policy = 0, False
    assert seen == {"train": {1 if off_policy else 2}, "sft": {2}} and torch.get_num_threads() == 1


def test_image_placeholder_in_a_response_is_masked_not_fatal(learner):
    sample = make_samples(1, seed=10)[0]
    clean = replace(sample, response_ids=sample.response_ids[:3])
    image_pad = learner.processor.image_token_id
    sample.response_ids = clean.response_ids + [image_pad, 400, 401]
    sample.logprobs = [-7.0] * 6
    got, want = learner.logprobs([sample, clean])
    assert len(got) == 6 and got[:3] == pytest.approx(want, abs=1e-5)  # causal: the prefix is unaffected
    m = learner.train_step(LearnerBatch([sample]))
    assert m["tokens"] == 6 and np.isfinite(m["loss"])


def test_sft_steps_lower_nll(learner):
    samples = [s for s in make_samples(4, seed=3) if s.response_ids]
    learner.cfg.train.sft_steps, learner.cfg.train.sft_lr = 10, 5e-4
    try:  # warm-start steps 4..6, past the warm-up: the steps use exactly train.sft_lr
        metrics = [learner.sft_step(LearnerBatch(samples, position=p)) for p in (3, 4, 5)]
    finally:
        learner.cfg.train.sft_steps, learner.cfg.train.sft_lr = 0, 1e-3
    assert all(m["lr"] == pytest.approx(5e-4) for m in metrics)
    losses = [m["loss"] for m in metrics]
    nll = -sum(sum(lp) for lp in learner.logprobs(samples, sampled=False)) / sum(len(s.response_ids) for s in samples)
    assert losses[0] > losses[1] > losses[2] > nll


def test_checkpoint_roundtrip_restores_params_and_optimizer(learner, tmp_path):
    batch_a, batch_b = make_samples(3, seed=4), make_samples(3, seed=5)
    learner.train_step(LearnerBatch(batch_a, position=3))
    learner.save_checkpoint(tmp_path / "ckpt", {"step": 7, "rng": rng_state()})
    saved = _all_weights(learner)
    saved_opt = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                 for s in learner.optimizer.optimizer.state.values()]
    m_b = learner.train_step(LearnerBatch(batch_b, position=4))
    after_b = _all_weights(learner)
    learner.train_step(LearnerBatch(batch_a, position=5))  # wander further off

    client = learner.load_checkpoint(tmp_path / "ckpt")
    assert client["step"] == 7
    set_rng_state(client["rng"])
    for k, v in _all_weights(learner).items():
        assert torch.equal(v, saved[k]), k
    restored_opt = list(learner.optimizer.optimizer.state.values())
    assert len(restored_opt) == len(saved_opt) > 0
    for s, r in zip(saved_opt, restored_opt):
        for k, v in s.items():
            assert torch.equal(r[k], v), k
    # Resuming reproduces the same next step exactly (Adam moments restored; the rate is the step's).
    m_b2 = learner.train_step(LearnerBatch(batch_b, position=4))
    assert m_b2["lr"] == m_b["lr"] and m_b2["loss"] == m_b["loss"]
    for k, v in _all_weights(learner).items():
        assert torch.equal(v, after_b[k]), k


def test_export_hf_loads_in_transformers_with_same_logprobs(learner, policy_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    learner.train_step(LearnerBatch(make_samples(3, seed=6)))  # exported weights differ from the initial ones
    learner.export_hf(tmp_path / "hf")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json"} <= files
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    original = AutoModelForImageTextToText.from_pretrained(str(policy_dir)).eval()
    samples = [s for s in make_samples(4, seed=7) if s.response_ids]
    for got, s in zip(learner.logprobs(samples, sampled=False), samples):
        exported = hf_logprobs(model, processor, s)
        assert torch.allclose(exported, torch.tensor(got), atol=1e-5)
        assert not torch.allclose(exported, hf_logprobs(original, processor, s), atol=1e-3)


def test_set_reference_measures_kl_from_the_exported_policy(learner, tmp_path):
    # What launch.py does after the warm start: the warm-started policy becomes the KL reference.
    samples = [s for s in make_samples(4, seed=8) if s.response_ids]
    for s, lp in zip(samples, learner.logprobs(samples)):
        s.logprobs = lp
    learner.train_step(LearnerBatch(samples))
    assert learner.train_step(LearnerBatch(samples))["kl"] > 1e-6  # the policy has moved off the reference
    learner.export_hf(tmp_path / "warm")
    learner.set_reference(tmp_path / "warm")
    assert learner.train_step(LearnerBatch(samples))["kl"] == pytest.approx(0.0, abs=1e-6)
    assert learner.train_step(LearnerBatch(samples))["kl"] > 0  # and it stays there while the policy moves on


def test_zero3_frozen_vision_with_checkpointing_trains_and_syncs_only_the_language_model(policy_dir):
    from learner.learner import Learner

    cfg = learner_config(3, freeze_vision=True, gradient_checkpointing=True, kl_coef=0.0, entropy_coef=0.01)
    frozen = Learner(cfg, str(policy_dir), master_port=_free_port())
    assert frozen.ref is None  # kl_coef == 0: no reference model at all
    before = _all_weights(frozen)
    m = frozen.train_step(LearnerBatch(make_samples(3, seed=8)))
    assert m["kl"] == 0.0 and m["entropy"] > 0
    after = _all_weights(frozen)
    for k in before:
        assert torch.equal(before[k], after[k]) == k.startswith("visual."), k
    synced = [k for b in frozen.weight_buckets(100_000) for k, _ in b]
    assert synced == [k for k in after if not k.startswith("visual.")] and len(synced) > 0


def test_zero3_trained_vision_with_checkpointing_trains_syncs_and_scores(policy_dir, tmp_path):
    """ZeRO-3 with a trained vision tower: the tower runs inside the engine's forward, on the distinct
    images (ZeRO-3 gathers and releases weights in the module order of its forward and of the
    recomputation in backward; run outside it, with gradient checkpointing, the mode matrix's jobs found
    weights still in flight at the next weight sync). Two GRPO steps on groups, a full weight gather,
    and logprobs that match transformers' own forward of the exported policy."""
    from transformers import AutoModelForImageTextToText

    from learner.learner import Learner

    cfg = learner_config(3, freeze_vision=False, gradient_checkpointing=True, kl_coef=0.05)
    learner = Learner(cfg, str(policy_dir), master_port=_free_port())
    grouped, _ = grouped_samples()
    for _ in range(2):
        assert np.isfinite(learner.train_step(LearnerBatch(grouped))["loss"])
    assert len(_all_weights(learner)) > 0  # the weight sync's gather
    learner.export_hf(tmp_path / "trained")
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "trained")).eval()
    for got, s in zip(learner.logprobs(grouped, sampled=False), grouped):
        if s.response_ids:
            assert torch.allclose(torch.tensor(got), hf_logprobs(model, learner.processor, s), atol=1e-5)


def test_deepspeed_config_follows_learner_config():
    from learner.engine import deepspeed_config

    ds = deepspeed_config(learner_config(3, grad_clip=0.5, lr=2e-6), bf16=True)
    # contiguous gradient buffers only where they pay: against GPU memory fragmentation
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "contiguous_gradients": torch.cuda.is_available()}
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["lr"] == 2e-6 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["fused"] is True
    assert "optimizer" not in deepspeed_config(learner_config(3), bf16=False, with_optimizer=False)


def test_learning_rate_warms_up_then_decays_over_the_grpo_steps_only():
    from config import load_config
    from learner.engine import learning_rate

    cfg = load_config(None, ["learner.lr_schedule=cosine", "learner.min_lr_ratio=0.1", "learner.warmup_steps=2",
                             "train.sft_steps=10", "train.steps=4", "train.sft_lr=1e-3", "learner.lr=1e-4"])
    rates = [learning_rate(p, cfg) for p in range(15)]
    assert rates[:10] == pytest.approx([5e-4] + [1e-3] * 9)  # the warm start: warm-up, then train.sft_lr
    # GRPO steps 1..4 at positions 10..13: learner.lr at the first, cosine towards 0.1x after the last, then flat
    cosine = [1.0, 0.1 + 0.9 * (1 + 2 ** -0.5) / 2, 0.55, 0.1 + 0.9 * (1 - 2 ** -0.5) / 2, 0.1]
    assert rates[10:] == pytest.approx([1e-4 * c for c in cosine])
    constant = load_config(None, ["learner.lr_schedule=constant", "learner.warmup_steps=0", "train.sft_steps=10",
                                  "train.steps=4", "learner.lr=1e-4"])
    assert [learning_rate(p, constant) for p in range(10, 15)] == [1e-4] * 5
    warm = load_config(None, ["learner.warmup_steps=4", "train.sft_steps=0", "learner.lr=1.0",
                              "learner.lr_schedule=constant"])
    assert [learning_rate(p, warm) for p in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_weight_decay_applies_to_matrices_only(policy_dir):
    """learner.weight_decay reaches the optimizer for matrices and embeddings; biases and norm gains
    are never decayed."""
    from learner.learner import Learner

    learner = Learner(learner_config(2, weight_decay=0.25), str(policy_dir), master_port=_free_port())
    groups = learner.engine.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]


@pytest.mark.parametrize("stage", [2, 3])
def test_weight_decay_shrinks_every_matrix_under_both_zero_stages(policy_dir, stage):
    """Decoupled weight decay alone (every advantage 0, no KL or entropy term: a zero gradient, so Adam
    moves nothing): two steps at lr 1e-4 with weight_decay 500 scale every matrix by 0.95 per step
    and leave every 1-D parameter as it was. Under ZeRO-3 the parameters are partitioned (their .data
    is empty, dim 1) when the optimizer groups are made: the split must read their real shapes."""
    from learner.learner import Learner

    cfg = learner_config(stage, weight_decay=500.0, lr=1e-4, warmup_steps=0, lr_schedule="constant", kl_coef=0.0)
    learner = Learner(cfg, str(policy_dir), master_port=_free_port())
    before = _all_weights(learner)
    samples = make_samples(3, seed=12)
    for s in samples:
        s.advantage = 0.0
    for position in range(2):
        learner.train_step(LearnerBatch(samples, position=position))
    after = _all_weights(learner)
    ratios = {k: float(after[k].norm() / before[k].norm()) for k in before if before[k].norm() > 0}
    matrices = [k for k in ratios if before[k].dim() >= 2]
    vectors = [k for k in ratios if before[k].dim() < 2]
    assert matrices and vectors
    assert all(ratios[k] == pytest.approx(0.95 ** 2, rel=1e-4) for k in matrices), {k: ratios[k] for k in matrices}
    assert all(ratios[k] == pytest.approx(1.0, abs=1e-6) for k in vectors)


def test_every_micro_batch_runs_the_same_passes_even_with_empty_answers(learner):
    """Under ZeRO-3 each pass of the model gathers its weights, a collective every rank must join equally
    often: a micro-batch whose responses are all empty (an engine may return an empty answer) still runs
    the answer pass of the shared prompt (a masked pad column), and scores nothing."""
    from learner.batch import collate

    calls = []
    hook = learner.model.model.language_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        empty = [s for s in make_samples(3, seed=13) if not s.response_ids][:1] * 2
        full = [s for s in make_samples(3, seed=13) if s.response_ids][:2]
        counts = []
        for chunk in (full, empty):
            calls.clear()
            batch = collate(learner.processor, chunk, learner.pad_id)
            logp, _ = learner.forward.logprobs(learner.engine, batch,
                                               learner.forward.features(learner.engine, batch, {}))
            counts.append(len(calls))
        assert counts == [2, 2] and batch["response_mask"].sum() == 0 and logp.shape == (2, 1)
    finally:
        hook.remove()
