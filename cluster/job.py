"""A training job on Ray: its set-up, the state its loop carries, checkpoints, operators' requests,
tear-down. launch.py holds the algorithm; this holds everything around it.

    job = Job.start(cfg, resume=None)   # data, policy, Ray, actors (learners, rollouts, reward pool)
    ...                                 # job.learners, job.rollouts, job.version, job.pending...
    job.save_checkpoint(run_id)
    job.shutdown()
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from cluster import checkpoint
from cluster.autoscale import RewardAutoscaler
from cluster.controller import NAMESPACE, start_controller
from cluster.learners import LearnerGroup, LearnerLost
from cluster.plan import check as check_plan
from cluster.reward_pool import RewardPool
from cluster.rollout import CompletedRound, RolloutGroup, RolloutRound
from cluster.topology import ActorTable, format_topology
from config import REPO, Config
from data.dataset import ParquetSource, Sample
from data.prepare import held_out_samples, prepare_data
from policy.prepare import prepare_policy, reference_tokenizer
from policy.prompt import chat_prompt

log = logging.getLogger(__name__)


def connect(cfg: Config) -> str:
    """Join the Ray cluster the job runs on, else start a local one sized for the configured actors.

    Inside ``ray job submit`` RAY_ADDRESS is set and we join that cluster; ``cluster.address`` forces an
    address. Otherwise a local Ray starts with logical CPUs for twice the configured actors (room to
    scale; actors time-share the physical cores, their torch thread counts are set per actor).
    """
    if ray.is_initialized():
        return "existing"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=True, namespace=NAMESPACE)
        return address
    c = cfg.cluster
    need = (c.rollout_workers * c.rollout.num_cpus + c.reward_workers * c.reward.num_cpus
            + c.learner_ranks * c.learner.num_cpus)
    # Logical CPUs for twice the configured actors, so `cluster.scale` can grow the pools on this machine.
    ray.init(address="local", num_cpus=max(2 * int(need + 0.999), os.cpu_count() or 1), include_dashboard=False,
             runtime_env=runtime_env(), log_to_driver=True, namespace=NAMESPACE)
    return "local"


def alive_nodes() -> dict[str, str]:
    """The cluster's alive nodes: node id -> address."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


