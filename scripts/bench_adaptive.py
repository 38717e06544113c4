#!/usr/bin/env python
"""Benchmark an adaptive-depth model (from scripts/train_adaptive.py) on its held-out easy / hard test questions (the
measurements: lightarch.evaluation.benchmarks.adaptive_depth).

For each split: exact-match accuracy and mean layers per token of full depth, the estimator policy (whole-input
routing) and the confidence policy (per-token early exit, CALM) at the calibrated thresholds in the model's config;
the wall time of batch-1 greedy decoding as a ratio to full depth (generate, a bare forward loop, and self-speculative
decoding), from interleaved rounds; the accuracy-compute curves as the threshold moves; and whether the issue's
targets are met on every model (estimator on easy: >= 70% fewer layers within 0.5 point of full depth and generate in
<= 0.5x its time; hard: within 0.5 point; confidence on easy: >= 35% fewer layers run within 1 point). Given several
model folders (one per training seed), it reports each seed, the mean, the spread and the worst seed.

Writes results.json, results.md and curves.png into --output_dir (atomically: a temporary folder, then rename).

    python scripts/bench_adaptive.py                          # reads outputs/adaptive_depth
    python scripts/bench_adaptive.py --model_dir outputs/quick --timing_examples 50
    python scripts/bench_adaptive.py --model_dir outputs/adaptive_seed0 outputs/adaptive_seed1 outputs/adaptive_seed2
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class BenchArguments:
    model_dir: list[str] = field(
        default_factory=lambda: ["outputs/adaptive_depth"],
        metadata={"help": "One or more folders written by scripts/train_adaptive.py (each needs its heldout.json), "
                          "e.g. one per training seed: the results then give every seed's figures, their mean, spread "
                          "and worst seed."},
    )
    output_dir: str = field(
        default="outputs/bench_adaptive",
        metadata={"help": "Where results are written (replaced): a new or empty folder, or an earlier output of this "
                          "script; never --model_dir."},
    )
    threshold_steps: int = field(default=41, metadata={"help": "Evenly spaced thresholds in [0, 1] for the curves "
                                                       "(plus a few between 0.9 and 0.99999)."})
    timing_examples: int = field(default=150, metadata={"help": "Questions per split timed with generate (batch 1)."})
    timing_rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds; each (question, variant) "
                                                    "keeps its fastest round."})
    num_threads: int = field(default=1, metadata={"help": "torch threads (1 is steadiest on a shared CPU; 0: torch's "
                                                  "default)."})
    batch_size: int = field(default=256, metadata={"help": "Batch size of the teacher-forced measurements."})
    seed: int = field(default=0, metadata={"help": "Seed of the timing subset."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(BenchArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.num_threads < 0:
        parser.error(f"--num_threads must be >= 0 (0: torch's default), got {args.num_threads}.")

    import torch

    from lightarch.evaluation.benchmarks.adaptive_depth import bench_adaptive_depth, check_bench_options, markdown

    try:
        check_bench_options(args.model_dir, args.threshold_steps, args.timing_examples, args.timing_rounds,
                            args.batch_size, args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    results = bench_adaptive_depth(args.model_dir, args.output_dir, args.threshold_steps, args.timing_examples,
                                   args.timing_rounds, args.batch_size, args.seed, show_progress=not args.disable_tqdm)
    print(markdown(results))


if __name__ == "__main__":
    main()
