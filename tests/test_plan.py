"""cluster.plan: the GPU recipes' plans on one node of 8 GPUs, plans that cannot run (the CLI's exit code,
launch.py stopping before any actor), and the plan's numbers against what the tiny policy measures:
model states in memory, checkpoint bytes on disk, bytes per weight sync."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from cluster.plan import make_plan
from config import REPO, load_config

RECIPES = ["segzero_7b", "segzero_3b", "segzero_7b_mask_iou", "qwen3vl_8b"]
GB = 1e9


def recipe(name: str, overrides=()):
    return load_config(REPO / "configs" / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_fit_one_node_of_8_gpus_with_nothing_reserved_and_unused(name):
    cfg = recipe(name)
    plan = make_plan(cfg, cfg.model.policy_path, gpus_per_node=8, nodes=1)
    assert plan.problems == [] and plan.warnings == []
    assert plan.other["gpus"] == 8
    assert sum(plan.learner.values()) < 0.9 * cfg.cluster.gpu_memory_gb * GB
    assert sum(plan.rollout.values()) < cfg.rollout.gpu_memory_utilization * cfg.cluster.gpu_memory_gb * GB
    assert plan.other["sequence_tokens"] <= cfg.rollout.max_model_len
    # Seg-Zero's numerics and reward: bf16, rule terms only unless the mask-IoU variant
    assert cfg.model.dtype == "bfloat16" and (cfg.reward.mask_iou == "off") == (name != "segzero_7b_mask_iou")


def test_seven_b_numbers():
    """The published shape: Qwen2.5-VL-7B has 8.29B parameters (0.68B in the vision tower)."""
    cfg = recipe("segzero_7b")
    plan = make_plan(cfg, cfg.model.policy_path, 8)
    assert plan.other["params"] == 8_292_166_656
    assert plan.other["image_tokens"] == 900  # 840 px / 28 px per token, squared
    assert plan.other["sync bytes"] == 2 * 8_292_166_656
    assert plan.other["checkpoint bytes"] == 12 * 8_292_166_656  # ZeRO-3: fp32 master + Adam


@pytest.mark.parametrize("name, params, vision", [
    ("Qwen3-VL-4B-Instruct", 4_437_815_808, 415_347_712),
    ("Qwen3-VL-8B-Instruct", 8_767_123_696, 576_388_336),
    ("Qwen3-VL-32B-Instruct", 33_357_390_064, 595_266_800),
])
def test_qwen3_vl_shapes(name, params, vision):
    """The published Qwen3-VL shapes (configs/models/), counted on the meta device: deepstack mergers in
    the tower, 32-px tokens (832 px: 26 x 26), and an image size that is no multiple of 32 is a problem."""
    cfg = recipe("qwen3vl_8b", [f"model.policy_path=/models/{name}"])
    plan = make_plan(cfg, cfg.model.policy_path, 8)
    assert (plan.other["params"], plan.other["vision_params"]) == (params, vision)
    assert plan.other["image_tokens"] == 26 * 26
    bad = make_plan(recipe("qwen3vl_8b", [f"model.policy_path=/models/{name}", "model.image_size=840"]),
                    f"/models/{name}", 8)
    assert any("model.image_size: 840 is not a multiple of 32" in p for p in bad.problems), bad.problems


def test_the_logits_term_is_one_chunk_of_the_vocabulary():
    """learner.logprob_chunk_tokens: one chunk's fp32 logits (x 3: log-softmax, gradient) at Qwen's
    vocabulary; 0, the whole micro-batch's."""
    cfg = recipe("segzero_7b")
    tokens, vocab = cfg.learner.micro_batch_size * cfg.rollout.max_new_tokens, 152_064  # Qwen2.5-VL-7B's rows
    assert tokens > cfg.learner.logprob_chunk_tokens > 0
    chunked = make_plan(cfg, cfg.model.policy_path, 8).learner["logits (one micro-batch)"]
    assert chunked == cfg.learner.logprob_chunk_tokens * vocab * 4 * 3
    whole = make_plan(recipe("segzero_7b", ["learner.logprob_chunk_tokens=0"]), cfg.model.policy_path, 8)
    assert whole.learner["logits (one micro-batch)"] == tokens * vocab * 4 * 3


@pytest.mark.parametrize("overrides, problem", [
    (["cluster.learner_ranks=1", "cluster.rollout_workers=7"], "a learner GPU needs"),  # 7B unsharded: ~150 GB
    (["rollout.max_model_len=900"], "no prompt fits"),
    (["cluster.rollout_workers=5"], "reserve 9 GPUs; the cluster has 8"),
    (["rollout.gpu_memory_utilization=0.2"], "a vLLM engine needs"),
])
def test_impossible_plans_are_problems(overrides, problem):
    cfg = recipe("segzero_7b", overrides)
    plan = make_plan(cfg, cfg.model.policy_path, 8)
    assert any(problem in p for p in plan.problems), plan.problems


