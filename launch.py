"""Train a reasoning-segmentation policy with GRPO on Ray.

    python launch.py [--config configs/default.yaml] [--resume [PATH]] [section.field=value ...]
    ray job submit --working-dir . -- python launch.py --config configs/segzero_7b.yaml

The job, top to bottom (``train``): start the actors -> optional supervised warm start on reference
answers -> GRPO steps -> held-out evaluation -> export. One GRPO step (``grpo_step``): take B prompts ->
the rollout actors (vLLM) sample G answers per prompt -> each finished group goes straight to the
reward pool (format/box/point rules + segmenter mask IoU) -> group-normalised advantages -> the learner
ranks (DeepSpeed ZeRO) take one GRPO step -> rank 0's new weights reach every rollout actor (version =
optimizer steps so far) -> MLflow. The step's data is a list of ``rollout.group.Group``; the actor
groups behind ``job.rollouts`` and ``job.learners`` (cluster/) hide the fan-out to Ray actors.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import zlib
from collections import Counter
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
    """The whole job; ``resume``: a checkpoint path, "" for the output dir's latest, None to start anew."""
    import mlflow
    from tqdm import tqdm

    from cluster.evaluation import evaluate_and_log
    from cluster.job import Job
    from cluster.tracking import start_run

    job = Job.start(cfg, resume)
    try:
        with start_run(cfg, job.run_id) as run:
            job.run_id = run.info.run_id
            log.info("mlflow run %s at %s", job.run_id, mlflow.get_tracking_uri())

            # 1. Supervised warm start: the answer format, and roughly where the object is.
            if job.sft_done < cfg.train.sft_steps:
                warm_start(job)
            if cfg.eval.enabled and job.step == 0:
                evaluate_and_log(job, 0)

            # 2. GRPO, one step at a time; between steps: the reward pool's autoscaler, lost nodes, evaluations,
            # checkpoints. A learner rank lost on the way: the learner group restarts from the latest
            # checkpoint and the loop goes on from its step.
            bar = tqdm(desc="grpo", unit="step", initial=job.step, total=cfg.train.steps)
            while job.step < cfg.train.steps:
                step = job.step + 1
                try:
                    metrics = grpo_step(job, step)
                    metrics.update(job.autoscale_rewards(step, metrics))
                    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
                    if not metrics["batch/skipped"]:
                        bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", gen=f"{metrics['time/generate']:.1f}s",
                                        learn=f"{metrics['time/learner']:.1f}s", sync=f"{metrics['time/sync']:.1f}s")
                    job.watch_nodes(step)
                    job.publish(step, metrics)
                    if step < cfg.train.steps and cfg.eval.enabled and cfg.eval.every_n_steps \
                            and step % cfg.eval.every_n_steps == 0:
                        evaluate_and_log(job, step)
                    if step < cfg.train.steps and cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                        job.save_checkpoint()
                except Exception as exc:  # noqa: BLE001 - a learner rank lost is recovered; anything else stops
                    lost = job.learners.lost(exc)
                    if lost is None:
                        raise
                    job.recover_learners(lost)
                bar.update(job.step - bar.n)
            bar.close()

            # 3. The end: held-out evaluation, learning curve, checkpoint, the policies as HF directories.
            finish(job)
    finally:
        job.shutdown()


def finish(job) -> None:
    """The final evaluation, the learning curve, the last checkpoint, and the final (and best) policy as
    HF directories, logged to MLflow."""
    import mlflow

    from cluster.evaluation import evaluate_and_log
    from evaluation.curve import metric_history, plot_learning_curve

    cfg = job.cfg
    if cfg.eval.enabled:
        evaluate_and_log(job, job.step)
    curve = plot_learning_curve(metric_history(job.run_id), job.out / "learning_curve.png",
                                title=cfg.run_name)
    mlflow.log_artifact(str(curve))
    job.save_checkpoint()
    if cfg.tracking.log_model:
        final = job.out / "final_policy"
        job.learners.export_hf(final)
        mlflow.log_artifacts(str(final), artifact_path="final_policy")
        log.info("final policy: %s (logged to MLflow run %s)", final, job.run_id)
        if job.best is not None:
            mlflow.log_artifacts(str(job.best_dir), artifact_path="best_policy")
    if job.best is not None:
        mlflow.log_metrics({"best/step": job.best["step"], "best/giou": job.best["giou"]}, step=job.step)
        log.info("best policy: step %d, held-out gIoU %.4f +- %.4f (%s)", job.best["step"], job.best["giou"],
                 job.best["giou_se"], job.best_dir)


def warm_start(job) -> None:
    """Supervised steps on the dataset's reference answers (in the rule set's answer format); then the
    warm-started policy is exported (Seg-Zero's SFT baseline, GRPO's KL reference) and synced."""
    import mlflow
    from tqdm import tqdm

    from policy.prepare import reference_tokenizer
    from policy.prompt import chat_prompt

    cfg = job.cfg
    size, rules = cfg.model.image_size, cfg.reward.rules
    tokenize = reference_tokenizer(job.policy_path)
    job.learners.set_lr(cfg.train.sft_lr)
    for sft_step in tqdm(range(job.sft_done + 1, cfg.train.sft_steps + 1), desc="warm start", unit="step"):
        batch = [{"prompt": chat_prompt(s.problem, rules), "image": s.model_image(size),
                  "response_ids": tokenize(s.reference_answer(size, rules))}
                 for s in job.data.next_batch(cfg.train.sft_batch_size)]
        metrics = job.learners.sft_step(batch)
        mlflow.log_metrics({f"sft/{k}": float(v) for k, v in metrics.items()}, step=sft_step)
        job.sft_done = sft_step
    job.learners.set_lr(cfg.learner.lr)
    job.learners.export_hf(job.warm_start_dir)
    log.info("warm-started policy: %s", job.warm_start_dir)
    job.learners.set_reference(job.warm_start_dir)
    job.version = job.sft_done
    job.rollouts.sync_from(job.learners, job.version)


