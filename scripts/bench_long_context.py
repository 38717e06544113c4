#!/usr/bin/env python
"""Long-context prefill: lightarch's block-local windowed attention against mask-only sliding windows and Mistral.

For each prompt length n (default 1K ... 200K tokens) it measures the wall time and peak memory of one prefill
(`torch.no_grad()`, batch 1, random token ids, `use_cache=True`, `logits_to_keep=1`). Every (variant, n)
measurement runs in a fresh Python process (`python -m lightarch.evaluation.benchmarks.long_context`), so the peak
RSS belongs to that measurement alone; both the absolute peak and the increase over the RSS after model creation are
reported. The measurements: lightarch.evaluation.benchmarks.long_context; the report: long_context_report.

Model families and variants (the same weights within a family, from one seed):

- `hybrid` = `SparseMoeConfig.from_preset("hybrid-long")` (5 sliding : 1 global layer, MoE):
    - `windowed`:  lightarch block-local sliding windows, chunked prefill (`prefill_chunk_size` of the preset);
    - `mask`:      `sliding_window_implementation="mask"` (a full n x n sliding mask, what transformers does),
                   no chunked prefill;
    - `full`:      every layer `"full_attention"` (otherwise as `windowed`: chunked prefill, LSE merge).
- `dense` = the same sizes with dense MLPs and a sliding window on *every* layer: the only layout transformers'
  Mistral can express, so the Mistral comparison is apples to apples:
    - `windowed`, `mask` as above;
    - `mistral`:   `MistralForCausalLM` from `to_transformers` of the `windowed` model (identical weights), sdpa.
- `streaming` = `from_preset("streaming")` (all sliding + attention sinks): peak memory and KV-cache size (tokens
  held after prefill) by n.

Finally the 200K end-to-end run: the hybrid-long preset prefills a 200,000-token prompt and greedily generates 32
tokens with `model.generate`; total seconds, time to first token, decoding tokens/s and peak RSS are reported.

Limits: a run is killed after `--max_seconds_per_run` ("timeout") or when its RSS exceeds `--max_memory_mb`
("OOM"); a variant that failed at some n is not run at larger n, and (unless `--no_predictive_skip`) neither is
one whose time or memory extrapolated from the two previous lengths would exceed the limits ("skipped").

Outputs in --output_dir: results.json, results.md (tables, targets) and results.png (log-log time and memory).

    python scripts/bench_long_context.py --quick          # 1K..8K, ~a few minutes
    python scripts/bench_long_context.py                  # full size, about an hour or more on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768,65536,131072,200000"
QUICK_LENGTHS = "1024,2048,4096,8192"


@dataclass
class BenchArguments:
    lengths: str = field(
        default=DEFAULT_LENGTHS,
        metadata={"help": "Comma-separated prompt lengths in tokens; a 'K' suffix means x1024 (e.g. '1K,32K,200000')."},
    )
    quick: bool = field(
        default=False,
        metadata={"help": f"Short run: lengths {QUICK_LENGTHS} (unless --lengths is given), 1 repeat, and the "
                          "end-to-end generate run at 8192 tokens instead of 200,000."},
    )
    families: str = field(
        default="hybrid,dense,streaming",
        metadata={"help": "Which model families to run, comma-separated, from hybrid, dense, streaming."},
    )
    variants: str = field(
        default="",
        metadata={"help": "Restrict to these family/variant names (comma-separated, e.g. 'dense/windowed,dense/mask'); "
                          "empty runs every variant of the chosen families."},
    )
    config_overrides: str = field(
        default="",
        metadata={"help": "Fields applied to every family's config, 'key=value,key=value' (JSON values), e.g. a tiny "
                          "model 'hidden_size=32,intermediate_size=64,moe_intermediate_size=16,num_attention_heads=2,"
                          "num_key_value_heads=1,vocab_size=128,sliding_window=64,prefill_chunk_size=128'. Changing "
                          "num_hidden_layers re-derives each family's layer_types."},
    )
    generate_length: int = field(
        default=200_000,
        metadata={"help": "Prompt tokens of the end-to-end `generate` run of the hybrid-long preset; 0 skips it."},
    )
    generate_new_tokens: int = field(default=32, metadata={"help": "Tokens generated (greedy) in the end-to-end run."})
    generate_max_seconds: float = field(
        default=3600.0, metadata={"help": "Time limit of the end-to-end run (it includes a 200K-token prefill)."}
    )
    max_seconds_per_run: float = field(
        default=600.0, metadata={"help": "A prefill measurement taking longer is killed and reported as 'timeout'."}
    )
    max_memory_mb: float = field(
        default=0.0,
        metadata={"help": "A measurement whose RSS exceeds this is killed and reported as 'OOM'. 0 = 60%% of the "
                          "memory available when the benchmark starts, at most 12000."},
    )
    no_predictive_skip: bool = field(
        default=False,
        metadata={"help": "Run every length until a real timeout / OOM, instead of skipping a length whose time or "
                          "memory, extrapolated from the two previous lengths (power law), exceeds the limits."},
    )
    repeats: int = field(
        default=3, metadata={"help": "Measurements (separate processes, variants interleaved) per short length; "
                                     "the median time is reported."}
    )
    repeat_up_to: int = field(
        default=8192, metadata={"help": "Lengths above this are measured once (a single run takes long enough)."}
    )
    num_threads: int = field(
        default=0,
        metadata={"help": "torch threads per measurement; 0 = the available CPUs minus the other processes running "
                          "at start (at least 1): on a busy machine, threads that wait for each other at every op "
                          "make small ops hundreds of times slower."},
    )
    isolation: str = field(
        default="subprocess",
        metadata={"help": "'subprocess': each measurement in a fresh process (true peak RSS, enforced limits); "
                          "'inprocess': all in this process (fast, for tests; peak RSS is then not per measurement "
                          "and limits are not enforced).", "choices": ["subprocess", "inprocess"]},
    )
    seed: int = field(default=0, metadata={"help": "Seed for weights and token ids."})
    output_dir: str = field(
        default="outputs/bench_long_context",
        metadata={"help": "Where results.json, results.md, results.png go: a new or empty folder, or an earlier "
                          "output of this script."},
    )
    only_end_to_end: bool = field(
        default=False,
        metadata={"help": "Run only the end-to-end generate measurement and write end_to_end.json into --output_dir "
                          "(a sweep run with --generate_length 0 into the same folder, or --render_only, includes "
                          "it in results.md). Lets the long 200K run go in parallel with the sweep."},
    )
    render_only: bool = field(
        default=False,
        metadata={"help": "Measure nothing: re-render results.md / results.png from results.json (and "
                          "end_to_end.json) in --output_dir."},
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout (examples) kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(BenchArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    from transformers.utils import logging

    from lightarch.evaluation.benchmarks.long_context import (
        parse_overrides,
        run_benchmark,
        run_end_to_end,
        variant_names,
    )
    from lightarch.evaluation.benchmarks.long_context_report import BENCH_SCRIPT, rerender, write_results
    from lightarch.evaluation.passkey import parse_lengths
    from lightarch.training.checkpoints import check_output_dir, prepare_output_dir, write_atomically

    logging.set_verbosity_info()
    generate_length = min(args.generate_length, 8192) if args.quick else args.generate_length
    try:
        if args.render_only:
            print(rerender(args.output_dir))
            return
        overrides = parse_overrides(args.config_overrides)
        check_output_dir(args.output_dir, BENCH_SCRIPT)  # before measuring: the one output-folder rule
        if args.only_end_to_end:
            result = run_end_to_end(overrides, generate_length, args.generate_new_tokens, seed=args.seed,
                                    num_threads=args.num_threads, max_seconds=args.generate_max_seconds,
                                    max_memory_mb=args.max_memory_mb, isolation=args.isolation)
            prepare_output_dir(args.output_dir, BENCH_SCRIPT)
            write_atomically(os.path.join(args.output_dir, "end_to_end.json"), json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=2))
            return
        lengths = parse_lengths(QUICK_LENGTHS if args.quick and args.lengths == DEFAULT_LENGTHS else args.lengths)
        names = variant_names([f.strip() for f in args.families.split(",") if f.strip()],
                              [v.strip() for v in args.variants.split(",") if v.strip()])
    except ValueError as error:
        parser.error(str(error))
    results = run_benchmark(
        lengths, names, overrides, seed=args.seed, num_threads=args.num_threads,
        repeats=1 if args.quick else args.repeats, repeat_up_to=args.repeat_up_to,
        max_seconds_per_run=args.max_seconds_per_run, max_memory_mb=args.max_memory_mb,
        predictive_skip=not args.no_predictive_skip, isolation=args.isolation, end_to_end_length=generate_length,
        end_to_end_new_tokens=args.generate_new_tokens, end_to_end_max_seconds=args.generate_max_seconds,
        output_dir=args.output_dir,
        on_progress=lambda partial: write_results(args.output_dir, partial, with_plot=False),
    )
    print(write_results(args.output_dir, results))


if __name__ == "__main__":
    main()
