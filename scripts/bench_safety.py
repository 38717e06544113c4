#!/usr/bin/env python
"""Per-prompt latency of a trained safety filter: rules alone, the classifier alone (torch, ONNX Runtime fp32 and
int8) and rules + classifier, on held-out prompts of varied length, at --num_threads threads (1 for issue 15's
target: p95 <= 10 ms for rules + classifier). torch is the baseline, measured in the same run. Writes results.json,
results.md and results.png (the latency distributions); the protocol is
lightarch.evaluation.benchmarks.safety_latency's docstring.

    python scripts/train_safety.py --output_dir outputs/safety     # exports the classifier to ONNX too
    python scripts/bench_safety.py --model_dir outputs/safety       # the measurement (a quiet machine)
    python scripts/bench_safety.py --model_dir outputs/safety --num_prompts 4 --rounds 1 --warmup 1 \\
        --output_dir /tmp/bench_safety_smoke                          # a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser  # no torch: --help stays fast

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class BenchSafetyArguments:
    model_dir: str = field(default="outputs/safety",
                           metadata={"help": "A filter folder written by train_safety.py, with its ONNX export."})
    output_dir: str = field(default="outputs/bench_safety",
                            metadata={"help": "Where results.json, results.md and results.png go: a new or empty "
                                              "folder, or an earlier output of this script."})
    num_prompts: int = field(default=300, metadata={"help": "Held-out prompts, spread over the length range."})
    rounds: int = field(default=3, metadata={"help": "Timed passes over the prompts per variant."})
    warmup: int = field(default=10, metadata={"help": "Untimed calls per variant before its timed block."})
    num_threads: int = field(default=1, metadata={"help": "torch and ONNX Runtime intra-op threads."})
    split: str = field(default="test", metadata={"help": "Saved split the prompts come from (test: held out)."})
    deobfuscate: bool = field(default=False, metadata={
        "help": "Also time DeobfuscatingFilter.check (the filter with the export's ONNX variant, plus its "
                "de-obfuscated views: what serve.py screens with by default) as filter_onnx_<variant>_deobfuscating."})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    """Parse `argv`, run the benchmark, write results.{json,md,png}, print the table."""
    parser = HfArgumentParser(BenchSafetyArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    from lightarch.evaluation.benchmarks.safety_latency import (
        prepare_safety_output_dir,
        run_safety_latency,
        write_safety_latency,
    )

    try:
        folder = prepare_safety_output_dir(args.output_dir, args.model_dir)
        results, times = run_safety_latency(args.model_dir, args.num_prompts, args.rounds, args.warmup,
                                            args.num_threads, args.split, args.deobfuscate)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(write_safety_latency(folder, results, times))


if __name__ == "__main__":
    main()
