#!/usr/bin/env python
"""Fine-tune a saved lightarch model with LoRA (or QLoRA: a 4-bit base) on a text file, and save the adapter.

The model folder must hold a lightarch causal LM and its tokenizer (what scripts/train.py writes). LoRA adapts the
groups given by --targets (attention projections, dense MLPs, shared experts, routed experts; never the router, see
lightarch.deploy). Without --text_file it trains on a small embedded English corpus. It writes into --output_dir:

    adapter_model.safetensors, adapter_config.json     the adapter (PeftModel.from_pretrained(base, output_dir))
    results.json, results.md                           held-out perplexity before / after, trainable parameters
    merged/                                            with --merge: the base with the adapter merged in (fp32 only)

Examples:
    python scripts/finetune_lora.py --model_dir outputs/sparse_moe
    python scripts/finetune_lora.py --model_dir outputs/sparse_moe --text_file notes.txt --qlora --max_steps 100
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments  # noqa: E402

import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch.deploy.peft import LORA_TARGET_GROUPS, check_lora_targets, lora_config
from lightarch.data.corpus import BlockDataset, text_blocks
from lightarch.deploy.bitsandbytes import bnb_quantization_config, load_quantized
from lightarch.evaluation.perplexity import perplexity
from lightarch.training.checkpoints import write_atomically  # noqa: E402

logger = logging.getLogger("finetune_lora")

EMBEDDED_CORPUS = """\
The lighthouse keeper climbed the stairs at dusk, as he had every evening for thirty years. He counted the steps out
of habit, one hundred and twelve, and paused at the small window on the landing to look at the sea. The wind had come
round to the north, and the waves were breaking white against the rocks below the point.
At the top he trimmed the wick, cleaned the glass and wound the clockwork that turned the lens. The light began to
sweep across the water, once every ten seconds, as it had done since before he was born. Far out, a fishing boat was
making for the harbour, its own small lamp rising and falling with the swell.
He wrote in the log: wind north, rising; sea rough; visibility good; one vessel inbound. Then he sat by the stove with
a cup of tea and listened to the building hum and creak around him, a tall stone instrument played by the weather.
In the morning the storm had passed. The keeper walked down to the shore and found the beach covered in kelp and
driftwood, and among it a wooden crate stamped with the name of a ship he did not know. Inside, packed in straw, were
six glass floats, green and blue, each as large as a man's head, and not one of them was broken.
He carried them up to the house two at a time and set them on the windowsill, where they caught the low winter sun
and threw coloured light across the kitchen table. His daughter, when she visited at the end of the month, said they
looked like the eyes of some great creature of the deep, watching the room. He laughed and said that was exactly right.
A garden is a slow conversation between a person and a piece of ground. In the first year you mostly listen: where
the water stands after rain, where the frost lingers, which corner the sun reaches last. In the second year you begin
to answer, a row of beans here, a currant bush there, and the ground answers back with weeds, slugs and surprises.
By the third year the conversation has a rhythm. You know that the lettuces will bolt in July if you sow them late,
that the apple tree crops heavily every other year, and that the robin will follow you along the bed whenever you dig.
The bread was rising on the windowsill. She had mixed flour, water, salt and a spoonful of the old starter the night
before, folded the dough four times in the morning, and now it sat under a damp cloth, slowly doubling. Baking is
mostly waiting, her grandmother used to say, and the waiting is the part that makes the bread taste of something.
"""


@dataclass
class FinetuneArguments:
    model_dir: str = field(
        default="outputs/sparse_moe",
        metadata={"help": "Folder of a saved lightarch causal LM and its tokenizer (scripts/train.py's output)."},
    )
    output_dir: str = field(default="outputs/lora", metadata={"help": "Where the adapter and results are written."})
    text_file: str | None = field(
        default=None, metadata={"help": "UTF-8 text file to fine-tune on; default: the small embedded English corpus."}
    )
    targets: str = field(
        default="attention,dense_mlp,shared_experts,experts",
        metadata={"help": f"Comma-separated LoRA target groups, from {LORA_TARGET_GROUPS} (the router never)."},
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


def check_args(args: FinetuneArguments) -> list[str]:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in LORA_TARGET_GROUPS]
    if unknown or not targets:
        raise ValueError(f"--targets {args.targets!r}: use a comma-separated subset of {LORA_TARGET_GROUPS}.")
    if args.merge and args.qlora:
        raise ValueError("--merge cannot be used with --qlora: merging into 4-bit weights re-quantizes them; "
                         "merge into the full-precision base instead.")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise ValueError(f"--model_dir {args.model_dir} has no config.json; train a model first (scripts/train.py).")
    if args.text_file is not None and not os.path.isfile(args.text_file):
        raise ValueError(f"--text_file {args.text_file} does not exist.")
    if not 0 < args.heldout_fraction < 1:
        raise ValueError(f"--heldout_fraction must be in (0, 1), got {args.heldout_fraction}.")
    for name in ("r", "block_size", "batch_size", "max_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    return targets


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(FinetuneArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    targets = check_args(args)
    torch.manual_seed(args.seed)
    from peft import get_peft_model, prepare_model_for_kbit_training

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else EMBEDDED_CORPUS
    blocks = text_blocks(tokenizer, text, args.block_size)
    if blocks.shape[0] < 2:
        raise ValueError(f"The text gives {blocks.shape[0]} block(s) of {args.block_size} tokens; need at least 2 "
                         "(one to train, one held out). Give more text or lower --block_size.")
    num_heldout = max(1, round(blocks.shape[0] * args.heldout_fraction))
    train_blocks, heldout_blocks = blocks[:-num_heldout], blocks[-num_heldout:]

    if args.qlora:
        config = AutoConfig.from_pretrained(args.model_dir)
        model = load_quantized(args.model_dir, bnb_quantization_config(config, bits=4))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    ppl_before = perplexity(model, heldout_blocks)

    model = get_peft_model(model, lora_config(targets, r=args.r, lora_alpha=args.lora_alpha,
                                              lora_dropout=args.lora_dropout))
    check_lora_targets(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    work_dir = Path(tempfile.mkdtemp(prefix="finetune_lora_"))
    training_args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=min(10, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        label_names=["labels"],
        disable_tqdm=True,
    )
    start = time.perf_counter()
    trainer = Trainer(model=model, args=training_args, train_dataset=BlockDataset(train_blocks))
    train_output = trainer.train()
    train_seconds = time.perf_counter() - start
    model.eval()
    ppl_after = perplexity(model, heldout_blocks)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter_", dir=output_dir))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for item in staging.iterdir():
        os.replace(item, output_dir / item.name)
    shutil.rmtree(staging, ignore_errors=True)
    if args.merge:
        merged = model.merge_and_unload()
        staging = Path(tempfile.mkdtemp(prefix=".merged_", dir=output_dir))
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(output_dir / "merged", ignore_errors=True)
        os.replace(staging, output_dir / "merged")
    shutil.rmtree(work_dir, ignore_errors=True)

    results = {
        "args": asdict(args),
        "targets": targets,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_blocks": int(train_blocks.shape[0]),
        "heldout_blocks": int(heldout_blocks.shape[0]),
        "train_loss": train_output.training_loss,
        "heldout_perplexity_before": ppl_before,
        "heldout_perplexity_after": ppl_after,
        "train_seconds": train_seconds,
    }
    write_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    table = "\n".join([
        "| | value |", "|---|---|",
        f"| base | `{args.model_dir}`{' (4-bit nf4, QLoRA)' if args.qlora else ''} |",
        f"| targets | {', '.join(targets)} |",
        f"| trainable parameters | {trainable:,} of {total:,} ({100 * trainable / total:.2f}%) |",
        f"| held-out perplexity before | {ppl_before:.3f} |",
        f"| held-out perplexity after | {ppl_after:.3f} |",
        f"| training time | {train_seconds:.1f} s for {args.max_steps} steps |",
    ])
    write_atomically(output_dir / "results.md", "# LoRA fine-tuning\n\n" + table + "\n")
    logger.info("Held-out perplexity %.3f -> %.3f; adapter saved to %s", ppl_before, ppl_after, output_dir)
    return results


if __name__ == "__main__":
    main()
