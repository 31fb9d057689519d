"""Completions/s of this system vs TRL's GRPOTrainer on the same GRPO work, on this machine's CPUs.

    pip install --isolated --no-deps trl==1.16.0 accelerate datasets xxhash multiprocess   # benchmark only
    python benchmarks/vs_trl.py [--policies tiny,large] [--steps 3] [--warmup 1] [--prompts 4]
                                [--group 4] [--repeats 3] [--trl-threads 0] [--workdir runs/vs_trl]

TRL is not a dependency of this project: it is imported only inside this benchmark's TRL child process,
and the line above installs it (and what it imports that the project lacks) without touching the pinned
torch / torchvision / transformers (``--no-deps``). Checked with TRL 1.16.0, accelerate 1.15.0, datasets
5.2.0 on transformers 5.19.0.

What runs, per policy and repeat, one system after the other in fresh processes (never both at once):

  ours  ``python launch.py`` with overrides: the real job (local Ray, one vLLM CPU rollout actor, the
        reward pool, one DeepSpeed ZeRO-2 learner rank, weight sync after every step, MLflow), no warm
        start, no evaluation, no model export. Step times are read back from its MLflow store.
  trl   ``trl.GRPOTrainer`` in one process: transformers ``generate`` for the rollouts (use_vllm=False:
        TRL's vLLM modes need a CUDA GPU, "colocate" or a ``trl vllm-serve`` server, which is a GPU
        process too), the same reward as a reward function, its own loss and AdamW step.

The same work on both sides:
  - policy: the same HF directory (``policy.tiny.build_tiny_policy``), fp32 (bf16/fp16 off);
    tiny = its defaults (hidden 128, 2 layers, 2 heads), large = hidden 512, 8 layers, 8 heads
    (head_dim 64, the smallest vLLM's CPU attention accepts);
  - prompts: the synthetic set launch.py would write (``data.synthetic.write_synthetic``), served in the
    order of ``data.dataset.ParquetSource`` with the job's seed, B prompts per step, each as the Seg-Zero
    chat prompt with its image at model size (TRL renders the same text through the policy's chat
    template; the child checks token-for-token equality with ``policy.prompt.chat_prompt``). The ids of
    every step's prompts are compared between the two runs (ours logs ``batch/ids_crc``);
  - G answers per prompt at the temperature of configs/default.yaml, from the full distribution (top_p 1,
    top_k 0 on both sides; our config refuses truncated sampling);
  - the same trained parameters: with learner.freeze_vision (default.yaml) the vision tower is frozen on
    both sides (TRL gets the model with the tower's requires_grad off); the counts are compared;
  - completion length exactly L tokens on both sides (tiny: L = rollout.max_new_tokens of
    configs/default.yaml = 96; large: 256). A random policy stops at a random length (<|im_end|> is one of
    ~1,300 tokens), so the token count per step, hence the cost, would differ by chance between the two
    runs. Forcing the length (vLLM ``min_tokens = max_tokens`` via ``rollout.min_new_tokens``; HF
    ``min_new_tokens = max_new_tokens``, both suppress the end tokens until L) makes both generate and
    train on exactly B*G*L completion tokens per step; the logged lengths are checked;
  - reward: this project's ``reward.worker.RewardWorker`` with the default config (Seg-Zero rule terms +
    GrabCut mask IoU), one ``score_group`` per prompt; in TRL it is the reward function. A random policy
    almost never writes a parseable answer, so the segmenter rarely runs: reward cost is small on both
    sides (reported: ours' reward time after the last group was generated);
  - GRPO: group std-normalised advantages, clip 0.2, KL k3 to the frozen reference with coef
    learner.kl_coef (TRL beta), token-mean loss (TRL loss_type="dapo"), lr learner.lr constant, AdamW
    weight decay 0.01, grad clip 1.0, no gradient checkpointing (TRL defaults to it; our default is off),
    one optimizer update per batch of B*G completions (TRL: per_device_train_batch_size = our
    learner.micro_batch_size, gradient_accumulation_steps = steps_per_generation = B*G / that, so one
    generation of B*G completions feeds one optimizer step, in the same micro-batches as our learner).

Measured: completions/s = steps * B * G / wall seconds of the timed steps. The first ``--warmup`` steps
are not timed (lazy inits, allocator warm-up). Wall of a step = time between the end of the previous
step and the end of this one, everything included (ours: rollout, reward, learner, weight sync, MLflow
logging; the MLflow metric timestamps. TRL: generation, reward, reference forward, loss, optimizer,
logging; a TrainerCallback's on_step_end). Startup = process start to the first step's start (ours: Ray,
actors, vLLM engine, DeepSpeed; TRL: imports, model and reference load, trainer set-up), reported apart.
Threads: in the synchronous loop each phase of ours has the machine to itself (the random policy's
answers cost the reward pool ~nothing), so the learner updates with one torch thread per core
(cluster.learner_update_threads) and the rollout actor generates with as many (cluster.rollout.torch_threads),
except on the tiny policy, which decodes faster on one (POLICIES).
TRL runs once per entry of ``--trl-threads`` (default "0": torch's default, one thread per core; "1,0"
adds a one-thread run), each against the same run of ours.

On a shared machine timings are noisy: the two systems run back to back per repeat, the order alternates
between repeats, the ratio is reported per repeat, and the summary table gives the median over the
repeats with its spread (min-max). Duration on the 2-core machine: tiny ~4 min per
repeat; large ~20-30 min per repeat (a step is 2-6 min: the learner's fp32 forward/backward over
16 x ~730 tokens dominates on both sides), so e.g. ``--policies large --repeats 1 --first trl`` for a
second large repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POLICIES = {  # build_tiny_policy arguments, the completion length L, and the rollout actor's torch threads
    # (None: one per core). The tiny policy decodes faster on one thread: its ops are so small that a
    # second thread only adds synchronisation (measured: 0.36-0.45 s vs 0.73 s to generate 16 x 96 tokens).
    "tiny": {"policy": {}, "length": None, "rollout_threads": 1},  # None: rollout.max_new_tokens of default.yaml
    "large": {"policy": {"hidden_size": 512, "layers": 8, "heads": 8}, "length": 256, "rollout_threads": None},
}
TRL_INSTALL = "pip install --isolated --no-deps trl==1.16.0 accelerate datasets xxhash multiprocess"


def ids_crc(ids: list[str]) -> int:
    """What launch.py logs as batch/ids_crc for a step's prompt ids."""
    return zlib.crc32(",".join(ids).encode()) % 2**24


