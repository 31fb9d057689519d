"""Does the default learn, on every seed? Runs ``python launch.py`` once per seed (the embedded default,
or with overrides), and optionally the SFT baseline of each seed, and prints the README's learning table.

    python benchmarks/learning.py --seeds 10-17 [--parallel 2] [--sft-baseline] [--out runs/learning] [overrides ...]

Per seed: held-out gIoU (segzero convention, greedy answers, GrabCut masks) with its standard error
after the warm start (step 0), at its best evaluation and after the last GRPO step, and the held-out
reward. ``--sft-baseline``: the same seed's warm start given the GRPO phase's wall time as extra
supervised steps instead (extra steps = GRPO wall time / warm-start step time, measured in the seed's
own GRPO run), one GRPO step, scored at step 0: what the same compute buys without RL. Runs already in
--out are read, not rerun. Prints numbers only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def seeds_of(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out += list(range(int(low), int(high or low) + 1))
    return out


def run(out: Path, seed: int, overrides: list[str]) -> Path:
    """``python launch.py`` for one seed into ``out`` (skipped when its MLflow run is complete)."""
    if (out / "final_policy" / "config.json").exists() or (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "launch.py", f"train.seed={seed}", f"train.output_dir={out}", "tracking.log_model=false",
           "tracking.system_metrics=false", *overrides]
    with open(out / "launch.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"seed {seed}: launch.py exited {rc}; see {out / 'launch.log'}")
    (out / "done").write_text("")
    return out


def history(out: Path) -> dict:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run_ = client.search_runs([client.get_experiment_by_name("seg-grpo").experiment_id])[0]
    return {key: dict(sorted((m.step, m.value) for m in client.get_metric_history(run_.info.run_id, key)))
            for key in run_.data.metrics}


def warm_start_seconds_per_step(out: Path) -> float:
    """From the warm start's progress bar in the seed's log: wall seconds / steps."""
    text = (out / "launch.log").read_text(errors="replace")
    found = re.findall(r"warm start: 100%\|[^|]*\| (\d+)/\d+ \[(\d+):(\d+)", text)
    steps, minutes, seconds = (int(v) for v in found[-1])
    return (60 * minutes + seconds) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="10-17", help="e.g. 10-17 or 0,3,5")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (2 cores: 2)")
    p.add_argument("--sft-baseline", action="store_true", help="also the SFT baseline of each seed")
    p.add_argument("--out", default="runs/learning")
    p.add_argument("overrides", nargs="*", help="section.field=value for every run")
    args = p.parse_args(argv)
    seeds, root = seeds_of(args.seeds), Path(args.out).resolve()

    with ThreadPoolExecutor(args.parallel) as pool:
        grpo = dict(zip(seeds, pool.map(lambda s: run(root / f"grpo_s{s}", s, args.overrides), seeds)))
    sft = {}
    if args.sft_baseline:
        from config import load_config

        cfg = load_config(None, args.overrides)

        def baseline(seed):
            h = history(grpo[seed])
            extra = round(sum(h["time/step"].values()) / warm_start_seconds_per_step(grpo[seed]))
            return run(root / f"sft_s{seed}", seed, [*args.overrides, f"train.sft_steps={cfg.train.sft_steps + extra}",
                                                     "train.steps=1", "eval.every_n_steps=0"])
        with ThreadPoolExecutor(args.parallel) as pool:
            sft = dict(zip(seeds, pool.map(baseline, seeds)))

    rows, gains, finals, bests, baselines = [], [], [], [], []
    for seed in seeds:
        h = history(grpo[seed])
        g, se, reward = h["eval/giou_segzero"], h.get("eval/giou_segzero_se", {}), h["eval/reward"]
        first, last = min(g), max(g)
        best = max(g, key=g.get)
        gains.append(g[last] - g[first])
        finals.append(g[last])
        bests.append(g[best])
        cell = lambda step: f"{g[step]:.3f} +- {se.get(step, float('nan')):.3f}"  # noqa: E731
        sft_cell = ""
        if sft:
            s = history(sft[seed])
            baselines.append(s['eval/giou_segzero'][0])
            sft_cell = f" | {baselines[-1]:.3f} +- {s['eval/giou_segzero_se'][0]:.3f}"
        rows.append(f"| {seed} | {cell(first)} | {cell(last)} ({g[last] - g[first]:+.3f}) | {cell(best)} "
                    f"at step {best} "
                    f"| {reward[first]:.2f} -> {reward[last]:.2f}{sft_cell} |")
    head = "| seed | warm start (step 0) | after GRPO (gain) | best evaluation | held-out reward |"
    if sft:
        head += " SFT baseline, same wall time |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    print("\n".join(rows))
    n = len(seeds)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    sd = lambda v: (sum((x - mean(v)) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else float("nan")  # noqa: E731
    print(f"\n{n} seeds: gain {mean(gains):+.3f} +- {sd(gains):.3f} (sd over seeds), min {min(gains):+.3f}; "
          f"final gIoU {mean(finals):.3f}, best {mean(bests):.3f}; seeds with gain >= 0.10: "
          f"{sum(x >= 0.10 for x in gains)}/{n}")
    if baselines:
        print(f"SFT baseline gIoU {mean(baselines):.3f}; GRPO's final above it on "
              f"{sum(f > b for f, b in zip(finals, baselines))}/{n} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
