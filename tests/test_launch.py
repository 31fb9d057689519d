"""End to end: `python launch.py` with every real engine (Ray, vLLM CPU, DeepSpeed, reward pool, MLflow),
a job killed right after a checkpoint that resumes exactly where it stopped, and a job whose learner
process is killed in its warm start, mid-step and in its final export, and that restarts its learner
group by itself each time. One-step off-policy, so the checkpoint also holds the round already generated
for the next step; the 14 training rows end exactly at the step-2 checkpoint (8 warm-start rows, then
2 per round: steps 1-3), so the resumed job's next round is the first of a new epoch."""
import json
import signal
import subprocess
import sys

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from config import REPO

pytestmark = pytest.mark.slow

PER_STEP = ["reward/total", "reward/think_format", "reward/answer_format", "reward/bbox_iou",
            "reward/mask_iou", "adv/mean", "adv/std", "loss", "kl", "clip_frac", "logprob_drift",
            "response/length_mean", "time/generate", "time/reward_tail", "time/learner", "time/sync",
            "time/step", "perf/samples_per_s", "weight_version", "batch/ids_crc", "sync/parity_max_diff"]
STEPS = 4
ARGS = [f"train.steps={STEPS}", "train.sft_steps=2", "train.sft_batch_size=4", "train.checkpoint_every=1",
        "train.keep_checkpoints=3", "eval.every_n_steps=2",
        "data.synthetic_train_size=14", "data.synthetic_eval_size=8", "eval.num_samples=8",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=24", "rollout.off_policy=true",
        "tracking.system_metrics=false", "cluster.sync_parity_check=true",
        # Steps large enough to change the greedy answers of the 8 evaluation rows between evaluations (the
        # default's 20-step warm-up would keep these 4 steps under 3e-5: the same gIoU at every evaluation).
        # At this rate the answers usually stop parsing after a step or two, so the best is often step 0:
        # the rule itself (the first evaluation with the highest gIoU, wherever it lies) is
        # tests/test_operations_units.py; here, that the job applies it and exports those weights.
        "learner.lr=1e-3", "learner.warmup_steps=0"]


@pytest.fixture(scope="module")
def launch(warm_policy):
    """The command line of the job: it starts from the warm-started tiny policy (tests/conftest.py), so its
    evaluations score answers that parse and the best policy is chosen among different gIoUs."""
    policy = warm_policy("segzero")
    return lambda out, *extra: [sys.executable, "launch.py", *extra, *ARGS, f"train.output_dir={out}",
                                f"model.policy_path={policy}"]


def history(out):
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("seg-grpo").experiment_id])
    assert len(runs) == 1  # a resumed job continues its run
    run = runs[0]
    return run, lambda name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}


