#!/usr/bin/env python
"""Forward+backward throughput of lightarch's sparse MoE block against transformers' `Qwen3MoeSparseMoeBlock`.

Variants, all at the same sizes and (for the MoE ones) the same weights: transformers' block with the eager and
grouped_mm experts implementations; lightarch's `SparseMoeBlock` in top-k mode (outputs and gradients checked against
transformers' before anything is timed) and in dynamic top-p mode, each with both implementations; a dense SwiGLU MLP
with the same active parameters per token. Each variant's ratio is its tokens/s over the transformers block with the
same experts implementation; tokens per CPU-second is reported too (steadier on a shared machine). The measurement is
lightarch.evaluation.benchmarks.moe (its docstring tells the protocol).

    python scripts/bench_moe.py                    # defaults: about a minute on 2 idle CPU cores
    python scripts/bench_moe.py --help
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers.hf_argparser import HfArgumentParser  # no torch: --help stays fast

BLOCK_FIELDS = ("hidden_size", "moe_intermediate_size", "num_experts", "top_k", "norm_topk_prob", "router_top_p",
                "max_experts_per_token")


@dataclass
class BenchArguments:
    hidden_size: int = field(default=256, metadata={"help": "Model width (input/output size of every block)."})
    moe_intermediate_size: int = field(default=512, metadata={"help": "Hidden units of each expert's SwiGLU MLP."})
    num_experts: int = field(default=8, metadata={"help": "Number of routed experts."})
    top_k: int = field(default=2, metadata={"help": "Experts per token in top-k mode (num_experts_per_tok)."})
    norm_topk_prob: bool = field(default=True, metadata={"help": "Renormalise the top-k routing weights."})
    router_top_p: float = field(
        default=0.5, metadata={"help": "top_p mode: take experts until their probability mass reaches this."}
    )
    max_experts_per_token: int = field(default=4, metadata={"help": "top_p mode: at most this many experts a token."})
    router_std: float = field(
        default=0.1,
        metadata={
            "help": "Std of the random router weights. Larger gives peakier (more trained-like) routing, hence fewer "
            "experts per token in top_p mode; near 0 every expert looks equally likely."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence (a step has batch_size * seq_len)."})
    dtype: str = field(
        default="float32", metadata={"help": "Weights and activations dtype: float32, bfloat16 or float16."}
    )
    warmup: int = field(default=2, metadata={"help": "Untimed forward+backward steps per variant before timing."})
    rounds: int = field(default=7, metadata={"help": "Timed rounds, every variant in each (interleaved)."})
    iters_per_round: int = field(
        default=4, metadata={"help": "Timed forward+backward steps per variant per round; tokens/s uses the median."}
    )
    num_threads: int = field(
        default=0,
        metadata={
            "help": "torch.set_num_threads value. 0 = auto: the CPUs this process may use minus the other processes "
            "running at start (at least 1), since OpenMP threads competing with other work for a core stall badly."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for weights and inputs."})
    output_dir: str = field(
        default="outputs/bench_moe",
        metadata={"help": "Where results.json and results.md are written: a new or empty folder, or an earlier "
                          "output of this script."},
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line), run the benchmark, write results.{json,md}, print the table."""
    parser = HfArgumentParser(BenchArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    from lightarch.evaluation.benchmarks.moe import (
        block_config,
        check_moe_options,
        prepare_moe_output_dir,
        run_moe_benchmark,
        write_moe_results,
    )

    options = asdict(args)
    output_dir = Path(options.pop("output_dir"))
    try:
        config = block_config(**{name: options.pop(name) for name in BLOCK_FIELDS})
        check_moe_options(args.dtype, args.batch_size, args.seq_len, args.rounds, args.iters_per_round)
        prepare_moe_output_dir(output_dir)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    results = run_moe_benchmark(config, **options)
    print(write_moe_results(output_dir, results))


if __name__ == "__main__":
    main()
