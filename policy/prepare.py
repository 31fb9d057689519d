"""The policy a job starts from, and the tokenizer of its reference answers (entry points share these)."""
from __future__ import annotations

import logging
from pathlib import Path

from policy.family import resolve

log = logging.getLogger(__name__)


def prepare_policy(cfg) -> str:
    """model.policy_path, or the tiny embedded Qwen2.5-VL built once into the output dir; its family
    checked against the config and reward.coordinates resolved (policy/family.py ``resolve``)."""
    if cfg.model.policy_path:
        if not Path(cfg.model.policy_path, "config.json").exists():
            raise RuntimeError(f"model.policy_path: no HF checkpoint (config.json) in {cfg.model.policy_path}")
        resolve(cfg, cfg.model.policy_path)
        return cfg.model.policy_path
    from policy.tiny import build_tiny_policy

    m = cfg.model
    path = build_tiny_policy(Path(cfg.train.output_dir) / "tiny_policy", image_size=m.image_size,
                             hidden_size=m.tiny_hidden_size, layers=m.tiny_layers, heads=m.tiny_heads,
                             vision_hidden_size=m.tiny_vision_hidden_size,
                             vision_layers=m.tiny_vision_layers, seed=cfg.train.seed,
                             number_code=m.tiny_number_code, position_reader=m.tiny_position_reader)
    log.info("policy: tiny embedded Qwen2.5-VL at %s (random weights)", path)
    resolve(cfg, path)
    return str(path)


def policies_to_evaluate(cfg, checkpoint: str | None) -> dict[str, str]:
    """evaluate.py / infer.py: {name: HF directory}. --checkpoint alone; else the run's final policy and,
    when kept (eval.keep_best), its best policy; else model.policy_path (or the untrained tiny policy)."""
    if checkpoint:
        if not Path(checkpoint, "config.json").exists():
            raise SystemExit(f"--checkpoint: no HF checkpoint (config.json) in {checkpoint}")
        resolve(cfg, checkpoint)
        return {"checkpoint": checkpoint}
    out = Path(cfg.train.output_dir)
    found = {name: str(out / f"{name}_policy") for name in ("final", "best")
             if (out / f"{name}_policy" / "config.json").exists()}
    if not cfg.model.policy_path and found:
        for path in found.values():
            resolve(cfg, path)
        return found
    return {"initial": prepare_policy(cfg)}


def reference_tokenizer(policy_path: str):
    """text -> token ids of a reference answer followed by the end-of-turn token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_path)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return lambda text: tok.encode(text, add_special_tokens=False) + [end]
