"""Evaluate a policy on one or several splits: answers (vLLM) -> segmenter masks -> gIoU / cIoU.

    python evaluate.py --config configs/default.yaml (--split PATH | --splits NAME=PATH[,NAME=PATH...])
                       [--checkpoint HF_DIR] [--out DIR] [--limit N] [--protocol default|segzero]
                       [--samples K --vote majority|agreement] [section.field=value ...]

Prints a table per split and policy, writes ``eval.json`` (``--splits``: {split: {policy: result}}, one
summary) and overlay PNGs to --out (default: <train.output_dir>/eval), and logs each split to MLflow under
its name (experiment ``<tracking.experiment>-eval``), with the decoding settings (greedy or temperature,
max new tokens, K, vote, batch, seed) as params and in the JSON. Answers are scored with the training
reward of ``reward.rules`` (evaluation/run.py). Protocols:
- ``default``: both metric conventions under their names: ``lisa`` (empty-empty = 1, ignore pixels
  excluded) and ``segzero`` (empty-empty = 0, ignore pixels counted as target); one mask per prompt.
- ``segzero``: the papers' own evaluation scripts, to the letter (evaluation/protocols.py: Seg-Zero's
  for single-object rules, VisionReasoner's for multi_object): their answer parsing, SAM2's best of
  three masks, samples with an empty prediction on an empty target skipped.
Test-time scaling: ``--samples K`` (default 1: one greedy answer) samples K answers per prompt at
``rollout.temperature`` (seed ``train.seed``) and ``--vote`` makes one prediction of them
(evaluation/voting.py: ``majority``, the pixel vote of the K masks; ``agreement``, the answer whose
mask agrees most with the others'). ``majority`` needs ``--protocol default``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

from evaluation.voting import VOTES

log = logging.getLogger("evaluate")


def parse_splits(split: str | None, splits: str | None) -> tuple[dict[str, str], str | None]:
    """{name: path} from --split PATH (named by its file) or --splits NAME=PATH,...; or an error line."""
    pairs = [(Path(split).resolve().stem or "split", split)] if split is not None else [
        tuple(item.split("=", 1)) if "=" in item else (item, "") for item in splits.split(",") if item]
    named = dict(pairs)
    if not named or len(named) != len(pairs) or any(not n or not p for n, p in pairs):
        return {}, f"--splits: expected NAME=PATH[,NAME=PATH...] with distinct names, got {splits!r}"
    missing = [p for p in named.values() if not Path(p).exists()]
    if missing:
        return {}, f"--split{'s' if splits else ''}: not found: {', '.join(missing)}"
    return named, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--split", help="Parquet file or directory of rows to evaluate")
    which.add_argument("--splits", help="several splits, NAME=PATH[,NAME=PATH...], each reported under its name")
    p.add_argument("--checkpoint", default=None, help="HF directory of the policy (default: the run's "
                   "<train.output_dir>/final_policy and best_policy, both; else model.policy_path, else the "
                   "untrained tiny policy)")
    p.add_argument("--out", default=None, help="output directory (default: <train.output_dir>/eval)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--overlays", type=int, default=8, help="overlay pictures to write (first N samples)")
    p.add_argument("--protocol", choices=("default", "segzero"), default="default",
                   help="how masks are chosen and counted (see above)")
    p.add_argument("--samples", type=int, default=1, help="answers per prompt (1: greedy; K > 1: sampled at "
                   "rollout.temperature and voted)")
    p.add_argument("--vote", choices=VOTES, default="majority", help="how K > 1 answers make one prediction")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from config import load_config_or_exit
    cfg = load_config_or_exit(args.config, args.overrides)
    splits, error = parse_splits(args.split, args.splits)
    if error is None and args.limit is not None and args.limit < 0:
        error = f"--limit: must be 0 or more, got {args.limit}"
    if error is None and args.samples < 1:
        error = f"--samples: must be at least 1, got {args.samples}"
    if error is None and args.samples > 1 and args.vote == "majority" and args.protocol == "segzero":
        error = "--vote majority: needs --protocol default (the segzero scripts segment each answer themselves)"
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out or Path(cfg.train.output_dir) / "eval")
    from policy.prepare import policies_to_evaluate

    policies = policies_to_evaluate(cfg, args.checkpoint)
    results = evaluate(cfg, splits, policies, out, args.limit, args.overlays, args.protocol, args.samples, args.vote)
    for split, per_policy in results.items():
        for name, result in per_policy.items():
            print(f"\n{split}: {name} policy: {result['policy']}\n{format_table(result)}")
    if args.splits is None:  # one split: as before, {policy: result}, or the result alone for one policy
        (per_policy,) = results.values()
        written = per_policy if len(per_policy) > 1 else next(iter(per_policy.values()))
    else:
        written = results
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(written, indent=2))
    print(f"wrote {out / 'eval.json'} and overlays in {out}")
    if not args.no_mlflow:
        for split, per_policy in results.items():
            for name, result in per_policy.items():
                log_to_mlflow(cfg, result, split, name)
    return 0


def evaluate(cfg, splits: dict[str, str], policies: dict[str, str], out: Path, limit: int | None = None,
             overlays: int = 8, protocol: str = "default", samples: int = 1, vote: str = "majority") -> dict:
    """{split: {policy: result}} for each policy (HF directory) on each split. One vLLM engine: the first
    policy is loaded with it, the others' weights are pushed into it (an engine per process)."""
    from safetensors.torch import load_file

    from data.dataset import ParquetSource
    from reward.worker import RewardWorker
    from rollout.worker import RolloutWorker

    rows = {}
    for split, path in splits.items():
        source = ParquetSource(path, shuffle=False)
        rows[split] = list(itertools.islice(source.iter_epoch(), limit))
        if source.skipped:
            log.warning("%s: skipped rows: %s", split, dict(source.skipped))
    paths = list(policies.values())
    worker = RolloutWorker(cfg, paths[0], seed=cfg.train.seed)
    scorer = RewardWorker(cfg.reward, segment=True)
    r = cfg.rollout
    decoding = {"greedy": samples == 1, "temperature": 0.0 if samples == 1 else r.temperature,
                "max_new_tokens": r.max_new_tokens, "samples": samples, "vote": vote if samples > 1 else None,
                "prompts_per_batch": max(1, r.prompts_per_step * r.group_size // samples), "seed": cfg.train.seed}
    results = {split: {} for split in splits}
    for version, (name, path) in enumerate(policies.items()):
        if version:
            shards = sorted(Path(path).glob("*.safetensors"))
            worker.update_weights((list(load_file(str(f)).items()) for f in shards), version=version)
        for split, chunk in rows.items():
            result = evaluate_split(cfg, worker, scorer, chunk, decoding, out / "overlays" / split / name,
                                    overlays, protocol, f"{split}, {name}")
            result.update(split=str(splits[split]), split_name=split, policy=path, segmenter=cfg.reward.segmenter,
                          rules=cfg.reward.rules, decoding=decoding)
            results[split][name] = result
    return results


def evaluate_split(cfg, worker, scorer, samples: list, decoding: dict, overlay_dir: Path, overlays: int,
                   protocol: str, label: str) -> dict:
    """One policy on one split's samples: ``decoding["samples"]`` answers per prompt (one greedy, or K
    sampled and voted), then evaluation/run.py's metrics."""
    from tqdm import tqdm

    from evaluation.run import evaluate_answers
    from evaluation.voting import vote
    from reward.worker import reward_group

    size, k, batch = cfg.model.image_size, decoding["samples"], decoding["prompts_per_batch"]
    responses, tokens, masks = [], [], []
    for i in tqdm(range(0, len(samples), batch), desc=f"generate ({label})", unit="batch"):
        chunk = samples[i:i + batch]
        outs = worker.generate([{"sample_id": s.id, "problem": s.problem, "image": s.model_image(size)} for s in chunk],
                               n=k, greedy=k == 1, seed=None if k == 1 else decoding["seed"] + i)
        for sample, out in zip(chunk, outs):
            answers = out["responses"] or [{"text": "", "token_ids": []}]
            pick = 0
            if k > 1:
                texts = [a["text"] for a in answers]
                _, preds = scorer.score_group(reward_group(sample, texts, cfg.reward.rules, size), with_masks=True)
                pick, mask = vote(preds, (sample.height, sample.width), decoding["vote"])
                masks.append(mask)
            responses.append(answers[pick]["text"])
            tokens.append(len(answers[pick]["token_ids"]))
    return evaluate_answers(samples, responses, tokens, scorer, size, overlay_dir=overlay_dir, max_overlays=overlays,
                            protocol=protocol, masks=masks if k > 1 else None)


def format_table(result: dict) -> str:
    rows = [("protocol / convention", "gIoU", "cIoU")]
    if result["protocol"] == "segzero":
        script = "VisionReasoner's" if result["rules"] == "multi_object" else "Seg-Zero's"
        rows.append((f"segzero protocol ({script} script: {result['scored']} scored, {result['skipped']} skipped)",
                     f"{result['giou']:.4f}", f"{result['ciou']:.4f}"))
    for name, note in (("lisa", "empty-empty=1, ignore excluded"), ("segzero", "empty-empty=0, ignore counted")):
        rows.append((f"{name} ({note})", f"{result[f'giou_{name}']:.4f} +- {result[f'giou_{name}_se']:.4f}",
                     f"{result[f'ciou_{name}']:.4f}"))
    w = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{w}}  {r[1]:>16}  {r[2]:>7}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"samples {result['n']}, parse failures {result['parse_failure_rate']:.1%}, "
                 f"mean response {result['response_tokens_mean']:.1f} tokens, reward {result['reward']:.3f} "
                 f"({result['rules']}), segmenter {result['segmenter']}")
    return "\n".join(lines)


def log_to_mlflow(cfg, result: dict, split: str, name: str) -> None:
    import mlflow

    from cluster.tracking import use_experiment

    use_experiment(cfg, f"{cfg.tracking.experiment}-eval")
    with mlflow.start_run(run_name=f"eval {split} ({name} policy)"):
        mlflow.log_params({"split": split, "split_path": result["split"], "policy": result["policy"],
                           "segmenter": result["segmenter"], "protocol": result["protocol"], "rules": result["rules"],
                           **{f"decoding.{k}": v for k, v in result["decoding"].items()}})
        mlflow.log_metrics({k: v for k, v in result.items() if isinstance(v, float)})
        for path in result["overlays"]:
            mlflow.log_artifact(path, artifact_path="overlays")


if __name__ == "__main__":
    sys.exit(main())
