"""Where a GRPO step's time goes in the default run (configs/default.yaml): generation, reward (and how
much of it overlapped generation), learner, weight sync, driver; idle time per pool; samples/s, tokens/s.

    python benchmarks/step_time.py [--steps 5] [--warmup 1] [--policy random|memorised] [--sft-steps N]
                                   [--baseline REV] [section.field=value ...]

It runs the real job, `python launch.py` (local Ray, vLLM rollout worker, reward pool, DeepSpeed learner),
in a temporary directory with the MLflow store there, and reads back the per-step metrics launch.py logs
(time/*, perf/*, pool/*); nothing is re-instrumented. Evaluation, the policy export and the 120-step
warm start (4+ minutes here) are off, so the policy is the untrained tiny one (--policy random): its
answers do not parse, and the reward pool only applies the format rules. In the default config that
is close to a trained run anyway: GrabCut on 112-px images costs ~5 ms per parsed answer. For the
reward work of a trained policy, --policy memorised first fine-tunes the tiny policy (plain
transformers, ~150 steps on one sequence: 1-2 minutes on two free cores) to reproduce one reference
answer, so every answer parses and is segmented; combine it with a costlier segmenter, e.g.
`reward.segmenter=sam2 reward.sam2_allow_random_weights=true` (SAM2 tiny; random weights cost the
same as real ones). --sft-steps N: launch.py's own warm start instead.
The first --warmup GRPO steps (engine warm-up) are left out of the means. The learner's own phases
(time/learner/*: collate, vision, reference, forward, loss, backward, optimizer) are printed below.
--baseline REV runs the same job again from git revision REV (e.g. a release to compare against),
one run after the other, and prints the ratio of the mean step times.

Derived rows (all from logged metrics, per step):
    reward span   = batch/sequences / pool/reward_samples_per_s   (first dispatch -> last score; an upper
                                                                   bound on scoring time: it includes gaps)
    overlapped    = reward span - time/reward_tail                 (the span during generation)
    driver/other  = time/step - generate - reward_tail - learner - sync
    idle of a pool = time/step - its busy time                     (generate / reward span / learner; for the
                                                                   reward pool a lower bound)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Numbers from a 2-core machine shared with other jobs are noisy (2-3x swings between runs): "
         "compare only numbers printed by one run.")


def memorised_policy(work: Path, config: str | None = None) -> Path:
    """The config's tiny policy fine-tuned (plain transformers) until it reproduces one synthetic
    sample's reference answer: its sampled answers then parse, whatever the image."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, str(REPO))
    from config import load_config
    from data.dataset import ParquetSource
    from data.synthetic import write_synthetic
    from policy.prompt import chat_prompt
    from policy.tiny import build_tiny_policy

    m = load_config(config).model
    size = m.image_size
    path = build_tiny_policy(work / "memorised_policy", image_size=size, hidden_size=m.tiny_hidden_size,
                             layers=m.tiny_layers, heads=m.tiny_heads, vision_hidden_size=m.tiny_vision_hidden_size,
                             vision_layers=m.tiny_vision_layers)
    sample = next(ParquetSource(write_synthetic(work / "one.parquet", 1, size), shuffle=False).iter_epoch())
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    prompt = processor(text=[chat_prompt(sample.problem)], images=[sample.model_image(size)], return_tensors="pt")
    answer = processor.tokenizer(sample.reference_answer(size) + "<|im_end|>", add_special_tokens=False,
                                 return_tensors="pt").input_ids
    inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], answer], 1),
                  attention_mask=torch.ones(1, prompt["input_ids"].shape[1] + answer.shape[1], dtype=torch.long))
    if "mm_token_type_ids" in inputs:  # answer tokens are text (keeps Qwen's 3-D positions)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    labels = inputs["input_ids"].clone()
    labels[:, :prompt["input_ids"].shape[1]] = -100  # loss on the answer only
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in tqdm(range(150), desc="memorising one answer", unit="step"):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:  # nats per answer token: sampled answers (temperature 1) are the memorised one
            break
    model.save_pretrained(path)
    print(f"# memorised policy: answer loss {loss.item():.4f} after {time.perf_counter() - start:.0f} s", flush=True)
    return path