def job_config(args, length: int, policy_dir: str, data_path: str, rollout_threads: int | None = None):
    """The job's config (default.yaml + the benchmark's overrides) and the overrides themselves."""
    from config import load_config

    overrides = [
        f"model.policy_path={policy_dir}", f"data.train_path={data_path}",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={length}", f"rollout.min_new_tokens={length}",
        "train.sft_steps=0", f"train.steps={args.warmup + args.steps}", "eval.enabled=false",
        "tracking.log_model=false", "tracking.experiment=vs_trl",
        # generation has the cores to itself here (a random policy's answers cost the reward pool ~nothing),
        # as the update does (cluster.learner_update_threads): one torch thread per core, as TRL's default
        f"cluster.rollout.torch_threads={rollout_threads or os.cpu_count()}",
        f"cluster.learner_update_threads={os.cpu_count()}",
    ] + list(args.ours_overrides)
    return load_config(None, overrides), overrides


def planned_ids(cfg, steps: int) -> list[list[str]]:
    """The prompt ids of each step, in the order launch.py draws them."""
    from data.dataset import ParquetSource

    src = ParquetSource(cfg.data.train_path, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    return [[s.id for s in src.next_batch(cfg.rollout.prompts_per_step)] for _ in range(steps)]


# ------------------------------------------------------------------------------------------- ours
def run_ours(args, cfg, overrides: list[str], out_dir: Path) -> dict:
    """``python launch.py`` as a child; per-step times from its MLflow store."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    cmd = [sys.executable, "launch.py", *overrides, f"train.output_dir={out_dir}", f"tracking.mlflow_uri={uri}"]
    log_path = out_dir / "launch.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    t_spawn = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        raise RuntimeError(f"launch.py failed ({rc}); last lines of {log_path}:\n"
                           + "\n".join(log_path.read_text().splitlines()[-30:]))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("vs_trl")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]

    def history(key):
        return {m.step: m for m in client.get_metric_history(run.info.run_id, key)}

    steps = args.warmup + args.steps
    step_s, ts = history("time/step"), {k: m.timestamp / 1000 for k, m in history("time/step").items()}
    if sorted(step_s) != list(range(1, steps + 1)):
        raise RuntimeError(f"launch.py logged steps {sorted(step_s)}, expected 1..{steps}")
    timed = range(args.warmup + 1, steps + 1)
    means = {}
    for key in ("time/generate", "time/reward_tail", "time/learner", "time/sync", "time/step"):
        h = history(key)
        if h:
            means[key] = sum(h[s].value for s in timed) / len(timed)
    lengths = [(history("response/length_mean")[s].value, history("response/length_max")[s].value)
               for s in range(1, steps + 1)]
    crcs = [int(history("batch/ids_crc")[s].value) for s in range(1, steps + 1)]
    wall = ts[steps] - ts[args.warmup]
    first_start = ts[1] - step_s[1].value
    return {"wall_s": wall, "startup_s": first_start - t_spawn, "warmup_s": ts[args.warmup] - first_start,
            "breakdown": means, "lengths": lengths, "ids_crc": crcs}


# -------------------------------------------------------------------------------------------- TRL
def trl_rows(cfg) -> tuple[list[dict], dict]:
    """The job's prompts in launch.py's order as TRL dataset rows (system + user message, the image at
    model size, the sample id), and the samples by id."""
    from data.dataset import ParquetSource
    from policy.prompt import SYSTEM_PROMPT, question_text

    src = ParquetSource(cfg.data.train_path, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    samples = [s for _ in range(cfg.train.steps) for s in src.next_batch(cfg.rollout.prompts_per_step)]
    rows = [{"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": question_text(s.problem)}],
             "image": s.model_image(cfg.model.image_size), "sample_id": s.id} for s in samples]
    return rows, {s.id: s for s in samples}


def check_trl_prompt(processor, row: dict, problem: str) -> None:
    """The prompt TRL renders (prepare_multimodal_messages puts the image before the user text) must be
    the one our rollout and learner use, token for token."""
    import trl

    from policy.prompt import chat_prompt

    messages = trl.data_utils.prepare_multimodal_messages(row["prompt"], images=[row["image"]])
    theirs = processor.apply_chat_template([messages], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"][0]
    ours = processor(text=[chat_prompt(problem)], images=[row["image"]])["input_ids"][0]
    if list(theirs) != list(ours):
        raise RuntimeError("TRL's rendered prompt differs from policy.prompt.chat_prompt")


def trl_reward(cfg, by_id: dict, seen_ids: list):
    """This project's reward as a TRL reward function: one RewardWorker.score_group per prompt (its G
    answers); the prompt ids of every call are appended to ``seen_ids``."""
    from reward.worker import RewardWorker, reward_group

    worker = RewardWorker(cfg.reward)

    def segzero_reward(completions, sample_id, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        order = list(dict.fromkeys(sample_id))
        seen_ids.append(order)
        totals = [0.0] * len(texts)
        for sid in order:
            idx = [i for i, x in enumerate(sample_id) if x == sid]
            group = reward_group(by_id[sid], [texts[i] for i in idx], cfg.reward.rules, cfg.model.image_size)
            for i, r in zip(idx, worker.score_group(group)):
                totals[i] = r["total"]
        return totals

    return segzero_reward


def trl_config(cfg, out_dir: Path):
    """GRPOConfig doing our learner's work: one optimizer step per B*G completions, in our micro-batches;
    the same sampling (temperature, no truncation), loss, clip, KL, optimizer and schedule."""
    from trl import GRPOConfig

    lc, r = cfg.learner, cfg.rollout
    B, G, L = r.prompts_per_step, r.group_size, r.max_new_tokens
    mbs = lc.micro_batch_size if (B * G) % lc.micro_batch_size == 0 else B * G
    return GRPOConfig(
        output_dir=str(out_dir / "trl_out"), use_cpu=True, bf16=False, fp16=False, seed=cfg.train.seed,
        max_steps=cfg.train.steps, per_device_train_batch_size=mbs, gradient_accumulation_steps=B * G // mbs,
        steps_per_generation=B * G // mbs, num_iterations=1, num_generations=G,
        max_completion_length=L, generation_kwargs={"min_new_tokens": L},
        temperature=r.temperature, top_p=1.0, top_k=0,  # ours samples the full distribution (config refuses top_p)
        learning_rate=lc.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=lc.weight_decay,
        max_grad_norm=lc.grad_clip, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        beta=lc.kl_coef, epsilon=lc.clip_low, epsilon_high=lc.clip_high, loss_type="dapo",
        scale_rewards="group" if lc.adv_scale == "std" else "none", mask_truncated_completions=False,
        gradient_checkpointing=lc.gradient_checkpointing, shuffle_dataset=False,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0)


def trl_child(spec: dict) -> None:
    """Runs in its own process: GRPOTrainer over the same prompts; writes its timings to spec["out"]."""
    t_spawn = spec["t_spawn"]
    try:
        import trl
        from trl import GRPOTrainer
    except ImportError:
        sys.exit(f"TRL is not installed (it is only needed for this benchmark):\n    {TRL_INSTALL}")
    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

    from config import load_config

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = load_config(None, spec["overrides"])
    rows, by_id = trl_rows(cfg)
    processor = AutoProcessor.from_pretrained(cfg.model.policy_path)
    check_trl_prompt(processor, rows[0], by_id[rows[0]["sample_id"]].problem)
    # The parameters ours trains: with learner.freeze_vision the vision tower gets no gradient and no
    # optimizer state on either side (HF's Trainer optimises the parameters that require grad).
    model = AutoModelForImageTextToText.from_pretrained(cfg.model.policy_path, dtype=torch.float32)
    if cfg.learner.freeze_vision:
        model.model.visual.requires_grad_(False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Clock(TrainerCallback):
        def __init__(self):
            self.t_begin, self.t_end, self.logs = None, [], []

        def on_train_begin(self, *a, **k):
            self.t_begin = time.time()

        def on_step_end(self, *a, **k):
            self.t_end.append(time.time())

        def on_log(self, _args, _state, _control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    clock, seen_ids = Clock(), []
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward(cfg, by_id, seen_ids),
                          args=trl_config(cfg, Path(spec["out"]).parent),
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=processor,
                          callbacks=[clock])
    trainer.train()
    warmup = spec["warmup"]
    timed_from = clock.t_end[warmup - 1] if warmup else clock.t_begin
    lengths = [(log.get("completions/mean_length"), log.get("completions/max_length"),
                log.get("completions/min_length")) for log in clock.logs if "completions/mean_length" in log]
    result = {"wall_s": clock.t_end[-1] - timed_from, "startup_s": clock.t_begin - t_spawn,
              "warmup_s": timed_from - clock.t_begin, "lengths": lengths, "trained_params": trained,
              "ids_crc": [ids_crc(ids) for ids in seen_ids], "threads": torch.get_num_threads(),
              "trl_version": trl.__version__, "steps_done": len(clock.t_end)}
    Path(spec["out"]).write_text(json.dumps(result))


def run_trl(args, overrides: list[str], out_dir: Path, threads: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "trl_result.json"
    out.unlink(missing_ok=True)
    spec = {"overrides": overrides, "warmup": args.warmup, "threads": threads, "out": str(out),
            "t_spawn": time.time()}
    log_path = out_dir / "trl.log"
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, __file__, "--trl-child", json.dumps(spec)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0 or not out.exists():
        raise RuntimeError(f"TRL run failed ({rc}); last lines of {log_path}:\n"
                           + "\n".join(log_path.read_text().splitlines()[-30:]))
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------- main
def check_same_work(name: str, length: int, planned: list[list[str]], ours: dict, theirs: dict,
                    trained: int) -> None:
    """Both ran the planned prompts per step, exactly `length` tokens per completion, and trained the
    same parameters."""
    want = [ids_crc(ids) for ids in planned]
    if ours["ids_crc"] != want or theirs["ids_crc"] != want:
        raise RuntimeError(f"{name}: prompts per step differ: planned {want}, ours {ours['ids_crc']}, "
                           f"TRL {theirs['ids_crc']}")
    if any(m != length or mx != length for m, mx in ours["lengths"]):
        raise RuntimeError(f"{name}: our completion lengths {ours['lengths']} != {length}")
    if any(v != length for lengths in theirs["lengths"] for v in lengths):
        raise RuntimeError(f"{name}: TRL completion lengths {theirs['lengths']} != {length}")
    if theirs["trained_params"] != trained:
        raise RuntimeError(f"{name}: TRL trains {theirs['trained_params']} parameters, ours {trained}")


def trained_params(cfg) -> int:
    """The parameters our learner trains (all but the vision tower with learner.freeze_vision)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(cfg.model.policy_path)
    frozen = sum(p.numel() for p in model.model.visual.parameters()) if cfg.learner.freeze_vision else 0
    return sum(p.numel() for p in model.parameters()) - frozen


