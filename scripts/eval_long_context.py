#!/usr/bin/env python
"""Passkey retrieval accuracy of a saved model by context length x key depth (lightarch.evaluation.passkey).

For every (length, depth) cell, --samples prompts of exactly `length` tokens hide a random 5-digit key at `depth`
of the filler; the model generates 5 tokens greedily (`generate`, with the model's chunked prefill keeping memory
bounded), and a prompt counts as correct only if all five digits match. Writes to --output_dir (default
<model>/long_context_eval):

    results.json   every cell: exact-match and per-digit accuracy, achieved depth, each prediction
    results.md     the accuracy table and a one-line verdict on generalisation beyond the training length
    heatmap.png    accuracy by length x depth, annotated, the training length marked

    python scripts/eval_long_context.py                                  # outputs/passkey, 1K..32K x 5 depths
    python scripts/eval_long_context.py --model outputs/passkey --lengths 1K,64K --samples 10
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class EvalArguments:
    model: str = field(default="outputs/passkey", metadata={"help": "Folder saved by scripts/train_passkey.py."})
    lengths: str = field(
        default="1K,2K,4K,8K,16K,32K",
        metadata={"help": "Comma-separated prompt lengths in tokens; 'K' means x1024."},
    )
    depths: str = field(default="0,0.25,0.5,0.75,1.0", metadata={"help": "Comma-separated key depths in [0, 1]."})
    samples: int = field(default=5, metadata={"help": "Prompts per (length, depth) cell."})
    distractors: int = field(
        default=0,
        metadata={"help": "Other 5-digit numbers hidden in each prompt's filler ('The sky is 40817.'): the model must "
                  "return the one after 'pass key', not the only digits it sees."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the prompts (keys and filler start)."})
    max_batch_tokens: int = field(
        default=65536, metadata={"help": "Prompt tokens per generate call (prompts of a cell are batched)."}
    )
    train_length: int = field(
        default=0,
        metadata={"help": "Longest training length, marked on the heatmap and used in the verdict; 0 = read it "
                          "from the model folder's results.json (data.max_length)."},
    )
    good_accuracy: float = field(default=0.9, metadata={"help": "Accuracy the verdict calls 'works' (0..1)."})
    num_threads: int = field(
        default=0, metadata={"help": "torch threads; 0 = the available CPUs minus the other running processes."}
    )
    output_dir: str = field(
        default="",
        metadata={"help": "Where to write (a new or empty folder, or an earlier output of this script, which is "
                          "replaced; never --model); empty = <model>/long_context_eval (with --distractors N: "
                          "<model>/long_context_eval_distractorsN), and without distractors the accuracy table also "
                          "goes into the model card (<model>/README.md, between its long-context-eval markers)."},
    )
    merge: str = field(
        default="",
        metadata={"help": "Evaluate nothing: merge the results.json of these comma-separated folders (shards of one "
                          "grid run in parallel, e.g. one per length or depth) into --output_dir. A cell measured in "
                          "several shards pools its prompts."},
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout (examples) kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(EvalArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    import torch

    from lightarch.evaluation.passkey import (
        check_results_dir,
        evaluate_passkey_folder,
        merge_result_folders,
        parse_depths,
        parse_lengths,
        save_results,
    )
    from lightarch.training.cli import available_cpus, other_running_processes

    torch.set_num_threads(args.num_threads or max(1, available_cpus() - other_running_processes()))
    try:
        if args.merge:
            shards = [part.strip() for part in args.merge.split(",") if part.strip()]
            results = merge_result_folders(shards, args.good_accuracy)
            check_results_dir(results["model"], args.output_dir or None, results["arguments"].get("distractors", 0),
                              shards)
        else:
            check_results_dir(args.model, args.output_dir or None, args.distractors)
            results = evaluate_passkey_folder(
                args.model, parse_lengths(args.lengths), parse_depths(args.depths), args.samples, seed=args.seed,
                distractors=args.distractors, max_batch_tokens=args.max_batch_tokens,
                train_length=args.train_length or None, good_accuracy=args.good_accuracy,
            )
    except ValueError as error:
        parser.error(str(error))
    print(save_results(results, args.output_dir or None))


if __name__ == "__main__":
    main()
