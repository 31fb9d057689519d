"""Does the default learn, on every seed? Runs ``python launch.py`` once per seed (the embedded default,
or with overrides), and optionally the SFT baseline of each seed, and prints the README's learning table.

    python benchmarks/learning.py --seeds 10-17 [--parallel 2] [--sft-baseline] [--out runs/learning] [overrides ...]

Per seed, on the test split (eval/*) and the OOD split (ood/*): gIoU (segzero convention, greedy
answers, GrabCut masks) with its standard error after the warm start (step 0), after the last GRPO step,
and of the policy selected on the validation split (the first evaluation with the highest val/* gIoU:
selection never sees the reported splits); then per split the paired differences over seeds (GRPO -
warm start, GRPO - SFT) with their 95% confidence intervals. ``--sft-baseline``: the same seed's warm
start given the GRPO phase's wall time as extra supervised steps instead (extra steps = GRPO wall time /
warm-start step time, measured in the seed's own GRPO run), one GRPO step, scored at step 0: what the
same compute buys without RL. Runs already in --out are read, not rerun. Prints numbers only; nothing is asserted.
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

    # Per seed and reported split (test = eval/*, OOD = ood/*): warm start, SFT with the same wall time,
    # GRPO's last evaluation, and GRPO's policy selected on the validation split (its test/OOD numbers).
    columns = {"warm": [], "sft": [], "final": [], "best_on_val": []}
    table = {split: {k: [] for k in columns} for split in ("eval", "ood")}
    rows = []
    for seed in seeds:
        h = history(grpo[seed])
        val = h["val/giou_segzero"]
        first, last, best = min(val), max(val), max(val, key=val.get)  # the first step of the highest val gIoU
        cells = [str(seed), str(best)]
        for split, cols in table.items():
            g, se = h[f"{split}/giou_segzero"], h.get(f"{split}/giou_segzero_se", {})
            cols["warm"].append(g[first])
            cols["final"].append(g[last])
            cols["best_on_val"].append(g[best])
            picked = [(g[first], se.get(first)), (g[last], se.get(last)), (g[best], se.get(best))]
            if sft:
                s_ = history(sft[seed])
                cols["sft"].append(s_[f"{split}/giou_segzero"][0])
                picked.insert(1, (cols["sft"][-1], s_.get(f"{split}/giou_segzero_se", {}).get(0)))
            cells += [f"{v:.3f} +- {e if e is not None else float('nan'):.3f}" for v, e in picked]
        rows.append("| " + " | ".join(cells) + " |")
    names = ["warm start", *(["SFT, same wall time"] if sft else []), "GRPO final", "GRPO best on val"]
    head = "| seed | best step (val) | " + " | ".join(f"{split} {n}" for split in ("test", "OOD") for n in names) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    print("\n".join(rows))
    n = len(seeds)
    print(f"\n{n} seeds, mean gIoU (a paired difference: mean, 95% confidence interval over seeds)")
    for split, cols in table.items():
        label = "test" if split == "eval" else "OOD"
        print(f"{label}: " + ", ".join(f"{k} {mean(v):.3f}" for k, v in cols.items() if v))
        pairs = [("GRPO final - warm start", cols["final"], cols["warm"])]
        if sft:
            pairs += [("GRPO final - SFT", cols["final"], cols["sft"]),
                      ("GRPO best on val - SFT", cols["best_on_val"], cols["sft"])]
        for name, a, b in pairs:
            diff = [x - y for x, y in zip(a, b)]
            low, high = confidence_interval(diff)
            print(f"  {label} {name}: {mean(diff):+.3f} [{low:+.3f}, {high:+.3f}], above 0 on "
                  f"{sum(d > 0 for d in diff)}/{n} seeds")
    return 0


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean (nan for fewer than two values)."""
    from scipy import stats

    if len(values) < 2:
        return float("nan"), float("nan")
    m, se = mean(values), stats.sem(values)
    half = se * stats.t.ppf((1 + level) / 2, len(values) - 1)
    return m - half, m + half


if __name__ == "__main__":
    sys.exit(main())
