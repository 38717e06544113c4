#!/usr/bin/env python
"""Fine-tune a saved lightarch model with LoRA (or QLoRA: a 4-bit base) on a text file, and save the adapter.

The model folder must hold a lightarch causal LM and its tokenizer (what scripts/train.py writes). LoRA adapts the
groups given by --targets (attention projections, dense MLPs, shared experts, routed experts; never the router, see
lightarch.deploy.peft). Without --text_file it trains on a few paragraphs of English prose. It writes into --output_dir:

    adapter_model.safetensors, adapter_config.json     the adapter (PeftModel.from_pretrained(base, output_dir))
    results.json, results.md                           held-out perplexity before / after, trainable parameters
    checkpoint-<step>/                                 Trainer checkpoints (--save_steps, --resume_from_checkpoint)
    merged/                                            with --merge: the base with the adapter merged in (fp32 only)

Examples:
    python scripts/finetune_lora.py --model_dir outputs/sparse_moe
    python scripts/finetune_lora.py --model_dir outputs/sparse_moe --text_file notes.txt --qlora --max_steps 100
    python scripts/finetune_lora.py --model_dir outputs/sparse_moe --resume_from_checkpoint True   # continue

The work is lightarch.deploy.peft.finetune_lora.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field

from transformers.hf_argparser import HfArgumentParser  # no torch: --help stays fast


@dataclass
class FinetuneArguments:
    model_dir: str = field(
        default="outputs/sparse_moe",
        metadata={"help": "Folder of a saved lightarch causal LM and its tokenizer (scripts/train.py's output)."},
    )
    output_dir: str = field(
        default="outputs/lora",
        metadata={"help": "Where the adapter and results are written: a new or empty folder, or an earlier output of "
                          "this script (it is replaced); never --model_dir."},
    )
    text_file: str | None = field(
        default=None, metadata={"help": "UTF-8 text file to fine-tune on; default: a few paragraphs of English prose "
                  "(lightarch.data.corpus.ENGLISH_SAMPLE_TEXT)."}
    )
    targets: str = field(
        default="attention,dense_mlp,shared_experts,experts",
        metadata={"help": "Comma-separated LoRA target groups: attention, dense_mlp, shared_experts, experts (the "
                  "router never)."},
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input; must be 0 when 'experts' is a target."}
    )
    qlora: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the base in 4-bit nf4 (bitsandbytes) and train LoRA on top of it."},
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the blocks (taken from the end of the text) held out."}
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per optimizer step."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (linear decay)."})
    merge: bool = field(
        default=False,
        metadata={"help": "Also save the base with the adapter merged in, to output_dir/merged (not with --qlora)."},
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})
    save_steps: int = field(
        default=20, metadata={"help": "Write a Trainer checkpoint (adapter + optimizer state) every N steps into "
                              "output_dir/checkpoint-N (the last two are kept)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Continue a run: a checkpoint-N folder, or True for the last complete one in --output_dir "
                          "(its adapter, optimizer, scheduler and data position). Without it an earlier run's "
                          "checkpoints in --output_dir are removed."},
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(FinetuneArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    from lightarch.deploy.peft import (
        check_finetune_options,
        check_resume_adapter,
        finetune_lora,
        lora_config,
        parse_lora_targets,
    )

    options = asdict(args)
    try:
        options["targets"] = parse_lora_targets(args.targets)
        peft_config = lora_config(options["targets"], r=args.r, lora_alpha=args.lora_alpha,
                                  lora_dropout=args.lora_dropout)
        checkpoint = check_finetune_options(args.model_dir, args.text_file, args.merge, args.qlora,
                                            args.heldout_fraction, args.r, args.block_size, args.batch_size,
                                            args.max_steps, args.output_dir, args.resume_from_checkpoint,
                                            args.save_steps)
        if checkpoint is not None:
            check_resume_adapter(peft_config, checkpoint)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = finetune_lora(**options)
    logging.getLogger("finetune_lora").info("Held-out perplexity %.3f -> %.3f; adapter saved to %s",
                                            results["heldout_perplexity_before"], results["heldout_perplexity_after"],
                                            args.output_dir)


if __name__ == "__main__":
    main()
