"""Train a reasoning-segmentation policy with GRPO on Ray.

    python launch.py [--config configs/default.yaml] [--resume [PATH]] [section.field=value ...]
    ray job submit --working-dir . -- python launch.py --config configs/segzero_7b.yaml

The job, top to bottom: start the actors -> optional supervised warm start on reference answers ->
GRPO steps -> held-out evaluation -> export. One GRPO step: take B prompts -> the rollout actors (vLLM)
sample G answers per prompt -> each finished group goes straight to the reward pool (format/box/point
rules + segmenter mask IoU) -> group-normalised advantages -> the learner ranks (DeepSpeed ZeRO) take
one GRPO step -> rank 0's new weights are broadcast to every rollout actor (version = step) -> MLflow.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import zlib
from pathlib import Path

log = logging.getLogger("launch")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from a checkpoint (default: the latest in train.output_dir), same MLflow run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=8")
    args = p.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():  # `--resume a.b=c`: an override
        args.overrides.insert(0, args.resume)
        args.resume = ""
    return args


def main(argv=None) -> int:
    from config import load_config_or_exit

    args = parse_args(argv)
    cfg = load_config_or_exit(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ray.exceptions import RayError

    try:
        train(cfg, resume=args.resume)
    except (TimeoutError, RuntimeError, FileNotFoundError, RayError) as exc:
        log.error("training stopped: %s", exc)
        return 1
    return 0


def train(cfg, resume: str | None = None) -> None:
    import mlflow
    import ray
    import torch
    from ray.exceptions import RayActorError
    from tqdm import tqdm

    from cluster import checkpoint
    from cluster.controller import start_controller
    from cluster.reward_pool import RewardPool
    from cluster.rollout import RolloutRound, wait_until_alive
    from cluster.start import connect, start_learners, start_rollout_workers
    from cluster.topology import format_topology, topology
    from cluster.tracking import start_run
    from cluster.weight_sync import broadcast_weights, parity_check
    from data.dataset import ParquetSource
    from evaluation.curve import metric_history, plot_learning_curve
    from learner.grpo import group_advantages

    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.resolve(resume or None, out) if resume is not None else None  # fail before start-up
    log.info("outputs: %s", out.resolve())
    if "runtime_resources" in str(out.resolve()):
        log.warning("train.output_dir is inside the Ray job's temporary working dir; set train.output_dir="
                    "/an/absolute/path (and tracking.mlflow_uri) to keep checkpoints and the MLflow store")
    B, G, size = cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.model.image_size
    timeout = cfg.cluster.call_timeout_s

    # 1. Policy weights and data: local paths from the config, or the embedded tiny policy + synthetic set.
    policy_path = prepare_policy(cfg)
    train_path, eval_path = prepare_data(cfg)
    data = ParquetSource(train_path, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    eval_samples = held_out_samples(eval_path, cfg.eval.num_samples)

    # 2. The actors: learner ranks, rollout workers (vLLM), reward pool (segmenter workers), and the
    #    named controller that cluster.scale / cluster.status talk to.
    where = connect(cfg)
    log.info("ray: %s, resources %s", where, ray.cluster_resources())
    controller = start_controller(cfg.cluster.job_name)
    learners = start_learners(cfg, policy_path)
    workers = start_rollout_workers(cfg, policy_path, cfg.cluster.rollout_workers)
    reward_pool = RewardPool(cfg.reward, cfg.cluster.reward_workers, cfg.cluster.reward.model_dump(), timeout,
                             startup_timeout_s=cfg.cluster.startup_timeout_s)
    t0 = time.perf_counter()
    ray.get([a.__ray_ready__.remote() for a in learners + workers], timeout=cfg.cluster.startup_timeout_s)
    places = topology({"learner": learners, "rollout": workers, "reward": [w.actor for w in reward_pool.workers]})
    log.info("actors ready in %.1f s; topology:\n%s", time.perf_counter() - t0, format_topology(places))
    if cfg.reward.mask_iou != "off" and cfg.reward.segmenter == "grabcut":
        log.info("mask reward: OpenCV GrabCut (weight-free stand-in for SAM2; set reward.segmenter=sam2 "
                 "reward.sam2_checkpoint=PATH for production masks)")
    version = 0  # the learner's weight version: one per optimizer step (warm start and GRPO)
    probe = parity_probe(eval_samples[0], policy_path, size) if cfg.cluster.sync_parity_check else None

    def sync(to: list | None = None) -> dict:
        """Current weights to all rollout workers (or ``to``); a worker that died meanwhile is waited for
        (Ray restarts it with the initial weights) and the push is repeated."""
        targets = workers if to is None else to
        push = lambda: broadcast_weights(learners, targets, version, cfg.cluster.sync_bucket_mb << 20,  # noqa: E731
                                         cfg.cluster.sync_timeout_s)
        try:
            metrics = push()
        except RayActorError as exc:
            log.warning("weight sync: a rollout worker died (%s); waiting for its restart, then pushing again",
                        type(exc).__name__)
            for w in targets:
                wait_until_alive(w, time.monotonic() + cfg.cluster.startup_timeout_s)
            metrics = {**push(), "sync/worker_restarts": 1}
        if cfg.cluster.sync_parity_check:
            metrics["sync/parity_max_diff"] = parity_check(learners, targets, probe, cfg.cluster.sync_parity_tolerance,
                                                           timeout)
        return metrics

    # 3. Resume: learner state from DeepSpeed, driver state (data position, step, RNG, MLflow run).
    step, sft_done, run_id = 0, 0, None
    warm_start = out / "warm_start_policy"
    if ckpt is not None:
        ray.get([l.load_checkpoint.remote(str(ckpt)) for l in learners], timeout=timeout)
        state = checkpoint.load_driver_state(ckpt)
        data.load_state_dict(state["data"])
        step, sft_done, run_id, version = state["step"], state["sft_done"], state["mlflow_run_id"], state["weight_version"]
        sync()
        log.info("resumed from %s: step %d, warm-start steps %d, MLflow run %s", ckpt, step, sft_done, run_id)
        if sft_done >= cfg.train.sft_steps > 0:  # past the warm start: its policy is the KL reference
            if warm_start.exists():
                ray.get([l.set_reference.remote(str(warm_start)) for l in learners], timeout=timeout)
            else:
                log.warning("%s is missing: the KL reference is the initial policy", warm_start)

    def save_checkpoint(data_state: dict):
        """data_state: the data position of the first batch not trained on yet."""
        path = checkpoint.save(out, step, learners, {
            "step": step, "sft_done": sft_done, "weight_version": version, "data": data_state,
            "mlflow_run_id": run.info.run_id}, cfg.train.keep_checkpoints, timeout)
        log.info("checkpoint: %s", path)

    def new_round(for_step: int, prompts: int = B, refill: int = 0) -> RolloutRound:
        return RolloutRound(workers, reward_pool, data.next_batch(prompts), G, size,
                            chunk_size=max(1, B // (2 * len(workers))), timeout_s=timeout,
                            seed=cfg.train.seed * 1_000_003 + for_step * 101 + refill * 10_007,
                            resync=lambda w: sync([w]), stream=cfg.rollout.stream_rewards,
                            weight_version=version).start()

    with start_run(cfg, run_id) as run:
        log.info("mlflow run %s at %s", run.info.run_id, mlflow.get_tracking_uri())

        # 4. Supervised warm start: teaches the answer format from the dataset's reference answers.
        if sft_done < cfg.train.sft_steps:
            tokenizer = reference_tokenizer(policy_path)
            ray.get([l.set_lr.remote(cfg.train.sft_lr) for l in learners], timeout=timeout)
            for sft_done in tqdm(range(sft_done + 1, cfg.train.sft_steps + 1), desc="warm start", unit="step"):
                samples = data.next_batch(cfg.train.sft_batch_size)
                batch = [{"prompt": chat_text(s.problem), "image": s.model_image(size),
                          "response_ids": tokenizer(s.reference_answer(size))} for s in samples]
                metrics = all_ranks(learners, "sft_step", batch, timeout)
                mlflow.log_metrics({f"sft/{k}": float(v) for k, v in metrics.items()}, step=sft_done)
            ray.get([l.set_lr.remote(cfg.learner.lr) for l in learners], timeout=timeout)
            # The warm-started policy: Seg-Zero's "SFT" baseline (evaluate.py --checkpoint) and GRPO's KL reference.
            ray.get([l.export_hf.remote(str(warm_start)) for l in learners], timeout=timeout)
            log.info("warm-started policy: %s", warm_start)
            ray.get([l.set_reference.remote(str(warm_start)) for l in learners], timeout=timeout)
            version = sft_done
            sync()
        if cfg.eval.enabled and step == 0:
            log_eval(cfg, workers, eval_samples, out, 0)

        # 5. GRPO.
        bar = tqdm(range(step + 1, cfg.train.steps + 1), desc="grpo", unit="step", initial=step, total=cfg.train.steps)
        next_round = None  # one-step off-policy: the next step's rollouts, generated during this step
        for step in bar:
            t_step = time.perf_counter()

            # Rollout + reward (overlapped): G answers per prompt, each group scored as it arrives.
            this_round = next_round or new_round(step)
            rollouts, rewards, timings = this_round.finish()
            samples = this_round.samples
            if cfg.rollout.dynamic_sampling:  # DAPO: keep only groups whose G rewards differ, refill
                samples, rollouts, dropped, refills = informative_groups(samples, rollouts, rewards)
                while len(samples) < B and refills < cfg.rollout.max_refills:
                    refills += 1
                    extra = new_round(step, B - len(samples), refill=refills)
                    more_rollouts, more_rewards, _ = extra.finish()
                    rewards.update(more_rewards)
                    kept, kept_rollouts, more_dropped, _ = informative_groups(extra.samples, more_rollouts, rewards)
                    samples, rollouts, dropped = samples + kept, rollouts + kept_rollouts, dropped + more_dropped
                if not samples:
                    log.warning("step %d: every group had equal rewards after %d refills; skipping the update", step, refills)
                    continue
                timings.update({"batch/dropped_groups": dropped, "batch/refills": refills})
            staleness = version - min(ro["weight_version"] for ro in rollouts)

            # Operators' requests (python -m cluster.scale) apply here, between rounds.
            workers = apply_scaling(cfg, ray.get(controller.take_requests.remote(), timeout=timeout),
                                    workers, reward_pool, policy_path, sync)

            # Advantages: rewards normalised within each group of G answers to the same prompt.
            totals = torch.tensor([r["total"] for s in samples for r in rewards[s.id]])
            advantages = group_advantages(totals, G, scale=cfg.learner.adv_scale)
            batch = [{"sample_id": s.id, "prompt": ro["prompt"], "image": s.model_image(size),
                      "response_ids": resp["token_ids"], "logprobs": resp["logprobs"], "advantage": adv}
                     for s, ro, group_adv in zip(samples, rollouts, advantages.view(-1, G).tolist())
                     for resp, adv in zip(ro["responses"], group_adv)]

            # Learner: one GRPO step over the whole batch, split across ranks (global token count).
            # Off-policy mode generates the next step's answers meanwhile, with the weights before it.
            t0 = time.perf_counter()
            learner_refs = all_ranks(learners, "train_step", batch, timeout, with_seqs=True, wait=False)
            next_round, next_data_state = None, data.state_dict()
            if cfg.rollout.off_policy and step < cfg.train.steps:
                next_round = new_round(step + 1)
            deadline = time.monotonic() + timeout
            while next_round and time.monotonic() < deadline and ray.wait(
                    learner_refs, num_returns=len(learner_refs), timeout=0.1)[1]:
                next_round.pump()  # finished groups go to the reward pool while the learner trains
            learner_metrics = ray.get(learner_refs, timeout=max(1.0, deadline - time.monotonic()))[0]
            timings["time/learner"] = time.perf_counter() - t0

            # Weight sync: the next rollout samples from the updated policy.
            version += 1
            timings.update(sync())

            timings["time/step"] = time.perf_counter() - t_step
            pool = reward_pool.stats(reset=True)
            metrics = {**step_metrics(samples, rewards, rollouts, advantages), **learner_metrics, **timings,
                       "perf/samples_per_s": len(batch) / timings["time/step"],
                       "perf/tokens_per_s": learner_metrics.get("tokens", 0) / timings["time/step"],
                       "weight_version": version, "rollout/staleness": staleness,
                       "batch/prompts": len({s.id for s in samples}), "batch/sequences": len(batch),
                       # which prompts this step trained on, as a number MLflow can plot (resume checks)
                       "batch/ids_crc": zlib.crc32(",".join(s.id for s in samples).encode()) % 2**24,
                       "pool/rollout_workers": len(workers), "pool/reward_workers": pool["num_workers"],
                       "pool/reward_samples_per_s": pool["samples_per_s"]}
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
            bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", gen=f"{timings['time/generate']:.1f}s",
                            learn=f"{timings['time/learner']:.1f}s", sync=f"{timings['time/sync']:.1f}s")
            controller.publish.remote({
                "step": step, "steps": cfg.train.steps, "phase": "grpo", "weight_version": version,
                "topology": places, "rollout_versions": weight_versions(workers),
                "reward_inflight": [w["inflight"] for w in pool["workers"]],
                "last_step": {k: v for k, v in timings.items() if k.startswith("time/")}})

            if cfg.eval.enabled and cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and step < cfg.train.steps:
                log_eval(cfg, workers, eval_samples, out, step)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                save_checkpoint(next_data_state)
        bar.close()

        # 6. The end: held-out evaluation, checkpoint, the policy as an HF directory in MLflow.
        if cfg.eval.enabled:
            log_eval(cfg, workers, eval_samples, out, step)
        curve = plot_learning_curve(metric_history(run.info.run_id), out / "learning_curve.png",
                                    title=f"{cfg.tracking.run_name or 'default run'}, train.seed {cfg.train.seed}")
        mlflow.log_artifact(str(curve))
        log.info("learning curve: %s", curve)
        save_checkpoint(data.state_dict())
        if cfg.tracking.log_model:
            final = out / "final_policy"
            ray.get([l.export_hf.remote(str(final)) for l in learners], timeout=timeout)
            mlflow.log_artifacts(str(final), artifact_path="final_policy")
            log.info("final policy: %s (logged to MLflow run %s)", final, run.info.run_id)
    if where == "local":
        ray.shutdown()


def parity_probe(sample, policy_path: str, size: int) -> dict:
    """The fixed sequence of the post-sync parity check: a held-out prompt and its reference answer."""
    return {"problem": sample.problem, "prompt": chat_text(sample.problem), "image": sample.model_image(size),
            "response_ids": reference_tokenizer(policy_path)(sample.reference_answer(size))}


def informative_groups(samples, rollouts, rewards) -> tuple[list, list, int, int]:
    """DAPO's dynamic sampling filter: groups whose G rewards are all equal have zero advantage and no
    gradient; returns (kept samples, their rollouts, number dropped, 0)."""
    keep = [i for i, s in enumerate(samples) if len({r["total"] for r in rewards[s.id]}) > 1]
    return [samples[i] for i in keep], [rollouts[i] for i in keep], len(samples) - len(keep), 0


def weight_versions(workers: list) -> list:
    """Each rollout worker's weight version (None for one that is restarting), for cluster.status."""
    import ray
    from ray.exceptions import RayError

    refs = [w.__ray_call__.remote(lambda self: self.weight_version) for w in workers]
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=10))
        except (RayError, TimeoutError):
            out.append(None)
    return out