@pytest.mark.parametrize("overrides, warning", [
    (["cluster.reward.num_gpus=0.25", "cluster.rollout_workers=3"], "reward.mask_iou is off"),
    (["rollout.max_model_len=2000"], "long answers are cut"),
    (["cluster.rollout_workers=2"], "2 of the cluster's 8 GPUs are not used"),
])
def test_waste_and_cut_answers_are_warnings(overrides, warning):
    cfg = recipe("segzero_7b", overrides)
    plan = make_plan(cfg, cfg.model.policy_path, 8)
    assert plan.problems == [] and any(warning in w for w in plan.warnings), plan.warnings


def test_slow_checkpoint_storage_is_a_warning():
    cfg = recipe("segzero_7b")
    assert make_plan(cfg, cfg.model.policy_path, 8, storage_gbps=0.5).warnings == []  # 25 GB per rank: ~50 s
    slow = make_plan(cfg, cfg.model.policy_path, 8, storage_gbps=0.05)
    assert any("a checkpoint writes ~25 GB per learner rank" in w for w in slow.warnings), slow.warnings


def test_activations_shrink_with_gradient_checkpointing():
    on = recipe("segzero_7b")
    off = recipe("segzero_7b", ["learner.gradient_checkpointing=false"])
    p_on, p_off = make_plan(on, on.model.policy_path), make_plan(off, off.model.policy_path)
    acts = lambda p: p.learner["activations, text"] + p.learner["activations, vision"]  # noqa: E731
    assert acts(p_off) > 5 * acts(p_on)
    assert p_on.other["activations, other checkpointing setting"] == pytest.approx(acts(p_off))


def test_measured_storage_speed_feeds_the_checkpoint_time(tmp_path):
    from cluster.plan import measure_storage

    speed = measure_storage(tmp_path, n_bytes=16 << 20)
    assert speed > 0 and list(tmp_path.iterdir()) == []  # the probe file is gone
    cfg = recipe("segzero_7b")
    plan = make_plan(cfg, cfg.model.policy_path, storage_gbps=speed)
    assert plan.other["checkpoint seconds"] == pytest.approx(99.51e9 / 4 / (speed * GB), rel=1e-3)


def test_cli_exits_nonzero_on_an_impossible_plan():
    proc = subprocess.run([sys.executable, "-m", "cluster.plan", "--config", "configs/segzero_7b.yaml",
                           "--gpus-per-node", "8", "cluster.rollout_workers=5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "PROBLEM: the actors reserve 9 GPUs" in proc.stdout and "plan: cannot run" in proc.stdout


def test_launch_stops_before_any_actor_on_an_impossible_plan(tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "rollout.max_model_len=100", f"train.output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "the job cannot run as configured" in proc.stderr and "no prompt fits" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr  # stopped before Ray


def state_bytes(learner) -> int:
    """Bytes of every distinct tensor storage the learner holds for training: the module's parameters and
    gradients, and everything the DeepSpeed optimizer keeps (fp32 partitions, their gradients, Adam)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            if t.grad is not None:
                add(t.grad)

    def walk(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            add(obj)
        elif depth < 4 and isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)

    for p in learner.model.parameters():
        add(p.data)
    walk(vars(learner.engine.optimizer))
    walk(learner.engine.optimizer.optimizer.state)
    return total


@pytest.mark.parametrize("stage", [2, 3])
def test_plan_numbers_match_the_tiny_policy(stage, tmp_path):
    from learner.learner import Learner
    from policy.tiny import build_tiny_policy
    from tests.test_learner import make_samples
    from trajectory import LearnerBatch

    policy = str(build_tiny_policy(tmp_path / "policy"))
    cfg = load_config(None, [f"learner.zero_stage={stage}", "learner.kl_coef=0", "learner.freeze_vision=false",
                             "learner.zero3_param_persistence_threshold=0", "learner.micro_batch_size=2"])
    plan = make_plan(cfg, policy)
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    learner = Learner(cfg, policy, master_port=port)
    learner.train_step(LearnerBatch(make_samples(2, seed=1)))  # the optimizer's states exist after a step

    assert plan.other["params"] == sum(getattr(p, "ds_numel", p.numel()) for p in learner.model.parameters())
    sync = sum(t.numel() * t.element_size() for bucket in learner.weight_buckets(1 << 20) for _, t in bucket)
    assert plan.other["sync bytes"] == sync
    # + DeepSpeed's small communication buffers (measured +2% on the tiny policy under ZeRO-2)
    assert state_bytes(learner) == pytest.approx(plan.learner["model states"], rel=0.05)
    learner.save_checkpoint(tmp_path / "ckpt")
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tmp_path / "ckpt") for f in files)
    assert on_disk == pytest.approx(plan.other["checkpoint bytes"], rel=0.05)  # + pickle and client state
