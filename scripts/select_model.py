#!/usr/bin/env python
"""Which lightarch model fits: the article's model-selection matrix filled from measured results (the library:
lightarch.evaluation.selection).

Reads the results.json files of the benchmarks and training runs (bench_inference: latency p50 / p95, throughput,
memory, parameters; bench_adaptive, else train_adaptive's calibration: factual accuracy; eval_multimodal, else
train_multimodal: modality alignment error), found under --results (default outputs/). Fills the matrix with pass / fail per
scenario (realtime: latency p50 < 200 ms; reasoning: factual accuracy > 95%; multimodal: alignment error < 0.1);
what no file measured is shown as not measured, never estimated. With --scenario and / or constraints it recommends
a model. Writes results.json, results.md and matrix.png (latency / accuracy plane, thresholds drawn) into
--output_dir.

    python scripts/select_model.py                                  # the matrix of everything under outputs/
    python scripts/select_model.py --scenario realtime --max_latency_ms 200 --max_memory_mb 100
    python scripts/select_model.py --results outputs/bench_inference,outputs/bench_adaptive --min_accuracy 0.95
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser


@dataclass
class SelectArguments:
    results: str = field(default="outputs", metadata={"help": "Comma-separated results.json files or folders "
                                                      "searched for them."})
    output_dir: str = field(default="outputs/select_model", metadata={
        "help": "Where results.json, results.md and matrix.png go: a new or empty folder, or an earlier output of "
                "this script."})
    scenario: str = field(default=None, metadata={"help": "realtime, reasoning or multimodal: recommend a model "
                                                  "that passes its threshold."})
    max_latency_ms: float = field(default=None, metadata={"help": "Only models with latency p50 <= this."})
    min_accuracy: float = field(default=None, metadata={"help": "Only models with factual accuracy >= this "
                                                        "(a fraction: 0.95)."})
    max_memory_mb: float = field(default=None, metadata={"help": "Only models whose measured memory (MiB) is "
                                                         "<= this."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(SelectArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lightarch.evaluation.selection import select_model

    paths = [p.strip() for p in args.results.split(",") if p.strip()]
    try:
        output = select_model(paths, args.output_dir, args.scenario, args.max_latency_ms, args.min_accuracy,
                              args.max_memory_mb)
    except ValueError as error:
        parser.error(str(error))
    print(output["markdown"])


if __name__ == "__main__":
    main()
