"""Speed-up of pipelining vs the plain synchronous loop, side by side in one run of the default job.

    python benchmarks/pipelining.py [--steps 5] [--warmup 1] [--policy random|memorised] [--sft-steps N]
                                    [--repeats 1] [--breakdown] [section.field=value ...]

Three runs of `launch.py` (configs/default.yaml), same policy, same prompts per step:
    sync        rollout.stream_rewards=false   generate everything, then score everything, then train
    stream      (the default)                  each group is scored as soon as it is generated
    off-policy  rollout.off_policy=true        streamed, and step t+1's rollouts run while the learner
                                               trains step t (staleness <= 1 weight version)
The policy is chosen as in benchmarks/step_time.py (default: the untrained tiny policy, whose answers
do not parse; --policy memorised: every answer parses and is segmented; --sft-steps N: launch.py's warm
start, run once and exported). s/step is the mean logged time/step without the first --warmup steps
and without the last step (in off-policy mode the last step has no next step to generate for).
The modes run one after another, so a change in the machine's load between runs shows up as a speed
difference; --repeats N runs the three modes round-robin N times and pools their steps. Streaming can
save at most the scoring time (the sync run's reward tail); the script prints that bound.
Extra arguments go to every run. The default config's reward is cheap (GrabCut on 112-px images, ~5 ms
per parsed answer); the costly-reward case: `--policy memorised reward.segmenter=sam2
reward.sam2_allow_random_weights=true` (SAM2 tiny; random weights cost the same as real ones).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import NOISE, add_run_args, mean, measured, policy_overrides, print_breakdown, run_launch  # noqa: E402

MODES = {"sync": ["rollout.stream_rewards=false"], "stream": [], "off-policy": ["rollout.off_policy=true"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Extra section.field=value arguments go to every launch.py run.")
    add_run_args(p, "GRPO steps per mode (default 5)", "launch.py's warm start, run once before the modes")
    p.add_argument("--repeats", type=int, default=1, help="run the three modes round-robin this many times")
    p.add_argument("--breakdown", action="store_true", help="also print each mode's step-time breakdown")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.steps < args.warmup + 2:
        p.error("--steps must be at least --warmup + 2 (the last step is left out too)")
    print(f"# {NOISE}")
    results = {mode: {} for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench_pipelining_") as tmp:
        work = Path(tmp)
        if args.sft_steps:  # warm start once, exported; every mode starts from it
            run_launch(work, [f"train.sft_steps={args.sft_steps}", "train.steps=1", "tracking.log_model=true",
                              *args.overrides], "warm_start")
            policy = [f"model.policy_path={work / 'warm_start' / 'final_policy'}", "train.sft_steps=0"]
        else:
            policy = policy_overrides(work, args.policy, 0, None)
        for repeat in range(args.repeats):
            for mode, switch in MODES.items():
                metrics = run_launch(work, [*policy, f"train.steps={args.steps}", *switch, *args.overrides],
                                     f"{mode}-{repeat}")
                for key, values in measured(metrics, args.warmup, drop_last=True).items():
                    results[mode].setdefault(key, []).extend(values)

    if args.breakdown:
        for mode, m in results.items():
            print_breakdown(m, mode)
    base = mean(results["sync"]["time/step"])
    print(f"\n{'mode':<12}{'s/step':>8}{'generate':>10}{'reward tail':>13}{'learner':>9}{'sync':>7}"
          f"{'samples/s':>11}{'staleness':>11}{'speed-up vs sync':>18}")
    for mode, m in results.items():
        s = mean(m["time/step"])
        print(f"{mode:<12}{s:>8.2f}{mean(m['time/generate']):>10.2f}{mean(m['time/reward_tail']):>13.2f}"
              f"{mean(m['time/learner']):>9.2f}{mean(m['time/sync']):>7.2f}{mean(m['perf/samples_per_s']):>11.2f}"
              f"{max(m['rollout/staleness']):>11.0f}{base / s:>17.2f}x")
    scoring = mean(results["sync"]["time/reward_tail"])  # the synchronous loop scores after all generation
    print(f"streaming can save at most the scoring time, {scoring:.2f} s/step ({scoring / base:.1%} of a sync "
          f"step): a bound of {base / (base - scoring):.2f}x; beyond it, sync vs stream differences are load drift")
    print("(time/generate of off-policy mode counts from the round's start during the previous step; "
          f"{len(results['sync']['time/step'])} steps measured per mode; reward/total per mode: "
          + ", ".join(f"{k} {mean(m['reward/total']):.2f}" for k, m in results.items()) + ")")


if __name__ == "__main__":
    main()
