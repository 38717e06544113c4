#!/usr/bin/env python
"""Held-out perplexity of a saved causal LM with and without kNN-LM retrieval, the faiss index comparison, and
decoding latency with the search sequential vs overlapped (lightarch.retrieval.evaluation).

The held-out text is the model's held-out split (lightarch.data.corpus.heldout_texts), cut into the datastore's block
size; lambda and the distance temperature are chosen on the first half of the blocks and the perplexity reported on
the second half. Writes --output_dir (default <model_dir>/retrieval_eval), replaced whole:

    results.json               every number (grid of lambda x temperature, index rows, latency)
    results.md                 the tables
    model_card_section.md      the retrieval section of the model card (template model_cards/retrieval.md)
    perplexity.png, index_comparison.png, latency.png

The index comparison and the latency are timings: run them on a quiet machine (--index_kinds '' and
--latency_tokens 0 skip them).

    python scripts/build_datastore.py --model_dir outputs/sparse_moe
    python scripts/eval_retrieval.py --model_dir outputs/sparse_moe
    python scripts/eval_retrieval.py --model_dir outputs/sparse_moe --index_kinds '' --latency_tokens 0 --max_blocks 16
    python scripts/eval_retrieval.py --model_dir outputs/sparse_moe --qa_model_dir outputs/retrieval_qa   # + factual QA
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class EvalArguments:
    model_dir: str = field(default="outputs/sparse_moe", metadata={"help": "A saved causal LM (scripts/train.py)."})
    datastore: str = field(default="", metadata={"help": "Folder from scripts/build_datastore.py; empty = "
                                                         "<model_dir>/datastore."})
    output_dir: str = field(default="", metadata={"help": "Where to write (new, empty, or an earlier output of this "
                                                          "script); empty = <model_dir>/retrieval_eval."})
    max_eval_files: int = field(default=12, metadata={"help": "Held-out files read."})
    max_blocks: int = field(default=64, metadata={"help": "Held-out blocks evaluated (half tune, half test)."})
    k: int = field(default=64, metadata={"help": "Neighbours per query of kNN-LM."})
    lambdas: str = field(default="0.1,0.25,0.4,0.6", metadata={"help": "Comma-separated lambda values tried."})
    temperatures: str = field(default="auto", metadata={"help": "Comma-separated temperatures, or auto (0.1x, 0.3x, "
                                                                "1x, 3x the median nearest squared distance)."})
    lambda_modes: str = field(default="fixed,distance,entropy", metadata={"help": "Comma-separated lambda modes."})
    index_kinds: str = field(default="flat,hnsw,ivf", metadata={"help": "Indexes compared ('' = skip; a timing): "
                                                                       "faiss's flat / hnsw / ivf, and hnswlib / "
                                                                       "usearch (their HNSW, same M and ef)."})
    index_k: int = field(default=8, metadata={"help": "k of the index comparison's recall@k."})
    max_index_queries: int = field(default=2000, metadata={"help": "Held-out queries of the index comparison."})
    latency_tokens: int = field(default=64, metadata={"help": "Tokens generated per latency run (0 = skip; a "
                                                              "timing)."})
    latency_repeats: int = field(default=7, metadata={"help": "Interleaved latency rounds (one run of each path per round; the overhead is the median of the rounds' paired ratios)."})
    latency_threads: int = field(default=1, metadata={"help": "torch threads for the latency runs (1: on 2 cores the "
                                 "search worker gets the other core; plain decoding at the caller's --num_threads is "
                                 "timed beside it, so the faster baseline is visible)."})
    qa_model_dir: str = field(default="", metadata={"help": "Also measure factual QA: a reader saved by "
                                                            "scripts/train_retrieval_qa.py, re-evaluated (exact "
                                                            "match with and without retrieved passages, written to "
                                                            "<qa_model_dir>/qa_eval) and summarised here; '' = skip."})
    qa_eval_per_kind: int = field(default=500, metadata={"help": "Held-out QA questions per kind (0 = all)."})
    num_threads: int = field(default=0, metadata={"help": "torch threads; 0 = torch's default."})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def _floats(option: str, text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}.") from None


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(EvalArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    import torch
    from lightarch.retrieval.evaluation import (
        check_eval_output_dir,
        evaluate_retrieval,
        save_results,
    )

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    datastore = args.datastore or os.path.join(args.model_dir, "datastore")
    try:
        check_eval_output_dir(args.model_dir, datastore, args.output_dir or None)
        lambdas = _floats("--lambdas", args.lambdas)
        temperatures = None if args.temperatures.strip() == "auto" else _floats("--temperatures", args.temperatures)
        results = evaluate_retrieval(
            args.model_dir, datastore, max_eval_files=args.max_eval_files, max_blocks=args.max_blocks, k=args.k,
            lambdas=lambdas, temperatures=temperatures,
            lambda_modes=[m.strip() for m in args.lambda_modes.split(",") if m.strip()],
            index_kinds=[m.strip() for m in args.index_kinds.split(",") if m.strip()],
            index_k=args.index_k, max_index_queries=args.max_index_queries, latency_tokens=args.latency_tokens,
            latency_repeats=args.latency_repeats, latency_threads=args.latency_threads,
        )
        if args.qa_model_dir:
            from lightarch.retrieval.evaluation import qa_summary
            from lightarch.training.retrieval_qa import evaluate_saved_reader

            results["qa"] = qa_summary(evaluate_saved_reader(args.qa_model_dir,
                                                             eval_per_kind=args.qa_eval_per_kind or None))
    except ValueError as error:
        parser.error(str(error))
    print(save_results(results, args.output_dir or None))


if __name__ == "__main__":
    main()