def apply_scaling(cfg, requested: dict, workers: list, reward_pool, policy_path: str, sync) -> list:
    """Resizes the pools between steps; new rollout workers get the current weights before they generate."""
    import ray

    from cluster.start import start_rollout_workers, stop_rollout_workers

    if "reward_workers" in requested and requested["reward_workers"] != len(reward_pool.workers):
        log.info("scaling reward workers %d -> %d", len(reward_pool.workers), requested["reward_workers"])
        reward_pool.resize(requested["reward_workers"])
    n = requested.get("rollout_workers", len(workers))
    if n > len(workers):
        log.info("scaling rollout workers %d -> %d", len(workers), n)
        new = start_rollout_workers(cfg, policy_path, n - len(workers), first_index=len(workers))
        ray.get([w.__ray_ready__.remote() for w in new], timeout=cfg.cluster.startup_timeout_s)
        sync(new)
        workers = workers + new
    elif n < len(workers):
        log.info("scaling rollout workers %d -> %d", len(workers), n)
        stop_rollout_workers(workers[n:])  # frees their placement groups (TP engines)
        workers = workers[:n]
    return workers


def all_ranks(learners: list, method: str, batch: list[dict], timeout: float, with_seqs: bool = False,
              wait: bool = True):
    """Calls a collective learner method on every rank with its shard (the whole batch's token count
    passed to all); every rank returns the same whole-batch metrics (wait=False: the object refs)."""
    import ray

    shards = [batch[r::len(learners)] for r in range(len(learners))]
    num_tokens = sum(len(seq["response_ids"]) for seq in batch)
    extra = (len(batch),) if with_seqs else ()
    refs = [getattr(l, method).remote(shard, num_tokens, *extra) for l, shard in zip(learners, shards)]
    return ray.get(refs, timeout=timeout)[0] if wait else refs


