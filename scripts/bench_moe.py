#!/usr/bin/env python
"""Whole-model speed of lightarch's SparseMoe against transformers' Qwen3-MoE and Mixtral with the same weights.

For each architecture a transformers model is built from a small config and converted with `from_transformers`;
their logits must agree before anything is timed. Then the two run alternately (median of `--rounds` runs each):
greedy decoding at each `--decode_batch_sizes`, prefill of each `--prefill_lengths`, and a training step
(forward + backward). The ratio is lightarch's tokens/s over transformers' (> 1: lightarch is faster). Writes
results.json, results.md and results.png; the protocol is lightarch.evaluation.benchmarks.moe's docstring.

    python scripts/bench_moe.py --num_threads 1          # the full run (minutes)
    python scripts/bench_moe.py --quick                  # a smoke test on micro models (seconds)
    python scripts/bench_moe.py --help
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser  # no torch: --help stays fast

# --quick: micro models and counts, so the whole run takes seconds (a smoke test, not a measurement).
QUICK = dict(hidden_size=32, num_hidden_layers=2, num_experts=4, moe_intermediate_size=32, vocab_size=256,
             decode_batch_sizes="1,2", new_tokens=4, prompt_length=8, prefill_lengths="32,64", train_batch_size=2,
             train_seq_len=16, warmup=1, rounds=2)
SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_experts", "top_k", "moe_intermediate_size", "vocab_size",
               "num_attention_heads", "num_key_value_heads", "experts_implementation")


@dataclass
class BenchArguments:
    architectures: str = field(default="qwen3_moe,mixtral",
                               metadata={"help": "Comma-separated: qwen3_moe (Qwen3MoeForCausalLM), mixtral."})
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers (all sparse MoE)."})
    num_experts: int = field(default=8, metadata={"help": "Routed experts per layer."})
    top_k: int = field(default=2, metadata={"help": "Experts per token."})
    moe_intermediate_size: int = field(default=512, metadata={"help": "Hidden units of each expert."})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size."})
    num_attention_heads: int = field(default=4, metadata={"help": "Query heads (head_dim = hidden / heads)."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads."})
    experts_implementation: str = field(default="grouped_mm",
                                        metadata={"help": "Experts kernel of both models: grouped_mm or eager."})
    decode_batch_sizes: str = field(default="1,8", metadata={"help": "Comma-separated decode batch sizes."})
    new_tokens: int = field(default=64, metadata={"help": "Greedy tokens per decode run."})
    prompt_length: int = field(default=16, metadata={"help": "Prompt tokens before decoding."})
    prefill_lengths: str = field(default="512,4096", metadata={"help": "Comma-separated prefill lengths."})
    train_batch_size: int = field(default=4, metadata={"help": "Sequences per training step."})
    train_seq_len: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    warmup: int = field(default=1, metadata={"help": "Untimed runs per model and measurement."})
    rounds: int = field(default=5, metadata={"help": "Timed runs per model and measurement (alternating)."})
    num_threads: int = field(
        default=0, metadata={"help": "torch.set_num_threads value; 0 = the CPUs this process may use minus the other "
                                     "processes running at start (at least 1)."})
    seed: int = field(default=0, metadata={"help": "Seed for weights and inputs."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: micro models and counts (for the sizes and "
                                                         "counts not given), seconds instead of minutes."})
    output_dir: str = field(
        default="outputs/bench_moe",
        metadata={"help": "Where results.json, results.md and results.png go: a new or empty folder, or an earlier "
                          "output of this script."})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def int_list(option: str, text: str) -> list[int]:
    """'1,8' -> [1, 8]; a ValueError naming the option otherwise."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{option} must be comma-separated integers such as 1,8, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line), run the benchmark, write results.{json,md,png}, print the table."""
    parser = HfArgumentParser(BenchArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.quick:  # the micro sizes and counts, except the options given on the command line
        defaults = BenchArguments()
        for name, value in QUICK.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)

    from lightarch.evaluation.benchmarks.moe import prepare_moe_output_dir, run_moe_benchmark, write_moe_results

    try:
        options = dict(
            architectures=[name.strip() for name in args.architectures.split(",") if name.strip()],
            sizes={name: getattr(args, name) for name in SIZE_FIELDS},
            decode_batch_sizes=int_list("decode_batch_sizes", args.decode_batch_sizes),
            prefill_lengths=int_list("prefill_lengths", args.prefill_lengths),
            new_tokens=args.new_tokens, prompt_length=args.prompt_length, train_batch_size=args.train_batch_size,
            train_seq_len=args.train_seq_len, warmup=args.warmup, rounds=args.rounds, num_threads=args.num_threads,
            seed=args.seed,
        )
        if not options["architectures"]:
            raise ValueError("--architectures is empty; give qwen3_moe, mixtral or both (comma-separated)")
        longest = max(options["prefill_lengths"] + [args.prompt_length + args.new_tokens, args.train_seq_len])
        options["sizes"]["max_position_embeddings"] = max(8192, longest)
        prepare_moe_output_dir(args.output_dir)
        results = run_moe_benchmark(**options)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(write_moe_results(args.output_dir, results))


if __name__ == "__main__":
    main()