def run_policy(args, name: str, work: Path, data_path: str) -> list[dict]:
    """Every repeat of ours and of TRL (per thread count) on one policy; one row per (repeat, TRL run)."""
    from config import load_config
    from policy.tiny import build_tiny_policy

    default, spec = load_config(None, []), POLICIES[name]
    length = spec["length"] or default.rollout.max_new_tokens
    policy_dir = str(build_tiny_policy(work / f"policy_{name}", image_size=default.model.image_size,
                                       seed=default.train.seed, **spec["policy"]))
    cfg, overrides = job_config(args, length, policy_dir, data_path, spec["rollout_threads"])
    planned, trained = planned_ids(cfg, args.warmup + args.steps), trained_params(cfg)
    trl_threads = [int(t) for t in args.trl_threads.split(",")]
    completions, rows = args.steps * args.prompts * args.group, []
    for rep in range(args.repeats):
        systems = ["ours"] + [f"trl{t}" for t in trl_threads]
        order = systems if (rep + (args.first == "trl")) % 2 == 0 else systems[1:] + systems[:1]
        got = {}
        for system in order:
            print(f"[{name} repeat {rep + 1}] running {system} ...", flush=True)
            run_dir = work / f"{name}_r{rep + 1}_{system}"
            got[system] = (run_ours(args, cfg, overrides, run_dir) if system == "ours"
                           else run_trl(args, overrides, run_dir, int(system.removeprefix("trl"))))
        for t in trl_threads:
            ours, theirs = got["ours"], got[f"trl{t}"]
            check_same_work(name, length, planned, ours, theirs, trained)
            row = {"policy": name, "repeat": rep + 1, "length": length, "trl_threads": theirs["threads"],
                   "trained_params": trained, "ours": completions / ours["wall_s"],
                   "trl": completions / theirs["wall_s"], "ours_run": ours, "trl_run": theirs}
            row["ratio"] = row["ours"] / row["trl"]
            rows.append(row)
            b = ours["breakdown"]
            print(f"[{name} repeat {rep + 1}] ours {row['ours']:.2f} completions/s (s/step {b['time/step']:.2f}: "
                  f"generate {b.get('time/generate', 0):.2f}, reward tail {b.get('time/reward_tail', 0):.2f}, "
                  f"learner {b['time/learner']:.2f}, sync {b['time/sync']:.2f}), TRL ({theirs['threads']} "
                  f"threads) {row['trl']:.2f} completions/s, ratio {row['ratio']:.2f}x", flush=True)
    return rows