def test_full_run_then_kill_and_resume_reproduces_it(tmp_path, launch):
    # 1. An uninterrupted run: every metric at every step, checkpoints, the final policy in MLflow.
    full = tmp_path / "full"
    proc = subprocess.run(launch(full), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run, metric = history(full)
    assert run.data.params["rollout.group_size"] == "2"
    assert run.info.run_name == "default-seed0"  # the config file's name and the seed
    # vLLM's expected per-sync warnings are filtered at their logger, with one line saying so.
    mentions = [line for line in proc.stderr.splitlines() if "Failed to load weights" in line]
    assert len(mentions) == 1 and "filtering expected engine warnings" in mentions[0], mentions
    for name in PER_STEP:
        assert sorted(metric(name)) == list(range(1, STEPS + 1)), name
    assert list(metric("weight_version").values()) == [2.0 + s for s in range(1, STEPS + 1)]  # 2 warm-start steps
    assert list(metric("rollout/staleness").values()) == [0.0] + [1.0] * (STEPS - 1)  # one-step off-policy
    for split in ("val", "eval", "ood"):  # every held-out split at every evaluation
        assert sorted(metric(f"{split}/giou_segzero")) == [0, 2, STEPS], split
    # After every sync vLLM served the learner's weights: same logprobs on the probe (fp32: ~1e-6).
    assert max(metric("sync/parity_max_diff").values()) < 1e-3
    assert (full / "final_policy" / "config.json").exists()
    # A checkpoint every step, the newest train.keep_checkpoints kept.
    kept = sorted(p.name for p in (full / "checkpoints" / run.info.run_id).glob("step_*"))
    assert kept == [f"step_{s:06d}" for s in range(STEPS - 2, STEPS + 1)], kept
    # The best evaluation's policy on the validation split is kept beside it (step 0 = the warm start
    # counts too): the first evaluation with the highest val gIoU, its weights (the warm-started ones when
    # that is step 0), and the test and OOD gIoU of that step beside it.
    best = json.loads((full / "best_policy" / "best.json").read_text())
    giou = metric("val/giou_segzero")
    assert 0 < max(giou.values()) and len(set(giou.values())) > 1, giou  # a real choice between evaluations
    assert (best["step"] == min(s for s, v in giou.items() if v == max(giou.values()))
            and best["giou"] == giou[best["step"]])
    assert (best["eval_giou"], best["ood_giou"]) == (metric("eval/giou_segzero")[best["step"]],
                                                     metric("ood/giou_segzero")[best["step"]])
    assert (full / "best_policy" / "config.json").exists() and metric("best/step")[STEPS] == best["step"]
    kept, warm = (load_file(full / name / "model.safetensors") for name in ("best_policy", "warm_start_policy"))
    assert all(torch.equal(kept[k], warm[k]) for k in kept) == (best["step"] == 0)
    # GRPO's KL reference is the warm-started policy (exported), so the first step's KL is 0, not the
    # distance back to the random initial weights.
    assert (full / "warm_start_policy" / "config.json").exists()
    assert abs(metric("kl")[1]) < 1e-6
    client = mlflow.MlflowClient(f"sqlite:///{full / 'mlflow.db'}")
    assert "final_policy/config.json" in [a.path for a in client.list_artifacts(run.info.run_id, "final_policy")]
    # In a fresh process: one vLLM engine per process (a second in-process engine in the same pytest
    # process changes the numerics of later engines).
    code = "import sys; from tests.test_launch import assert_export_serves_same_logprobs as check; check(*sys.argv[1:])"
    check = subprocess.run([sys.executable, "-c", code, str(full / "final_policy"),
                            str(full / "data" / "test.parquet")],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr[-3000:]

    # 2. The same job, killed (SIGKILL, the whole process group) as soon as its step-2 checkpoint is
    # complete, then resumed. The kill landed mid-run: the signal ended it, before any final policy.
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-m", "tests.crash_after_checkpoint", "2", *launch(cut)[2:]], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL
    assert not (cut / "final_policy").exists()
    assert (cut / "checkpoints" / "latest").read_text().endswith("/step_000002")
    proc = subprocess.run(launch(cut, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr

    # Steps 3..n saw the same prompts and produced the same rewards and parameters as the uninterrupted run
    # (step 3 trains the off-policy round generated before the kill, stored with the checkpoint; step 4's
    # round is the first of the next epoch: no row skipped or repeated at the boundary).
    _, resumed = history(cut)
    for name in ("batch/ids_crc", "reward/total", "loss", "kl", "weight_version", "rollout/staleness"):
        for step in range(3, STEPS + 1):
            assert resumed(name)[step] == pytest.approx(metric(name)[step], abs=1e-6), (name, step)
    a = load_file(full / "final_policy" / "model.safetensors")
    b = load_file(cut / "final_policy" / "model.safetensors")
    assert a.keys() == b.keys()
    # Same computation on the same CPU: differences only from float summation order (none expected).
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # 3. The same job with learner rank 0 SIGKILLed three times: in its first warm-start step (no checkpoint
    # yet: the group starts again from the initial policy, the data stream from its start), at step 3
    # mid-step (its rollouts and rewards done, its update being sent: back to the step-2 checkpoint, step
    # 3 redone) and in the final export (back to the last checkpoint, the end redone). The job restarts the
    # learner group by itself each time, in the same MLflow run, and ends with the parameters of the run
    # resumed by hand above.
    relearn = tmp_path / "relearn"
    proc = subprocess.run([sys.executable, "-m", "tests.kill_learner_at_step", "sft1,grpo3,export",
                           *launch(relearn, "cluster.max_learner_restarts=3")[2:]], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("killed learner rank 0") == 3 and "restarting the learner group" in proc.stderr
    _, relearned = history(relearn)
    assert relearned("cluster/learner_restart") == {0: 1.0, 3: 2.0, STEPS: 3.0}
    assert sorted(relearned("reward/total")) == list(range(1, STEPS + 1))
    c = load_file(relearn / "final_policy" / "model.safetensors")
    assert max((b[k] - c[k]).abs().max().item() for k in b) < 1e-5


def assert_export_serves_same_logprobs(export: str, split: str) -> None:
    """The exported HF directory loads in vLLM and in transformers and both give the same logprobs for
    a fixed answer (transformers on these weights = the learner's logprobs, tests/test_learner.py)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from config import load_config
    from data.dataset import ParquetSource
    from policy.prompt import chat_prompt
    from rollout.worker import RolloutWorker

    sample = next(ParquetSource(split, shuffle=False).iter_epoch())
    image = sample.model_image(112)
    processor = AutoProcessor.from_pretrained(export)
    answer = processor.tokenizer(sample.reference_answer(112), add_special_tokens=False).input_ids
    prompt = processor(text=[chat_prompt(sample.problem)], images=[image], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    ids = torch.cat([prompt["input_ids"], torch.tensor([answer])], 1)
    inputs = dict(prompt, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                 torch.zeros(1, len(answer), dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, prompt["input_ids"].shape[1] - 1:-1]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(answer)), torch.tensor(answer)].tolist()
    served = RolloutWorker(load_config(), str(export)).probe_logprobs(
        {"problem": sample.problem, "image": image}, answer)
    # fp32 on both sides: ~1e-6 measured; a stale vision tensor gives ~4e-3, a skipped cache reset ~0.3
    assert max(abs(a - b) for a, b in zip(expected, served)) < 2e-4