def grpo_step(job, step: int) -> dict:
    """One GRPO step; returns its metrics. When no group can be trained (every group tied under dynamic
    sampling, or no prompt fitted the context) the step is skipped, weights unchanged: ``batch/skipped``
    is 1 and only the rollout's metrics are returned."""
    from rollout.group import check_batch, learner_batch

    cfg, r, t0 = job.cfg, job.cfg.rollout, time.perf_counter()
    job.step = step

    # Rollout + reward: G answers per prompt, each group scored as soon as it is generated. Off-policy,
    # this step's round was started during the last step's learner update.
    round_, job.pending = job.pending or draw_round(job, step, r.prompts_per_step), None
    groups, metrics = round_.finish()
    kept, dropped = trainable(groups, r.dynamic_sampling)

    # Dynamic sampling (DAPO): groups whose G rewards tie carry no gradient; refill with new prompts.
    refills = 0
    while r.dynamic_sampling and len(kept) < r.prompts_per_step and refills < r.max_refills:
        refills += 1
        more, _ = draw_round(job, step, r.prompts_per_step - len(kept), refills, {g.uid for g in groups}).finish()
        groups += more
        more_kept, more_dropped = trainable(more, True)
        kept, dropped = kept + more_kept, dropped + more_dropped
    metrics.update({"batch/refills": refills, "batch/dropped_groups": sum(dropped.values()),
                    **{f"batch/dropped_groups/{why}": n for why, n in dropped.items()}, "batch/skipped": int(not kept)})
    if not kept:
        log.warning("step %d: no group to train (dropped: %s, refills: %d); skipping the update",
                    step, dict(dropped), refills)
        return metrics

    # Advantages: rewards normalised within each group of G answers to the same prompt; checked.
    for g in kept:
        g.advantages = g.compute_advantages(cfg.learner.adv_scale)
    batch = learner_batch(kept, cfg.model.image_size)
    check_batch(kept, batch, job.rollouts.versions, job.version, int(r.off_policy), cfg.learner.adv_scale)

    # Operators' requests due by the next step apply now, while no round is in flight.
    job.apply_scaling(step + 1)

    # Learner: one update over the whole batch. Off-policy, the next step's round generates meanwhile,
    # with the weights before this update (staleness one version).
    t_learn = time.perf_counter()
    if r.off_policy and step < cfg.train.steps:
        job.pending = draw_round(job, step + 1, r.prompts_per_step)
    learner_metrics = job.learners.train_step(batch, while_waiting=job.pending.pump if job.pending else None)
    metrics["time/learner"] = time.perf_counter() - t_learn

    # Weight sync: the next round samples from the updated policy.
    staleness = job.version - min(a.weight_version for g in kept for a in g.answers)
    job.version += 1
    metrics.update(job.rollouts.sync_from(job.learners, job.version))
    return step_metrics(job, kept, learner_metrics, metrics, staleness, time.perf_counter() - t0)


def draw_round(job, step: int, prompts: int, refill: int = 0, taken: set | None = None):
    """The next ``prompts`` samples of the data stream as groups (ids unique within the step), their
    round started on the rollout workers with a seed fixed by (train.seed, step, refill)."""
    from rollout.group import make_groups

    groups, renamed = make_groups(job.data.next_batch(prompts), step, set(taken or ()))
    seed = job.cfg.train.seed * 1_000_003 + step * 101 + refill * 10_007
    return job.rollouts.round(groups, seed, job.version, metrics={"batch/renamed_ids": renamed})


def trainable(groups: list, dynamic_sampling: bool) -> tuple[list, Counter]:
    """(groups to train, dropped groups counted by reason): ``no_answers`` (the prompt did not fit
    rollout.max_model_len), ``tied`` (dynamic sampling: all G rewards equal)."""
    kept, dropped = [], Counter()
    for g in groups:
        if not g.answers:
            dropped["no_answers"] += 1
        elif dynamic_sampling and not g.informative():
            dropped["tied"] += 1
        else:
            kept.append(g)
    return kept, dropped


def step_metrics(job, groups: list, learner_metrics: dict, metrics: dict, staleness: int, seconds: float) -> dict:
    """Everything one step logs: rewards and advantages of the trained groups, the learner's numbers,
    stage times, throughput, weight version, staleness, reward pool throughput and queueing, dataset rows
    skipped so far (``metrics`` holds the round's: pool sizes, redone chunks, dropped and renamed groups)."""
    from rollout.group import batch_metrics

    out = {**batch_metrics(groups), **learner_metrics, **metrics}
    pool = job.reward_pool.stats(reset=True)
    out.update({"time/step": seconds, "perf/samples_per_s": out["batch/sequences"] / seconds,
                "perf/tokens_per_s": learner_metrics.get("tokens", 0) / seconds,
                "weight_version": job.version, "rollout/staleness": staleness,
                # which prompts this step trained on, as a number MLflow can plot (resume checks)
                "batch/ids_crc": zlib.crc32(",".join(g.sample.id for g in groups).encode()) % 2**24,
                "pool/reward_samples_per_s": pool["samples_per_s"], "pool/queued_groups": pool["queued_groups"],
                "pool/idle_workers": pool["idle_workers"], **job.data.skipped_metrics()})
    return out


if __name__ == "__main__":
    sys.exit(main())
