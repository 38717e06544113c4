#!/usr/bin/env python
"""Export the classifier of a trained safety filter folder (train_safety.py's, which already exports new folders) to
ONNX Runtime: model.onnx (fp32) and model_int8.onnx (int8 dynamic quantization) inside its classifier/ folder.

The fp32 graph must give torch's probabilities within --fp32_tolerance. int8 becomes the default that
SafetyFilter.from_pretrained runs only if every filter decision on the folder's validation split (the split the
thresholds were chosen on) agrees with torch's; otherwise fp32. The agreement is written into
classifier/onnx_classifier.json and printed (recipe: lightarch.safety.onnx_classifier).

    python scripts/export_safety_onnx.py --model_dir outputs/safety
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class ExportSafetyArguments:
    model_dir: str = field(default="outputs/safety", metadata={"help": "A folder written by train_safety.py."})
    int8: bool = field(default=True, metadata={"help": "Also write model_int8.onnx (--no_int8: fp32 only)."})
    split: str = field(default="validation", metadata={"help": "Saved split the decisions are compared on."})
    fp32_tolerance: float = field(default=1e-4, metadata={"help": "Max |p_onnx_fp32 - p_torch| accepted."})
    num_threads: int = field(default=1, metadata={"help": "ONNX Runtime and torch threads for the check."})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(ExportSafetyArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                       return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.num_threads < 1:
        parser.error(f"--num_threads {args.num_threads}: use 1 or more")
    if not 0 < args.fp32_tolerance < 1:
        parser.error(f"--fp32_tolerance {args.fp32_tolerance}: use a value in (0, 1)")

    import logging

    import torch

    from lightarch.safety.onnx_classifier import export_filter_onnx, summarize_agreement

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    torch.set_num_threads(args.num_threads)
    try:
        config = export_filter_onnx(args.model_dir, args.int8, args.num_threads, args.split, args.fp32_tolerance)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # RuntimeError: fp32 beyond --fp32_tolerance
        parser.error(str(error))
    print(f"default: {config['default']}\n{summarize_agreement(config)}")


if __name__ == "__main__":
    main()