def log_eval(cfg, workers, samples, out: Path, step: int) -> dict:
    """Held-out gIoU/cIoU of the current policy, logged as eval/* at this step, with overlay pictures."""
    import mlflow

    from cluster.evaluation import evaluate_policy

    from ray.exceptions import RayError

    t0 = time.perf_counter()
    try:
        result = evaluate_policy(cfg, workers, samples, str(out / "eval" / f"step_{step:06d}"))
    except (RayError, TimeoutError) as exc:  # an evaluation never stops training
        log.warning("evaluation at step %d skipped: %s", step, exc)
        return {}
    metrics = {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}
    metrics["time/eval"] = time.perf_counter() - t0
    mlflow.log_metrics(metrics, step=step)
    for path in result["overlays"]:
        mlflow.log_artifact(path, artifact_path=f"eval/step_{step:06d}")
    log.info("eval at step %d: gIoU %.4f cIoU %.4f (segzero convention), box IoU %.4f, reward %.3f, "
             "parse failures %.1f%%", step, result["giou_segzero"], result["ciou_segzero"], result["box_iou"],
             result["reward"], 100 * result["parse_failure_rate"])
    return result


def chat_text(problem: str) -> str:
    from policy.prompt import chat_prompt

    return chat_prompt(problem)


def reference_tokenizer(policy_path: str):
    """text -> token ids of the reference answer followed by the end-of-turn token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_path)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return lambda text: tok.encode(text, add_special_tokens=False) + [end]


def held_out_samples(eval_path: str, n: int) -> list:
    from data.dataset import ParquetSource

    samples = []
    for sample in ParquetSource(eval_path, shuffle=False).iter_epoch():
        if len(samples) == n:
            break
        samples.append(sample)
    return samples


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
                             vision_layers=m.tiny_vision_layers, seed=cfg.train.seed,
                             number_code=m.tiny_number_code, position_reader=m.tiny_position_reader)
    log.info("policy: tiny embedded Qwen2.5-VL at %s (random weights)", path)
    return str(path)


def prepare_data(cfg) -> tuple[str, str]:
    """data.train_path / eval_path, or the synthetic shapes set generated once into the output dir."""
    from data.synthetic import write_synthetic

    d, root = cfg.data, Path(cfg.train.output_dir) / "data"
    options = dict(barcodes=d.synthetic_barcodes, kinds=tuple(d.synthetic_kinds), num_shapes=tuple(d.synthetic_shapes))
    train_path = d.train_path or str(write_synthetic(root / "train.parquet", d.synthetic_train_size,
                                                     cfg.model.image_size, d.synthetic_seed, **options))
    eval_path = d.eval_path or str(write_synthetic(root / "eval.parquet", d.synthetic_eval_size,
                                                   cfg.model.image_size, d.synthetic_seed + 1, **options))
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
