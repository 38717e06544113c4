"""PEFT LoRA / QLoRA for lightarch decoders: the targets (attention, dense MLPs, shared experts and the routed
experts' 3D weights through PEFT `target_parameters`; never the router), and `finetune_lora`, the fine-tuning run of
`scripts/finetune_lora.py`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LORA_TARGET_GROUPS = ("attention", "dense_mlp", "shared_experts", "experts")
ROUTER_MODULE = "mlp.gate"


def lora_target_modules(targets: Sequence[str] = ("attention", "dense_mlp", "shared_experts")) -> str | list:
    """A PEFT `target_modules` regex for the `nn.Linear` groups in `targets` (never the router `mlp.gate`).

    `"experts"` is ignored here (it is a `target_parameters` group); with no linear group the result is `[]`.
    """
    unknown = [t for t in targets if t not in LORA_TARGET_GROUPS]
    if unknown:
        raise ValueError(f"Unknown LoRA target group(s) {unknown}; choose from {LORA_TARGET_GROUPS}.")
    patterns = []
    if "attention" in targets:
        patterns.append(r"self_attn\.(q|k|v|o)_proj")
    if "dense_mlp" in targets:
        patterns.append(r"mlp\.(gate|up|down)_proj")
    if "shared_experts" in targets:
        patterns.append(r"mlp\.shared_experts\.(gate|up|down)_proj")
    if not patterns:
        return []  # PEFT's way of saying "no modules" (experts only, through target_parameters)
    return r".*\.(" + "|".join(patterns) + r")$"


def lora_config(
    targets: Sequence[str] = ("attention", "dense_mlp", "shared_experts", "experts"),
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    **kwargs,
):
    """A `peft.LoraConfig` for a lightarch decoder, adapting the groups in `targets` (see `LORA_TARGET_GROUPS`).

    `"experts"` adds the routed experts' 3D weights through `target_parameters`; PEFT cannot apply dropout to a
    parameter, so it requires `lora_dropout=0`. The router is never targeted.
    """
    from peft import LoraConfig

    targets = tuple(targets)
    if not targets:
        raise ValueError(f"LoRA needs at least one target group from {LORA_TARGET_GROUPS}.")
    if "experts" in targets and lora_dropout:
        raise ValueError(
            f"lora_dropout={lora_dropout} cannot be used with the 'experts' target: PEFT applies expert LoRA to the 3D "
            "weight tensors, where dropout on the input is impossible. Set lora_dropout=0 or drop 'experts'."
        )
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules([t for t in targets if t != "experts"]),
        target_parameters=list(EXPERT_PARAMETERS) if "experts" in targets else None,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def check_lora_targets(model: nn.Module) -> None:
    """Raise if a PEFT-wrapped lightarch model adapts its router (routing must stay the base model's)."""
    for name, module in model.named_modules():
        if name.endswith(ROUTER_MODULE) or f"{ROUTER_MODULE}." in name:
            if any(key in name for key in ("lora_A", "lora_B")) or hasattr(module, "lora_A"):
                raise ValueError(
                    f"LoRA adapts the router {name!r}. lightarch never adapts routers: a low-rank routing change sends "
                    "tokens to experts the adapter was not trained with. Remove 'gate' from target_modules / "
                    "target_parameters (use lightarch.deploy.lora_config)."
                )


def parse_lora_targets(text: str) -> list[str]:
    """`--targets` 'attention,experts' -> ['attention', 'experts'] (ValueError naming the option otherwise)."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets or any(t not in LORA_TARGET_GROUPS for t in targets):
        raise ValueError(f"--targets {text!r}: use a comma-separated subset of {LORA_TARGET_GROUPS}.")
    return targets


FINETUNE_SCRIPT = "finetune_lora.py"  # the writer named in the output folder's marker (`check_output_dir`)
CHECKPOINTS = ("checkpoint-*",)  # Trainer checkpoints, kept in the output folder for --resume_from_checkpoint


def finetune_inputs(model_dir, text_file) -> dict:
    """The input paths `output_dir` may never be or contain (option name -> path)."""
    return {"--model_dir": model_dir, "--text_file": text_file}


def check_finetune_options(model_dir, text_file, merge: bool, qlora: bool, heldout_fraction: float, r: int,
                           block_size: int, batch_size: int, max_steps: int, output_dir=None,
                           resume_from_checkpoint: str | None = None, save_steps: int = 20) -> str | None:
    """Raise ValueError naming the option when `finetune_lora` cannot run with these arguments (its own); an
    `output_dir` that is not empty or an earlier fine-tuning, or that is (or holds) `model_dir` or `text_file`, is
    refused (`lightarch.training.checkpoints.check_output_dir`). Returns the checkpoint `resume_from_checkpoint`
    names (`resolve_resume`: True / 'latest' -> the last complete one in `output_dir`), or None."""
    import os

    from ..training.checkpoints import check_output_dir, resolve_resume

    if merge and qlora:
        raise ValueError("--merge cannot be used with --qlora: merging into 4-bit weights re-quantizes them; "
                         "merge into the full-precision base instead.")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model_dir {model_dir} has no config.json; train a model first (scripts/train.py).")
    if text_file is not None and not os.path.isfile(text_file):
        raise ValueError(f"--text_file {text_file} does not exist.")
    if output_dir is not None:
        check_output_dir(output_dir, FINETUNE_SCRIPT, inputs=finetune_inputs(model_dir, text_file))
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"--heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    for name, value in (("r", r), ("block_size", block_size), ("batch_size", batch_size), ("max_steps", max_steps),
                        ("save_steps", save_steps)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    checkpoint = resolve_resume(None if resume_from_checkpoint is None else str(resume_from_checkpoint),
                                output_dir if output_dir is not None else ".")
    if checkpoint is not None and not os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: {checkpoint} holds no LoRA adapter "
                         f"(adapter_config.json); pass a checkpoint-<step> folder written by {FINETUNE_SCRIPT}.")
    return checkpoint


def check_resume_adapter(peft_config, checkpoint) -> None:
    """A ValueError naming `--resume_from_checkpoint` when the adapter being trained (`peft_config`) is not the one
    `checkpoint` holds (rank, scaling, targets): its weights would not load, or would load into another adapter."""
    import json
    import os

    with open(os.path.join(checkpoint, "adapter_config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    given = peft_config.to_dict()

    def normalised(value):
        return sorted(value) if isinstance(value, (list, set, tuple)) else value

    different = [k for k in ("r", "lora_alpha", "target_modules", "target_parameters")
                 if normalised(saved.get(k)) != normalised(given.get(k))]
    if different:
        shown = ", ".join(f"{k}={normalised(given.get(k))!r} (checkpoint: {normalised(saved.get(k))!r})"
                          for k in different)
        raise ValueError(f"--resume_from_checkpoint {checkpoint} trained another adapter: {shown}. Pass that run's "
                         "--r / --lora_alpha / --targets, or start from scratch.")


def finetune_lora(
    model_dir,
    output_dir,
    text_file=None,
    targets: Sequence[str] = LORA_TARGET_GROUPS,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    qlora: bool = False,
    block_size: int = 128,
    heldout_fraction: float = 0.1,
    batch_size: int = 8,
    max_steps: int = 60,
    learning_rate: float = 2e-3,
    merge: bool = False,
    seed: int = 0,
    resume_from_checkpoint: str | None = None,
    save_steps: int = 20,
) -> dict:
    """Fine-tune the saved lightarch causal LM in `model_dir` with LoRA (QLoRA with `qlora`: a 4-bit nf4 base) on
    `text_file` (default: `lightarch.data.corpus.ENGLISH_SAMPLE_TEXT`) and save the adapter into `output_dir`.

    The text's last `heldout_fraction` of `block_size`-token blocks is held out; `max_steps` optimizer steps of
    `batch_size` blocks at a linearly decaying `learning_rate`. Writes adapter_model.safetensors, adapter_config.json,
    the tokenizer, results.json and results.md (held-out perplexity before / after, trainable parameters), and with
    `merge` the base with the adapter merged in (`output_dir/merged`, fp32 bases only). Returns the results.

    Every `save_steps` steps a Trainer checkpoint (adapter, optimizer, scheduler, RNG states) is written to
    `output_dir/checkpoint-<step>` (the last two are kept, and carried over into the final folder);
    `resume_from_checkpoint` (a checkpoint folder, or True / 'latest' for the last one in `output_dir`) continues that
    run: its adapter and optimizer state are loaded and training goes on to `max_steps`. Without it, checkpoints of an
    earlier run in `output_dir` are removed.
    """
    arguments = dict(locals())  # recorded in results.json
    import json
    import os
    import shutil
    import time
    from pathlib import Path

    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from ..data.corpus import ENGLISH_SAMPLE_TEXT, BlockDataset, text_blocks
    from ..evaluation.perplexity import perplexity
    from ..training.checkpoints import (
        prepare_output_dir,
        replace_output_dir,
        resume_or_start_fresh,
        staging_dir,
        write_atomically,
    )
    from .bitsandbytes import bnb_quantization_config, load_quantized

    arguments = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in arguments.items()}
    targets = list(targets)
    lora_config(targets, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)  # checks the targets and dropout
    check_finetune_options(model_dir, text_file, merge, qlora, heldout_fraction, r, block_size, batch_size, max_steps,
                           output_dir, resume_from_checkpoint, save_steps)
    output_dir = prepare_output_dir(output_dir, FINETUNE_SCRIPT, inputs=finetune_inputs(model_dir, text_file),
                                    keep=CHECKPOINTS)
    resume = resume_or_start_fresh(resume_from_checkpoint, output_dir)  # no resume: an earlier run's checkpoints go
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = Path(text_file).read_text(encoding="utf-8") if text_file else ENGLISH_SAMPLE_TEXT
    blocks = text_blocks(tokenizer, text, block_size)
    if blocks.shape[0] < 2:
        raise ValueError(f"The text gives {blocks.shape[0]} block(s) of {block_size} tokens; need at least 2 "
                         "(one to train, one held out). Give more text or lower --block_size.")
    num_heldout = max(1, round(blocks.shape[0] * heldout_fraction))
    train_blocks, heldout_blocks = blocks[:-num_heldout], blocks[-num_heldout:]

    if qlora:
        config = AutoConfig.from_pretrained(model_dir)
        model = load_quantized(model_dir, bnb_quantization_config(config, bits=4))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ppl_before = perplexity(model, heldout_blocks)

    peft_config = lora_config(targets, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    if resume:
        check_resume_adapter(peft_config, resume)
    model = get_peft_model(model, peft_config)
    check_lora_targets(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    training_args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, max_steps=max_steps,
        learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=min(10, max_steps // 10),
        logging_steps=max(1, max_steps // 10), save_strategy="steps", save_steps=save_steps, save_total_limit=2,
        report_to=[], use_cpu=True, seed=seed, label_names=["labels"], disable_tqdm=True,
    )
    start = time.perf_counter()
    trainer = Trainer(model=model, args=training_args, train_dataset=BlockDataset(train_blocks))
    train_output = trainer.train(resume_from_checkpoint=resume)  # the checkpoint's adapter, optimizer, scheduler
    train_seconds = time.perf_counter() - start
    model.eval()
    ppl_after = perplexity(model, heldout_blocks)

    output_dir = Path(output_dir)
    staging = staging_dir(output_dir)  # everything is written there, then swapped in (replace_output_dir)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(staging / "merged")
            tokenizer.save_pretrained(staging / "merged")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    results = {
        "args": arguments,
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
    write_atomically(staging / "results.json", json.dumps(results, indent=2) + "\n")
    table = "\n".join([
        "| | value |", "|---|---|",
        f"| base | `{model_dir}`{' (4-bit nf4, QLoRA)' if qlora else ''} |",
        f"| targets | {', '.join(targets)} |",
        f"| trainable parameters | {trainable:,} of {total:,} ({100 * trainable / total:.2f}%) |",
        f"| held-out perplexity before | {ppl_before:.3f} |",
        f"| held-out perplexity after | {ppl_after:.3f} |",
        f"| training time | {train_seconds:.1f} s for {max_steps} steps |",
    ])
    write_atomically(staging / "results.md", "# LoRA fine-tuning\n\n" + table + "\n")
    replace_output_dir(staging, output_dir, FINETUNE_SCRIPT, keep=CHECKPOINTS)
    return results