def policy_overrides(work: Path, policy: str, sft_steps: int, config: str | None) -> list[str]:
    """launch.py overrides that select the benchmark's policy (see --policy and --sft-steps)."""
    if sft_steps:
        return [f"train.sft_steps={sft_steps}"]
    path = [f"model.policy_path={memorised_policy(work, config)}"] if policy == "memorised" else []
    return [*path, "train.sft_steps=0"]


def run_launch(work: Path, overrides: list[str], name: str, repo: Path = REPO) -> dict[str, list[float]]:
    """Runs `repo`'s launch.py with `overrides` (output and MLflow store under `work`); returns {metric:
    values by step} of its MLflow run. The job's log goes to work/<name>.log (its tail is printed on failure)."""
    out = work / name
    args = [sys.executable, str(repo / "launch.py"), "eval.enabled=false", "tracking.log_model=false",
            f"train.output_dir={out}", f"tracking.mlflow_uri=sqlite:///{work / 'mlflow.db'}",
            f"tracking.run_name={name}", f"cluster.job_name=bench-{name}-{os.getpid()}", *overrides]
    log_path = work / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(args, cwd=repo, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        sys.exit(f"launch.py ({name}) failed with exit code {rc}; last lines of its log:\n" + "\n".join(tail))
    print(f"# {name}: launch.py finished in {time.perf_counter() - start:.0f} s (start-up included); machine load "
          f"average over the last minute {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    return read_metrics(f"sqlite:///{work / 'mlflow.db'}", name)


def read_metrics(uri: str, run_name: str) -> dict[str, list[float]]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{run_name}'")
    run = runs[0]
    out = {}
    for key in run.data.metrics:
        if not key.startswith("system/"):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            out[key] = [m.value for m in history if m.step > 0]  # step 0: the evaluation before GRPO
    return out


def measured(metrics: dict[str, list[float]], warmup: int, drop_last: bool = False) -> dict[str, list[float]]:
    """Per-step values without the first `warmup` steps (and the last, when asked)."""
    end = -1 if drop_last else None
    return {k: v[warmup:end] for k, v in metrics.items() if len(v[warmup:end])}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def breakdown(m: dict[str, list[float]]) -> list[tuple[str, float]]:
    """(row, mean seconds per step) rows of the table; see the module docstring for the derived rows."""
    steps = m["time/step"]
    busy_reward = [n / r if r > 0 else 0.0 for n, r in zip(m["batch/sequences"], m["pool/reward_samples_per_s"])]
    stages = ("time/generate", "time/reward_tail", "time/learner", "time/sync")
    other = [s - sum(m[k][i] for k in stages) for i, s in enumerate(steps)]
    overlapped = [max(0.0, b - t) for b, t in zip(busy_reward, m["time/reward_tail"])]
    rows = [("step (wall)", mean(steps)),
            ("  generation (rollout pool)", mean(m["time/generate"])),
            ("  reward after generation (tail)", mean(m["time/reward_tail"])),
            ("  learner (GRPO update)", mean(m["time/learner"])),
            ("  weight sync", mean(m["time/sync"])),
            ("  driver/other", mean(other)),
            ("reward span (first dispatch -> last score)", mean(busy_reward)),
            ("  of which during generation", mean(overlapped)),
            ("idle: rollout pool", mean([s - g for s, g in zip(steps, m["time/generate"])])),
            ("idle: reward pool (at least)", mean([s - b for s, b in zip(steps, busy_reward)])),
            ("idle: learner", mean([s - learner for s, learner in zip(steps, m["time/learner"])]))]
    # Idle metrics, should launch.py log its own (any name with "idle"), are shown as logged.
    rows += [(f"logged {k}", mean(v)) for k, v in sorted(m.items()) if "idle" in k]
    return rows


def print_breakdown(m: dict[str, list[float]], title: str) -> None:
    step = mean(m["time/step"])
    print(f"\n{title} ({len(m['time/step'])} steps measured)")
    rows = breakdown(m)
    if max(m["rollout/staleness"]) > 0:
        print("(off-policy: a step's generation and scoring started during the previous step, so the stage "
              "rows overlap and do not add up; derived rows left out)")
        rows = rows[:5]
    print(f"{'':<46}{'s/step':>9}{'share':>8}")
    for name, value in rows:
        print(f"{name:<46}{value:>9.3f}{value / step:>8.1%}")
    print(f"{'samples/s (perf/samples_per_s)':<46}{mean(m['perf/samples_per_s']):>9.2f}")
    print(f"{'tokens/s (perf/tokens_per_s, trained tokens)':<46}{mean(m['perf/tokens_per_s']):>9.1f}")
    print(f"{'reward pool samples/s over its span':<46}{mean(m['pool/reward_samples_per_s']):>9.1f}")
    print(f"{'response length (tokens)':<46}{mean(m['response/length_mean']):>9.1f}")
    print(f"{'reward/answer_format (share of answers parsed)':<46}{mean(m['reward/answer_format']):>9.3f}")
    print(f"{'reward/total':<46}{mean(m['reward/total']):>9.3f}")


def add_run_args(p: argparse.ArgumentParser, steps_help: str, sft_help: str) -> None:
    """The options every launch.py-driven benchmark takes (this one and pipelining.py)."""
    p.add_argument("--steps", type=int, default=5, help=steps_help)
    p.add_argument("--warmup", type=int, default=1, help="first GRPO steps left out of the means")
    p.add_argument("--policy", choices=["random", "memorised"], default="random",
                   help="random: the untrained tiny policy (default); memorised: answers parse and are segmented")
    p.add_argument("--sft-steps", type=int, default=0, help=sft_help)


def checkout(rev: str, into: Path) -> Path:
    """`rev` of this repository as a plain directory (git archive: no worktree metadata left behind)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def print_phases(m: dict[str, list[float]]) -> None:
    """The learner's own phase breakdown (time/learner/<phase>, logged by learner.learner)."""
    phases = sorted(k for k in m if k.startswith("time/learner/"))
    if phases:
        learner = mean(m["time/learner"])
        print(f"{'learner phases (slowest rank)':<46}{'s/step':>9}{'of learner':>11}")
        for k in phases:
            print(f"{'  ' + k.removeprefix('time/learner/'):<46}{mean(m[k]):>9.3f}{mean(m[k]) / learner:>11.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Extra section.field=value arguments go to launch.py.")
    add_run_args(p, "GRPO steps (default 5)", "launch.py's warm start instead (default 0: off)")
    p.add_argument("--config", default=None, help="YAML config (default configs/default.yaml)")
    p.add_argument("--baseline", metavar="REV", help="also run the same job from git revision REV (checked out "
                   "into the temporary directory), right after this tree's, and print the step time ratio")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    print(f"# {NOISE}")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_step_time_") as tmp:
        work = Path(tmp)
        policy = policy_overrides(work, args.policy, args.sft_steps, args.config)
        config = [f"--config={args.config}"] if args.config else []
        overrides = [*config, *policy, f"train.steps={args.steps}", *args.overrides]
        runs["this tree"] = run_launch(work, overrides, "default")
        if args.baseline:
            runs[f"baseline {args.baseline}"] = run_launch(work, overrides, "baseline",
                                                           checkout(args.baseline, work / "baseline_repo"))
    policy = f"{args.sft_steps} warm-start steps" if args.sft_steps else f"{args.policy} policy"
    for name, metrics in runs.items():
        m = measured(metrics, args.warmup)
        print_breakdown(m, f"{name}: default run, {policy}, GRPO steps {args.warmup + 1}..{args.steps}")
        print_phases(m)
    if args.baseline:
        ours, base = (mean(measured(m, args.warmup)["time/step"]) for m in runs.values())
        print(f"\nstep time, this tree / baseline {args.baseline}: {ours:.3f} / {base:.3f} s = {ours / base:.2f}x")


if __name__ == "__main__":
    main()
