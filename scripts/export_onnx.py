#!/usr/bin/env python
"""Export a saved lightarch decoder to ONNX with its KV cache, quantize it to int8, and check both against torch.

Writes into --output_dir:

    model.onnx, model_int8.onnx       one decoding step each: (input_ids, attention_mask, past keys / values)
                                      -> (logits, present keys / values); prefill is the same graph with empty past
    onnx_decoder.json                 I/O names and cache shapes, read by lightarch.deploy.OrtDecoder
    tokenizer files, config.json      so the folder is self-contained
    report.json, report.md            fp32 max |logits - torch|, int8 greedy agreement with torch fp32 on held-out
                                      prompts, held-out perplexity (torch fp32, ONNX fp32, ONNX int8)

Generation then runs step by step in ONNX Runtime:

    from lightarch.deploy.onnx import OrtDecoder
    decoder = OrtDecoder("outputs/onnx/model_int8.onnx")
    tokens = decoder.generate(tokenizer("def add(", return_tensors="np").input_ids, max_new_tokens=16)

The export goes through torch.onnx (dynamo) on `lightarch.deploy.OnnxDecoderStep`, not transformers' exporter: that
one needs the model's input checks disabled, cannot trace top-p routing (data-dependent shapes), and its expert
matmuls gather weights at run time, which ONNX Runtime's int8 quantization cannot quantize. The script fails with a
message naming the check when fp32 logits differ from torch by more than --fp32_tolerance.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser  # noqa: E402

import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch.deploy.onnx import (
    OrtDecoder,
    check_onnx_exportable,
    compare_onnx_with_torch,
    export_onnx_decoder,
    greedy_agreement,
    onnx_perplexity,
    quantize_onnx_int8,
)
from lightarch.data.corpus import heldout_texts, heldout_token_stream
from lightarch.evaluation.perplexity import perplexity
from lightarch.training.checkpoints import write_atomically  # noqa: E402

logger = logging.getLogger("export_onnx")


@dataclass
class ExportArguments:
    model_dir: str = field(default="outputs/sparse_moe", metadata={"help": "Folder of a saved lightarch causal LM."})
    output_dir: str = field(default="outputs/onnx", metadata={"help": "Where the ONNX files and report are written."})
    opset: int = field(default=18, metadata={"help": "ONNX opset version (>= 18)."})
    int8: bool = field(default=True, metadata={"help": "Also write model_int8.onnx (dynamic int8, --no_int8: skip)."})
    keep_float: str = field(
        default="router",
        metadata={"help": "Comma-separated node groups kept in float in the int8 model: 'router', 'lm_head' or ''."},
    )
    per_channel: bool = field(
        default=True, metadata={"help": "int8 weight scale per output channel (--no_per_channel: one per tensor)."}
    )
    heldout_file: str | None = field(
        default=None,
        metadata={"help": "Held-out text for the checks; default: the held-out files recorded by scripts/train.py "
                          "in model_dir/results.json, else standard-library files."},
    )
    num_prompts: int = field(default=24, metadata={"help": "Held-out prompts for the greedy agreement check."})
    prompt_tokens: int = field(default=32, metadata={"help": "Tokens per held-out prompt."})
    new_tokens: int = field(default=16, metadata={"help": "Greedy tokens generated per prompt."})
    perplexity_blocks: int = field(default=32, metadata={"help": "Held-out blocks for perplexity."})
    block_size: int = field(default=128, metadata={"help": "Tokens per perplexity block."})
    fp32_tolerance: float = field(default=1e-4, metadata={"help": "Max allowed |ONNX fp32 - torch| on logits."})
    num_threads: int = field(default=0, metadata={"help": "ONNX Runtime intra-op threads; 0 = its default."})
    check: bool = field(default=True, metadata={"help": "Run the accuracy checks (--no_check: export only)."})


def check_args(args: ExportArguments) -> list[str]:
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise ValueError(f"--model_dir {args.model_dir} has no config.json; train or save a model there first.")
    if args.opset < 18:
        raise ValueError(f"--opset {args.opset} is not supported: the exporter needs opset >= 18.")
    keep = [k.strip() for k in args.keep_float.split(",") if k.strip()]
    unknown = [k for k in keep if k not in ("router", "lm_head")]
    if unknown:
        raise ValueError(f"--keep_float {args.keep_float!r}: use a comma-separated subset of 'router', 'lm_head'.")
    for name in ("num_prompts", "prompt_tokens", "new_tokens", "perplexity_blocks", "block_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    config = AutoConfig.from_pretrained(args.model_dir)
    check_onnx_exportable(config)
    if args.prompt_tokens + args.new_tokens > config.max_position_embeddings:
        raise ValueError(f"--prompt_tokens + --new_tokens exceed the model's max_position_embeddings "
                         f"({config.max_position_embeddings}).")
    if args.block_size > config.max_position_embeddings:
        raise ValueError(f"--block_size {args.block_size} exceeds max_position_embeddings "
                         f"({config.max_position_embeddings}).")
    return keep


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(ExportArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy, level in (("onnx_ir", logging.WARNING), ("onnxscript", logging.WARNING), ("bitsandbytes", logging.ERROR)):
        logging.getLogger(noisy).setLevel(level)  # per-initializer / per-matmul lines
    keep_float = check_args(args)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    output_dir = Path(args.output_dir)
    staging = output_dir.with_name(f".{output_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    start = time.perf_counter()
    export_onnx_decoder(model, staging / "model.onnx", opset=args.opset)
    export_seconds = time.perf_counter() - start
    kept = (quantize_onnx_int8(staging / "model.onnx", staging / "model_int8.onnx", keep_float, args.per_channel)
            if args.int8 else [])
    tokenizer.save_pretrained(staging)
    model.config.save_pretrained(staging)

    report = {"args": asdict(args), "export_seconds": export_seconds, "int8_float_nodes": kept,
              "fp32_bytes": (staging / "model.onnx").stat().st_size}
    if args.int8:
        report["int8_bytes"] = (staging / "model_int8.onnx").stat().st_size
    if args.check:
        fp32 = OrtDecoder(staging / "model.onnx", args.num_threads)
        diff = compare_onnx_with_torch(model, fp32, model.config.vocab_size)
        report["fp32_max_abs_logit_diff"] = diff
        if diff > args.fp32_tolerance:
            raise RuntimeError(f"ONNX fp32 logits differ from torch by {diff:.3g} > --fp32_tolerance "
                               f"{args.fp32_tolerance}; the export is wrong for this model.")
        texts, source = heldout_texts(args.model_dir, args.heldout_file)
        stream = heldout_token_stream(tokenizer, texts)
        need = args.num_prompts * args.prompt_tokens
        if len(stream) < need:
            raise ValueError(f"The held-out text has {len(stream)} tokens; {need} are needed for the prompts.")
        stride = max(args.prompt_tokens, (len(stream) - args.prompt_tokens) // args.num_prompts)
        prompts = torch.tensor([stream[i * stride : i * stride + args.prompt_tokens] for i in range(args.num_prompts)])
        num_blocks = min(args.perplexity_blocks, len(stream) // args.block_size)
        blocks = torch.tensor(stream[: num_blocks * args.block_size]).view(num_blocks, args.block_size)
        report["heldout"] = {"source": source, "tokens": len(stream), "prompts": args.num_prompts,
                             "perplexity_blocks": num_blocks, "block_size": args.block_size}
        report["perplexity"] = {"torch_fp32": perplexity(model, blocks), "onnx_fp32": onnx_perplexity(fp32, blocks)}
        report["greedy"] = {"onnx_fp32": greedy_agreement(model, fp32, prompts, args.new_tokens)}
        if args.int8:
            int8 = OrtDecoder(staging / "model_int8.onnx", args.num_threads)
            report["perplexity"]["onnx_int8"] = onnx_perplexity(int8, blocks)
            report["greedy"]["onnx_int8"] = greedy_agreement(model, int8, prompts, args.new_tokens)
            report["int8_perplexity_change"] = report["perplexity"]["onnx_int8"] / report["perplexity"]["torch_fp32"] - 1
    write_atomically(staging / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomically(staging / "report.md", render_report(report))
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    logger.info("ONNX decoder written to %s%s", output_dir,
                f"; int8 agreement {report['greedy']['onnx_int8']['token_agreement']:.1%}, perplexity change "
                f"{report['int8_perplexity_change']:+.2%}" if args.check and args.int8 else "")
    return report


def render_report(report: dict) -> str:
    lines = ["# ONNX export", "", "| check | value |", "|---|---|",
             f"| export time | {report['export_seconds']:.1f} s |",
             f"| model.onnx | {report['fp32_bytes'] / 2**20:.2f} MB |"]
    if "int8_bytes" in report:
        lines.append(f"| model_int8.onnx | {report['int8_bytes'] / 2**20:.2f} MB "
                     f"(float nodes kept: {len(report['int8_float_nodes'])}) |")
    if "fp32_max_abs_logit_diff" in report:
        lines.append(f"| fp32 max abs logit diff vs torch | {report['fp32_max_abs_logit_diff']:.2e} |")
        for name, ppl in report["perplexity"].items():
            lines.append(f"| held-out perplexity, {name} | {ppl:.4f} |")
        for name, g in report["greedy"].items():
            lines.append(f"| greedy token agreement with torch fp32, {name} | {g['token_agreement']:.1%} "
                         f"({g['identical_continuations']}/{g['prompts']} continuations identical) |")
        if "int8_perplexity_change" in report:
            lines.append(f"| int8 perplexity change vs torch fp32 | {report['int8_perplexity_change']:+.2%} |")
        lines += ["", f"Held-out data: {report['heldout']['source']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
