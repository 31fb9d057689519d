"""Score responses offline by the rule terms (no images, no segmenter).

    python -m reward.score --in IN.jsonl --out OUT.jsonl [--rules segzero|segzero_soft|multi_object]
        [--coordinates relative_1000 --image-size 840]

Solutions are in pixels of the model's image; answers in the coordinate convention given (pixels by
default; a Qwen3-VL policy's relative 0..1000 ones with ``--coordinates relative_1000`` and the image
size they are relative to, policy/family.py).

Each input line is {"response": str, "solution": str, ...}; each output line is that object plus one
float per rule term and "total" (their sum). A line that is not such an object is reported on stderr
with its line number and skipped; no response text can make this raise.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from policy.family import COORDINATES, pixels_per_unit
from reward import RULE_TERMS, rule_rewards

logger = logging.getLogger("reward.score")


def score_lines(lines, rules: str, pixels_per_unit: float = 1.0):
    """Yield (line number, scored dict or None, error message or None) for each non-blank line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            yield number, None, f"not JSON ({exc})"
            continue
        if not isinstance(row, dict) or not isinstance(row.get("response"), str) \
                or not isinstance(row.get("solution"), str):
            yield number, None, 'expected an object with string fields "response" and "solution"'
            continue
        terms = rule_rewards(rules, row["response"], row["solution"], pixels_per_unit)
        yield number, {**row, **terms, "total": sum(terms.values())}, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reward.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--in", dest="inp", required=True, help="input JSONL: response, solution per line")
    parser.add_argument("--out", required=True, help="output JSONL: input fields + terms + total")
    parser.add_argument("--rules", default="segzero", choices=sorted(RULE_TERMS))
    parser.add_argument("--coordinates", default="pixels", choices=COORDINATES,
                        help="the answers' convention (reward.coordinates)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the model's image size, in pixels (needed with --coordinates relative_1000)")
    args = parser.parse_args(argv)
    if args.coordinates == "relative_1000" and not args.image_size:
        parser.error("--coordinates relative_1000 needs --image-size (the pixels the answers are relative to)")
    unit = pixels_per_unit(args.coordinates, args.image_size or 1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    scored = skipped = 0
    total = 0.0
    # errors="replace": undecodable bytes become U+FFFD inside a line instead of aborting the file.
    with open(args.inp, encoding="utf-8", errors="replace") as src, open(args.out, "w", encoding="utf-8") as dst:
        for number, row, error in score_lines(src, args.rules, unit):
            if error:
                logger.warning("%s:%d: skipped: %s", args.inp, number, error)
                skipped += 1
                continue
            dst.write(json.dumps(row) + "\n")  # ASCII escapes: lone surrogates stay writable
            scored += 1
            total += row["total"]
    mean = total / scored if scored else 0.0
    logger.info("scored %d responses (%s), skipped %d lines, mean total %.4f", scored, args.rules, skipped, mean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
