"""Evaluate a policy on a split: greedy answers (vLLM) -> segmenter masks -> gIoU / cIoU.

    python evaluate.py --config configs/default.yaml --split PATH [--checkpoint HF_DIR] [--out DIR]
                       [--limit N] [--protocol default|segzero] [section.field=value ...]

Prints a table, writes ``eval.json`` and overlay PNGs to --out (default: <train.output_dir>/eval), and
logs the numbers and pictures to MLflow (experiment ``<tracking.experiment>-eval``). Answers are scored
with the training reward of ``reward.rules`` (evaluation/run.py). Protocols:
- ``default``: both metric conventions under their names: ``lisa`` (empty-empty = 1, ignore pixels
  excluded) and ``segzero`` (empty-empty = 0, ignore pixels counted as target); one mask per prompt.
- ``segzero``: the papers' own evaluation scripts, to the letter (evaluation/protocols.py: Seg-Zero's
  for single-object rules, VisionReasoner's for multi_object): their answer parsing, SAM2's best of
  three masks, samples with an empty prediction on an empty target skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("evaluate")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--split", required=True, help="Parquet file or directory of rows to evaluate")
    p.add_argument("--checkpoint", default=None, help="HF directory of the policy (default: the run's "
                   "<train.output_dir>/final_policy and best_policy, both; else model.policy_path, else the "
                   "untrained tiny policy)")
    p.add_argument("--out", default=None, help="output directory (default: <train.output_dir>/eval)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--overlays", type=int, default=8, help="overlay pictures to write (first N samples)")
    p.add_argument("--protocol", choices=("default", "segzero"), default="default",
                   help="how masks are chosen and counted (see above)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from config import load_config_or_exit
    cfg = load_config_or_exit(args.config, args.overrides)
    if not Path(args.split).exists():
        print(f"--split: not found: {args.split}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out or Path(cfg.train.output_dir) / "eval")
    from policy.prepare import policies_to_evaluate

    policies = policies_to_evaluate(cfg, args.checkpoint)
    results = evaluate(cfg, args.split, policies, out, args.limit, args.overlays, args.protocol)
    for name, result in results.items():
        print(f"\n{name} policy: {result['policy']}\n{format_table(result)}")
    written = results if len(results) > 1 else next(iter(results.values()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(written, indent=2))
    print(f"wrote {out / 'eval.json'} and overlays in {out}")
    if not args.no_mlflow:
        for name, result in results.items():
            log_to_mlflow(cfg, result, args.split, name)
    return 0


def evaluate(cfg, split: str, policies: dict[str, str], out: Path, limit: int | None = None, overlays: int = 8,
             protocol: str = "default") -> dict[str, dict]:
    """{name: result} for each policy (HF directory) on the split. One vLLM engine: the first policy is
    loaded with it, the others' weights are pushed into it (an engine per process)."""
    from safetensors.torch import load_file
    from tqdm import tqdm

    from data.dataset import ParquetSource
    from evaluation.run import evaluate_answers
    from reward.worker import RewardWorker
    from rollout.worker import RolloutWorker

    size = cfg.model.image_size
    source = ParquetSource(split, shuffle=False)
    samples = []
    for sample in source.iter_epoch():
        if limit is not None and len(samples) >= limit:
            break
        samples.append(sample)
    if source.skipped:
        log.warning("skipped rows: %s", dict(source.skipped))
    paths = list(policies.values())
    worker = RolloutWorker(cfg, paths[0], seed=cfg.train.seed)
    scorer = RewardWorker(cfg.reward, segment=True)
    batch = max(1, cfg.rollout.prompts_per_step * cfg.rollout.group_size)
    results = {}
    for version, (name, path) in enumerate(policies.items()):
        if version:
            shards = sorted(Path(path).glob("*.safetensors"))
            worker.update_weights((list(load_file(str(f)).items()) for f in shards), version=version)
        responses, tokens = [], []
        for i in tqdm(range(0, len(samples), batch), desc=f"generate ({name})", unit="batch"):
            chunk = samples[i:i + batch]
            outs = worker.generate([{"sample_id": s.id, "problem": s.problem, "image": s.model_image(size)}
                                    for s in chunk], n=1, greedy=True)
            responses += [o["responses"][0]["text"] if o["responses"] else "" for o in outs]
            tokens += [len(o["responses"][0]["token_ids"]) if o["responses"] else 0 for o in outs]
        result = evaluate_answers(samples, responses, tokens, scorer, size, overlay_dir=out / "overlays" / name,
                                  max_overlays=overlays, protocol=protocol)
        result.update(split=str(split), policy=path, segmenter=cfg.reward.segmenter, rules=cfg.reward.rules)
        results[name] = result
    return results


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
    with mlflow.start_run(run_name=f"eval {Path(split).name} ({name} policy)"):
        mlflow.log_params({"split": split, "policy": result["policy"], "segmenter": result["segmenter"],
                           "protocol": result["protocol"], "rules": result["rules"]})
        mlflow.log_metrics({k: v for k, v in result.items() if isinstance(v, float)})
        for path in result["overlays"]:
            mlflow.log_artifact(path, artifact_path="overlays")


if __name__ == "__main__":
    sys.exit(main())