def runtime_env() -> dict:
    """What every actor of the job needs in its environment (the repo on its path, quiet vLLM)."""
    return {"env_vars": {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM's per-request INFO lines drown the progress bar; VLLM_LOGGING_LEVEL=INFO brings them back.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}}


def parity_probe(sample: Sample, policy_path: str, cfg: Config) -> dict:
    """The fixed sequence of the post-sync parity check: a held-out prompt and its reference answer."""
    size, rules = cfg.model.image_size, cfg.reward.rules
    return {"problem": sample.problem, "prompt": chat_prompt(sample.problem, rules), "image": sample.model_image(size),
            "response_ids": reference_tokenizer(policy_path)(sample.reference_answer(size, rules))}


@dataclass
class Job:
    cfg: Config
    out: Path
    policy_path: str
    data: ParquetSource
    eval_samples: list[Sample]
    learners: LearnerGroup
    rollouts: RolloutGroup
    reward_pool: RewardPool
    controller: object
    where: str
    step: int = 0        # the last GRPO step trained
    sft_done: int = 0    # warm-start steps trained
    version: int = 0     # the learner's weight version: one per optimizer step (warm start and GRPO)
    run_id: str | None = None
    pending: RolloutRound | CompletedRound | None = None  # one-step off-policy: the next step's round
    best: dict | None = None  # the best evaluation so far: {"step", "giou", "giou_se"} (eval.keep_best)
    places: list = field(default_factory=list)  # the actors' rows (cluster/topology.py), for cluster.status
    actors: ActorTable = field(default_factory=ActorTable)
    nodes: dict = field(default_factory=dict)   # alive Ray nodes: node id -> address
    events: list = field(default_factory=list)  # node lost, learner restarted, reward pool autoscaled...
    autoscaler: RewardAutoscaler | None = None
    learner_restarts: int = 0
    checkpoint: Path | None = None  # the last one written or restored: where a learner restart goes back to

    @property
    def warm_start_dir(self) -> Path:
        return self.out / "warm_start_policy"

    @property
    def best_dir(self) -> Path:
        return self.out / "best_policy"

    @classmethod
    def start(cls, cfg: Config, resume: str | None = None) -> "Job":
        """Data, policy, Ray and every actor; with ``resume`` ("" = the latest), the checkpoint restored."""
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint.resolve(resume or None, out) if resume is not None else None  # fail before start-up
        log.info("outputs: %s", out.resolve())
        if "runtime_resources" in str(out.resolve()):
            log.warning("train.output_dir is inside the Ray job's temporary working dir; set train.output_dir="
                        "/an/absolute/path (and tracking.mlflow_uri) to keep checkpoints and the MLflow store")
        policy_path = prepare_policy(cfg)
        for warning in check_plan(cfg, policy_path).warnings:  # stops here when the job cannot run
            log.warning("plan: %s (python -m cluster.plan prints the whole plan)", warning)
        train_path, eval_path = prepare_data(cfg)
        eval_samples = held_out_samples(eval_path, cfg.eval.num_samples)

        where = connect(cfg)
        log.info("ray: %s, resources %s", where, ray.cluster_resources())
        controller = start_controller(cfg.cluster.job_name)
        learners = LearnerGroup(cfg, policy_path)
        reward_pool = RewardPool(cfg.reward, cfg.cluster.reward_workers, cfg.cluster.reward.model_dump(),
                                 cfg.cluster.call_timeout_s, startup_timeout_s=cfg.cluster.startup_timeout_s)
        probe = parity_probe(eval_samples[0], policy_path, cfg) if cfg.cluster.sync_parity_check else None
        rollouts = RolloutGroup(cfg, policy_path, reward_pool, cfg.cluster.rollout_workers, probe)
        t0 = time.perf_counter()
        learners.ready()
        rollouts.ready()
        job = cls(cfg, out, policy_path, ParquetSource(train_path, seed=cfg.train.seed, shuffle=cfg.data.shuffle),
                  eval_samples, learners, rollouts, reward_pool, controller, where)
        job.refresh_topology(wait_s=cfg.cluster.startup_timeout_s)
        job.nodes = alive_nodes()
        if cfg.cluster.reward_autoscale.enabled:
            job.autoscaler = RewardAutoscaler(cfg.cluster.reward_autoscale)
        log.info("actors ready in %.1f s on %d node(s); topology:\n%s", time.perf_counter() - t0, len(job.nodes),
                 format_topology(job.places))
        if cfg.reward.mask_iou != "off" and cfg.reward.segmenter == "grabcut":
            log.info("mask reward: OpenCV GrabCut (weight-free stand-in for SAM2; set reward.segmenter=sam2 "
                     "reward.sam2_checkpoint=PATH for production masks)")
        if ckpt is not None:
            job.restore(ckpt)
        return job

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Learner and driver state now; a pending off-policy round is finished and stored with it, so a
        resumed job trains the next step on exactly those answers."""
        pending = self.pending.finish() if self.pending is not None else None
        state = {"step": self.step, "sft_done": self.sft_done, "weight_version": self.version,
                 "data": self.data.state_dict(), "mlflow_run_id": self.run_id, "pending": pending,
                 "versions": sorted(self.rollouts.versions), "best": self.best}
        path = checkpoint.save(self.out, self.run_id, self.step, self.learners.save_checkpoint, state,
                               self.cfg.train.keep_checkpoints)
        self.checkpoint = path
        log.info("checkpoint: %s", path)
        return path

    def restore(self, ckpt: Path) -> None:
        """Learner state from DeepSpeed; driver state (data position, step, RNG, MLflow run, pending round)."""
        self.learners.load_checkpoint(ckpt)
        self.checkpoint = ckpt
        state = checkpoint.load_driver_state(ckpt)
        self.data.load_state_dict(state["data"])
        self.step, self.sft_done, self.run_id = state["step"], state["sft_done"], state["mlflow_run_id"]
        self.version = state["weight_version"]
        self.rollouts.versions = {0, *state.get("versions", ())}  # in-job recovery: later versions are void
        self.best = state.get("best")
        self._forget_best_of_later_steps()
        if state.get("pending") is not None:
            self.pending = CompletedRound(*state["pending"])
        self.rollouts.sync_from(self.learners, self.version)
        log.info("resumed from %s: step %d, warm-start steps %d, MLflow run %s", ckpt, self.step, self.sft_done,
                 self.run_id)
        if self.sft_done >= self.cfg.train.sft_steps > 0:  # past the warm start: its policy is the KL reference
            if self.warm_start_dir.exists():
                self.learners.set_reference(self.warm_start_dir)
            else:
                log.warning("%s is missing: the KL reference is the initial policy", self.warm_start_dir)

    def _forget_best_of_later_steps(self) -> None:
        """After going back to a checkpoint, ``best_dir`` may hold a policy of the steps after it, which
        are redone differently: it is removed unless it is the checkpoint's own best."""
        on_disk = self.best_dir / "best.json"
        saved = json.loads(on_disk.read_text()) if on_disk.exists() else None
        if self.best_dir.exists() and (saved is None or self.best is None or saved.get("step") != self.best["step"]):
            log.warning("%s is from step %s, not the checkpoint's best (step %s): removed (the next evaluations "
                        "choose anew)", self.best_dir, (saved or {}).get("step"), (self.best or {}).get("step"))
            shutil.rmtree(self.best_dir)
            self.best = None
        elif self.best is not None and saved is None:  # the checkpoint's best export is gone
            self.best = None

    def keep_if_best(self, step: int, result: dict) -> bool:
        """Exports the current policy to ``best_dir`` when this evaluation's held-out gIoU beats every
        earlier one (eval.keep_best); returns whether it did."""
        if not (self.cfg.eval.keep_best and result) or (self.best and result["giou_segzero"] <= self.best["giou"]):
            return False
        self.best = {"step": step, "giou": result["giou_segzero"], "giou_se": result["giou_segzero_se"],
                     "rows": result["n"]}
        (self.best_dir / "best.json").unlink(missing_ok=True)  # written last: an export cut short is not kept
        self.learners.export_hf(self.best_dir)
        (self.best_dir / "best.json").write_text(json.dumps(self.best, indent=2))
        log.info("best policy so far: step %d, held-out gIoU %.4f -> %s", step, self.best["giou"], self.best_dir)
        return True

    # -- operating --------------------------------------------------------------------------------
    def apply_scaling(self, step: int) -> None:
        """Operators' requests due by ``step`` (python -m cluster.scale); only while no round is in flight."""
        requested = ray.get(self.controller.take_requests.remote(step), timeout=self.cfg.cluster.call_timeout_s)
        if not requested:
            return
        pool, rollouts = self.reward_pool, self.rollouts
        if requested.get("reward_workers", len(pool.workers)) != len(pool.workers):
            log.info("scaling reward workers %d -> %d", len(pool.workers), requested["reward_workers"])
            pool.resize(requested["reward_workers"])
        if requested.get("rollout_workers", len(rollouts.workers)) != len(rollouts.workers):
            log.info("scaling rollout workers %d -> %d", len(rollouts.workers), requested["rollout_workers"])
            rollouts.resize(requested["rollout_workers"])
        self.refresh_topology()

    def refresh_topology(self, wait_s: float = 0.0) -> None:
        """The actors' rows, as far as they have answered (``wait_s``: wait for all), with queue depths:
        reward groups in flight per worker; rollout chunks in flight per worker (the pending round's)."""
        self.places = self.actors.refresh({"learner": self.learners.ranks, "rollout": self.rollouts.workers,
                                           "reward": [w.actor for w in self.reward_pool.workers]}, wait_s,
                                          replaced={**{w.actor: w.replaced for w in self.reward_pool.workers},
                                                    **{r: self.learner_restarts for r in self.learners.ranks}})
        chunks = [w for _, w in getattr(self.pending, "pending", {}).values()]
        queues = {"reward": [len(w.inflight) for w in self.reward_pool.workers],
                  "rollout": [sum(1 for w in chunks if w is worker) for worker in self.rollouts.workers]}
        for row in self.places:
            if row["role"] in queues and row["index"] < len(queues[row["role"]]):
                row["queue"] = queues[row["role"]][row["index"]]

    def publish(self, step: int, timings: dict) -> None:
        """The job's live state for ``python -m cluster.status``: actors, nodes, the last step's times,
        the autoscaler's last decision, recent events."""
        self.refresh_topology()
        decision = self.autoscaler.last if self.autoscaler else None
        self.controller.publish.remote({
            "step": step, "steps": self.cfg.train.steps, "phase": "grpo", "weight_version": self.version,
            "run": self.cfg.run_name, "mlflow_run_id": self.run_id, "topology": self.places,
            "nodes": [{"node_id": n, "address": a} for n, a in self.nodes.items()],
            "last_step": {k: v for k, v in timings.items() if k.startswith("time/")},
            "autoscale": None if decision is None else vars(decision), "events": self.events[-10:],
            "learner_restarts": self.learner_restarts})

    # -- failures and autoscaling, between steps ---------------------------------------------------
    def event(self, step: int, kind: str, **details) -> None:
        """Logged, counted in MLflow (``cluster/<kind>``: how many so far, at this step) and kept in the
        run's ``events.jsonl`` artifact and in cluster.status."""
        import mlflow

        entry = {"step": step, "kind": kind, "time": time.time(), **details}
        self.events.append(entry)
        log.warning("event at step %d: %s %s", step, kind, details)
        if mlflow.active_run() is not None:
            mlflow.log_metric(f"cluster/{kind}", sum(e["kind"] == kind for e in self.events), step=step)
            mlflow.log_text("\n".join(json.dumps(e, default=str) for e in self.events) + "\n", "events.jsonl")

    def watch_nodes(self, step: int) -> None:
        """Ray nodes lost or added since the last look: an event each (with the actors last seen on a lost
        node; Ray restarts them elsewhere, the pools and rounds redo their work)."""
        alive = alive_nodes()
        for node, address in self.nodes.items():
            if node not in alive:
                on_it = [f"{r['role']} {r['index']}" for r in self.places if r.get("node_id") == node]
                self.event(step, "node_lost", node_id=node, address=address, actors=on_it)
        for node in alive.keys() - self.nodes.keys():
            self.event(step, "node_added", node_id=node, address=alive[node])
        self.nodes = alive

    def autoscale_rewards(self, step: int, metrics: dict) -> dict:
        """cluster.reward_autoscale: one decision from this step's reward tail (cluster/autoscale.py);
        the pool resized at once (groups in flight on a removed worker move). Returns its metrics."""
        if self.autoscaler is None or metrics.get("batch/skipped"):
            return {}
        pool = self.reward_pool
        d = self.autoscaler.decide(len(pool.workers), metrics["time/reward_tail"], metrics["time/step"],
                                   metrics["pool/queued_groups"], metrics["pool/idle_workers"])
        if d.change:
            self.event(step, "reward_autoscale", workers_from=len(pool.workers), workers_to=d.workers, reason=d.reason)
            pool.resize(d.workers)
        return {"autoscale/reward_workers": d.workers, "autoscale/change": d.change,
                "autoscale/tail_fraction": d.tail_fraction}

    def recover_learners(self, lost: LearnerLost) -> None:
        """A learner rank died: the group restarts from this run's latest checkpoint (step, data position,
        weights, optimizer, the pending off-policy round), the rollout workers get its weights, and the
        job goes on in the same MLflow run. Bounded by cluster.max_learner_restarts."""
        limit = self.cfg.cluster.max_learner_restarts
        self.learner_restarts += 1
        if self.learner_restarts > limit:
            raise RuntimeError(f"{lost}; the learner group was restarted {limit} time(s) already "
                               "(cluster.max_learner_restarts)") from lost
        ckpt = self.checkpoint
        if ckpt is None:
            raise RuntimeError(f"{lost}, before this run's first checkpoint: nothing to restart from "
                               "(train.checkpoint_every sets how often one is written)") from lost
        t0, failed_step = time.perf_counter(), self.step
        if isinstance(self.pending, RolloutRound):  # made with weights that are about to be void
            self.pending.abandon()
        self.pending = None
        self.reward_pool.discard_all()  # the failed step's rounds (refills included): their ids come again
        self.reward_pool.stats(reset=True)  # the dropped work counts for no step
        log.warning("%s at step %d; restarting the learner group from %s", lost, failed_step, ckpt)
        while True:
            try:
                self.learners.restart()
                self.restore(ckpt)  # collective weight sync: a new sender, so a new broadcast group
                break
            except Exception as exc:  # noqa: BLE001 - a rank lost again while restarting: again, within the bound
                again = self.learners.lost(exc)
                if again is None:
                    raise
                self.learner_restarts += 1
                if self.learner_restarts > limit:
                    raise RuntimeError(f"{again}, while restarting the learner group; restarted {limit} time(s) "
                                       "already (cluster.max_learner_restarts)") from again
                log.warning("%s while restarting the learner group; restarting it again", again)
        self.refresh_topology()
        self.event(failed_step, "learner_restart", checkpoint=str(ckpt), resumes_at=self.step + 1,
                   steps_redone=failed_step - self.step, seconds=round(time.perf_counter() - t0, 1), cause=str(lost))

    def shutdown(self) -> None:
        """Every actor of the job killed, its placement groups removed; a local Ray stopped."""
        for stop in (self.rollouts.shutdown, self.reward_pool.shutdown, self.learners.shutdown):
            try:
                stop()
            except Exception as exc:  # tearing down must not hide the error that ended the job
                log.warning("shutdown: %s", exc)
        ray.kill(self.controller)
        if self.where == "local":
            ray.shutdown()
