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
message naming the check when fp32 logits differ from torch by more than --fp32_tolerance. The work is
lightarch.deploy.onnx.export_onnx_folder.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field

from transformers.hf_argparser import HfArgumentParser  # no torch: --help stays fast


@dataclass
class ExportArguments:
    model_dir: str = field(default="outputs/sparse_moe", metadata={"help": "Folder of a saved lightarch causal LM."})
    output_dir: str = field(
        default="outputs/onnx",
        metadata={"help": "Where the ONNX files and report are written: a new or empty folder, or an earlier output "
                          "of this script (it is replaced); never --model_dir."},
    )
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(ExportArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    from lightarch.deploy.onnx import check_export_options, export_onnx_folder

    options = asdict(args)
    options["keep_float"] = [k.strip() for k in args.keep_float.split(",") if k.strip()]
    try:
        check_export_options(args.model_dir, args.opset, options["keep_float"], args.num_prompts, args.prompt_tokens,
                             args.new_tokens, args.perplexity_blocks, args.block_size, args.output_dir)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy, level in (("onnx_ir", logging.WARNING), ("onnxscript", logging.WARNING), ("bitsandbytes", logging.ERROR)):
        logging.getLogger(noisy).setLevel(level)  # per-initializer / per-matmul lines
    report = export_onnx_folder(**options)
    int8 = (f"; int8 agreement {report['greedy']['onnx_int8']['token_agreement']:.1%}, perplexity change "
            f"{report['int8_perplexity_change']:+.2%}" if args.check and args.int8 else "")
    logging.getLogger("export_onnx").info("ONNX decoder written to %s%s", args.output_dir, int8)


if __name__ == "__main__":
    main()