def report(args, results: list[dict]) -> None:
    """Every run, then per policy and TRL thread count the median over the repeats and the spread (min-max),
    with our step's phases (median s/step) next to TRL's step."""
    from statistics import median

    trl_version = results[0]["trl_run"]["trl_version"]
    print(f"\n# GRPO completions/s, B={args.prompts} prompts x G={args.group}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, CPU ({os.cpu_count()} cores); TRL {trl_version} (transformers generate)")
    print(f"{'policy':<8}{'L':>5}{'rep':>4}{'TRL thr':>8}{'ours c/s':>10}{'TRL c/s':>9}{'ratio':>7}"
          f"{'ours s/step':>12}{'TRL s/step':>11}{'ours startup s':>15}{'TRL startup s':>14}")
    for r in results:
        o, t = r["ours_run"], r["trl_run"]
        print(f"{r['policy']:<8}{r['length']:>5}{r['repeat']:>4}{r['trl_threads']:>8}{r['ours']:>10.2f}"
              f"{r['trl']:>9.2f}{r['ratio']:>6.2f}x{o['wall_s'] / args.steps:>12.2f}{t['wall_s'] / args.steps:>11.2f}"
              f"{o['startup_s']:>15.1f}{t['startup_s']:>14.1f}")
    print("\n| policy | TRL threads | ours completions/s | TRL completions/s | ours / TRL, median (min-max) "
          "| ours s/step: generate, reward tail, learner, sync | TRL s/step |\n|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["policy"], r["trl_threads"]) for r in results):
        rows = [r for r in results if (r["policy"], r["trl_threads"]) == key]
        ratios = [r["ratio"] for r in rows]
        phases = {k: median(r["ours_run"]["breakdown"].get(f"time/{k}", 0.0) for r in rows)
                  for k in ("generate", "reward_tail", "learner", "sync")}
        print(f"| {key[0]} | {key[1]} | {median(r['ours'] for r in rows):.2f} | {median(r['trl'] for r in rows):.2f} "
              f"| {median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
              + ", ".join(f"{v:.2f}" for v in phases.values())
              + f" | {median(r['trl_run']['wall_s'] for r in rows) / args.steps:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-child", help=argparse.SUPPRESS)
    p.add_argument("--policies", default="tiny,large", help="comma-separated: tiny, large")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step, B")
    p.add_argument("--group", type=int, default=4, help="answers per prompt, G")
    p.add_argument("--repeats", type=int, default=3, help="runs of both systems (order alternates)")
    p.add_argument("--first", choices=["ours", "trl"], default="ours", help="system run first in repeat 1")
    p.add_argument("--trl-threads", default="0", help="comma-separated torch thread counts of the TRL process, "
                   "each run per repeat (0: torch's default, one per core)")
    p.add_argument("--workdir", default=str(REPO / "runs" / "vs_trl"))
    p.add_argument("--ours-overrides", nargs="*", default=[], help="extra launch.py overrides for our runs")
    args = p.parse_args()
    if args.trl_child:
        trl_child(json.loads(args.trl_child))
        return
    try:
        import trl  # noqa: F401  (fail before the long runs)
    except ImportError:
        sys.exit(f"TRL is not installed (it is only needed for this benchmark):\n    {TRL_INSTALL}")

    from config import load_config
    from data.synthetic import write_synthetic

    default = load_config(None, [])
    work = Path(args.workdir).resolve()
    data_path = str(write_synthetic(work / "data" / "train.parquet", default.data.synthetic_train_size,
                                    default.model.image_size, default.data.synthetic_seed))
    results = [row for name in args.policies.split(",") for row in run_policy(args, name, work, data_path)]
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(args, results)


if __name__ == "__main__":
    main()
