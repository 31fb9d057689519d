"""Train a reasoning-segmentation policy with GRPO on Ray.

    python launch.py [--config configs/default.yaml] [section.field=value ...]
    ray job submit --working-dir . -- python launch.py --config configs/segzero_7b.yaml

One step, top to bottom: take B prompts -> the rollout actors (vLLM) sample G answers per prompt ->
each finished group goes straight to the reward pool (format/box/point rules + segmenter mask IoU) ->
group-normalised advantages -> the learner ranks (DeepSpeed ZeRO) take one GRPO step -> rank 0's new
weights are broadcast to every rollout actor (version = step) -> metrics to MLflow.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("launch")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=8")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from config import ConfigError, load_config

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train(cfg)
    except (TimeoutError, RuntimeError) as exc:
        log.error("training stopped: %s", exc)
        return 1
    return 0


def train(cfg) -> None:
    import mlflow
    import ray
    import torch
    from tqdm import tqdm

    from cluster.reward_pool import RewardPool
    from cluster.rollout import generate_and_score
    from cluster.start import connect, start_learners, start_rollout_workers
    from cluster.tracking import start_run
    from cluster.weight_sync import broadcast_weights
    from data.dataset import ParquetSource
    from learner.grpo import group_advantages

    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    B, G, size = cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.model.image_size

    # 1. Policy weights and data: local paths from the config, or the embedded tiny policy + synthetic set.
    policy_path = prepare_policy(cfg)
    train_path, _eval_path = prepare_data(cfg)
    data = ParquetSource(train_path, seed=cfg.train.seed, shuffle=cfg.data.shuffle)

    # 2. The actors: learner ranks, rollout workers (vLLM), reward pool (segmenter workers).
    where = connect(cfg)
    log.info("ray: %s, resources %s", where, ray.cluster_resources())
    learners = start_learners(cfg, policy_path)
    workers = start_rollout_workers(cfg, policy_path, cfg.cluster.rollout_workers)
    reward_pool = RewardPool(cfg.reward, cfg.cluster.reward_workers, cfg.cluster.reward.model_dump(),
                             cfg.cluster.call_timeout_s)
    t0 = time.perf_counter()
    ray.get([a.__ray_ready__.remote() for a in learners + workers], timeout=cfg.cluster.startup_timeout_s)
    log.info("actors ready in %.1f s: %d learner ranks, %d rollout workers, %d reward workers",
             time.perf_counter() - t0, len(learners), len(workers), cfg.cluster.reward_workers)

    # 3. The GRPO loop.
    with start_run(cfg) as run, tqdm(range(1, cfg.train.steps + 1), desc="grpo", unit="step") as bar:
        log.info("mlflow run %s at %s", run.info.run_id, mlflow.get_tracking_uri())
        for step in bar:
            t_step = time.perf_counter()
            samples = data.next_batch(B)

            # Rollout + reward (overlapped): G answers per prompt, each group scored as it arrives.
            rollouts, rewards, timings = generate_and_score(
                workers, reward_pool, samples, G, size, chunk_size=max(1, B // (2 * len(workers))),
                timeout_s=cfg.cluster.call_timeout_s)

            # Advantages: rewards normalised within each group of G answers to the same prompt.
            totals = torch.tensor([r["total"] for s in samples for r in rewards[s.id]])
            advantages = group_advantages(totals, G, scale=cfg.learner.adv_scale)
            batch = [{"sample_id": s.id, "prompt": ro["prompt"], "image": s.model_image(size),
                      "response_ids": resp["token_ids"], "logprobs": resp["logprobs"]}
                     for s, ro in zip(samples, rollouts) for resp in ro["responses"]]
            for seq, adv in zip(batch, advantages.tolist()):
                seq["advantage"] = adv

            # Learner: one GRPO step over the whole batch, split across ranks (global token count).
            t0 = time.perf_counter()
            shards = [batch[r::len(learners)] for r in range(len(learners))]
            num_tokens = sum(len(seq["response_ids"]) for seq in batch)
            learner_metrics = ray.get([l.train_step.remote(shard, num_tokens, len(batch))
                                       for l, shard in zip(learners, shards)],
                                      timeout=cfg.cluster.call_timeout_s)[0]
            timings["time/learner"] = time.perf_counter() - t0

            # Weight sync: the next rollout samples from the updated policy (version = step).
            timings.update(broadcast_weights(learners, workers, step, cfg.cluster.sync_bucket_mb << 20,
                                             cfg.cluster.sync_timeout_s))

            timings["time/step"] = time.perf_counter() - t_step
            metrics = {**step_metrics(samples, rewards, rollouts, advantages), **learner_metrics, **timings,
                       "perf/samples_per_s": len(batch) / timings["time/step"], "weight_version": step}
            mlflow.log_metrics({k.replace("@", "_"): float(v) for k, v in metrics.items()}, step=step)
            bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", step_s=f"{timings['time/step']:.1f}")

        if cfg.tracking.log_model:
            final = out / "final_policy"
            ray.get(learners[0].export_hf.remote(str(final)), timeout=cfg.cluster.call_timeout_s)
            mlflow.log_artifacts(str(final), artifact_path="final_policy")
            log.info("final policy: %s (logged to MLflow run %s)", final, run.info.run_id)
    if where == "local":
        ray.shutdown()


def prepare_policy(cfg) -> str:
    """model.policy_path, or the tiny embedded Qwen2.5-VL built once into the output dir."""
    if cfg.model.policy_path:
        if not Path(cfg.model.policy_path, "config.json").exists():
            raise RuntimeError(f"model.policy_path: no HF checkpoint (config.json) in {cfg.model.policy_path}")
        return cfg.model.policy_path
    from policy.tiny import build_tiny_policy

    m = cfg.model
    path = build_tiny_policy(Path(cfg.train.output_dir) / "tiny_policy", image_size=m.image_size,
                             hidden_size=m.tiny_hidden_size, layers=m.tiny_layers, heads=m.tiny_heads,
                             vision_hidden_size=m.tiny_vision_hidden_size,
                             vision_layers=m.tiny_vision_layers, seed=cfg.train.seed)
    log.info("policy: tiny embedded Qwen2.5-VL at %s (random weights)", path)
    return str(path)


def prepare_data(cfg) -> tuple[str, str]:
    """data.train_path / eval_path, or the synthetic shapes set generated once into the output dir."""
    from data.synthetic import write_synthetic

    d, root = cfg.data, Path(cfg.train.output_dir) / "data"
    train_path = d.train_path or str(write_synthetic(root / "train.parquet", d.synthetic_train_size,
                                                     cfg.model.image_size, d.synthetic_seed))
    eval_path = d.eval_path or str(write_synthetic(root / "eval.parquet", d.synthetic_eval_size,
                                                   cfg.model.image_size, d.synthetic_seed + 1))
    for field, path in (("data.train_path", train_path), ("data.eval_path", eval_path)):
        if not Path(path).exists():
            raise RuntimeError(f"{field}: not found: {path}")
    return train_path, eval_path


def step_metrics(samples, rewards, rollouts, advantages) -> dict[str, float]:
    """Mean of every reward term, advantage statistics and response lengths of one step."""
    per_answer = [r for s in samples for r in rewards[s.id]]
    terms = sorted({k for r in per_answer for k in r})
    m = {f"reward/{k}": sum(r.get(k, 0.0) for r in per_answer) / len(per_answer) for k in terms}
    lengths = [len(resp["token_ids"]) for ro in rollouts for resp in ro["responses"]]
    m.update({"adv/mean": advantages.mean().item(), "adv/std": advantages.std().item(),
              "adv/min": advantages.min().item(), "adv/max": advantages.max().item(),
              "response/length_mean": sum(lengths) / len(lengths), "response/length_max": max(lengths)})
    return m


if __name__ == "__main__":
    sys.exit(main())
