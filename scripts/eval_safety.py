#!/usr/bin/env python
"""Measure a trained safety filter on its test split (never used for training or threshold choice): harmful prompts
blocked, false refusals on benign look-alikes and ordinary prompts, per-category precision / recall, threshold curve.

Writes eval.json, eval.md and eval_per_category.png / eval_threshold_curve.png beside the filter in --model_dir
(or into --output_dir). --rules_only measures the rules engine without the classifier.

    python scripts/eval_safety.py --model_dir outputs/safety
    python scripts/eval_safety.py --model_dir outputs/safety --rules_only
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class SafetyEvalArguments:
    model_dir: str = field(default="outputs/safety", metadata={"help": "A folder written by train_safety.py."})
    output_dir: str = field(default="", metadata={"help": "Where to write eval.*; empty: --model_dir."})
    split: str = field(default="test", metadata={"help": "Which saved split to measure: test or validation."})
    rules_only: bool = field(default=False, metadata={"help": "Measure the rules engine alone (no classifier)."})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(SafetyEvalArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                       return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.split not in ("test", "validation"):
        parser.error(f"--split {args.split!r}: use test or validation")

    import json
    from pathlib import Path

    from lightarch.safety.evaluation import evaluate_filter, plot_results, results_table
    from lightarch.safety.filter import SafetyFilter
    from lightarch.safety.recipe import load_splits
    from lightarch.training.checkpoints import write_atomically

    try:
        splits = load_splits(args.model_dir)
        safety = SafetyFilter.from_pretrained(args.model_dir)
    except FileNotFoundError as error:
        parser.error(str(error))
    if args.rules_only:
        safety.classifier = None
    results = evaluate_filter(safety, splits[args.split])
    out = Path(args.output_dir or args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "eval_rules_only" if args.rules_only else "eval"
    write_atomically(out / f"{prefix}.json", json.dumps(results, indent=1))
    write_atomically(out / f"{prefix}.md", results_table(results) + "\n")
    for name, png in plot_results(results).items():
        write_atomically(out / f"{prefix}_{name}", png)
    print(results_table(results))


if __name__ == "__main__":
    main()
