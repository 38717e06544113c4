#!/usr/bin/env python
"""Train a small hybrid SparseMoe from scratch on passkey retrieval (see lightarch.data.passkey), on CPU.

The model mixes rotary sliding-window layers (local structure, the copy circuit) with one global layer without
position encoding (NoPE) that has to find the key line anywhere in the prompt: the iRoPE recipe of Llama 4 /
SmolLM3. The global layer matches by content only, so a prompt longer than any seen in training gives it no unseen
rotary angle, only more filler to ignore; optional Llama 4 temperature tuning sharpens its queries at far positions.
The sliding window is small (32 tokens) so that already in short training prompts the key is out of the window and
only the global layer can fetch it.

Examples are generated on the fly: a 5-digit key hidden at a uniform random depth in filler text, followed by the
question and the answer digits. The loss is on the answer digits only (labels -100 elsewhere) plus, by default, the
key's second occurrence inside the key line ("71432. Remember it. 71432 is ..."): a short-range copy that shapes the
representations the global layer's retrieval then builds on. No loss on the filler: it is predictable and would
drown the ~10 useful targets per example (the loss is a mean over labelled tokens).

A length curriculum grows the maximum training length from --min_length to --max_length over the first
--curriculum_fraction of the steps (each batch has one length, so nothing is padded).

Defaults finish in under 15 minutes on 2 CPU cores (--time_budget_minutes stops training earlier if the machine is
slower), then measure greedy exact-match accuracy at the longest training length and save into --output_dir
(default outputs/passkey), atomically:

    model.safetensors, config.json, *.py            the model (AutoModelForCausalLM, trust_remote_code)
    tokenizer.json, tokenizer_config.json           the tiny word-level tokenizer (AutoTokenizer)
    README.md, results.json, training.png           model card, measured results, loss / length curves

    python scripts/train_passkey.py
    python scripts/train_passkey.py --max_steps 2000 --time_budget_minutes 40 --output_dir outputs/passkey_long
    python scripts/eval_long_context.py --model outputs/passkey
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch import SparseMoeConfig  # noqa: E402
from lightarch import SparseMoeForCausalLM  # noqa: E402
from lightarch.data.passkey import PasskeyTask, build_tokenizer  # noqa: E402
from lightarch.evaluation.model_cards import model_card_template, render_model_card
from lightarch.evaluation.passkey import evaluate_passkey  # noqa: E402
from lightarch.training.checkpoints import atomic_save_pretrained
from lightarch.training.cli import available_cpus, other_running_processes, parse_config_overrides, script_parser

logger = logging.getLogger("train_passkey")

TRAINING_DEFAULTS = {
    "output_dir": "outputs/passkey",
    "use_cpu": True,
    "max_steps": 1500,
    "per_device_train_batch_size": 1,  # each dataset item is a whole batch of about --tokens_per_batch tokens
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.05,
    "max_grad_norm": 1.0,
    "adam_beta2": 0.98,
    "logging_steps": 25,
    "logging_first_step": True,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 0,
    "disable_tqdm": False,
}
LAYER_ALIASES = {"sliding": "sliding_attention", "full": "full_attention", "global": "full_attention"}


@dataclass
class ModelArguments:
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    layer_types: str = field(
        default="sliding,sliding,full,sliding",
        metadata={"help": "One entry per layer, comma-separated: 'sliding' (window --sliding_window) or 'full' "
                          "(global attention, must find the key)."},
    )
    num_attention_heads: int = field(default=4, metadata={"help": "Query heads (head_dim = hidden / heads)."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    sliding_window: int = field(
        default=32,
        metadata={"help": "Window of the sliding layers, in tokens. Small, so that already in short training prompts "
                          "the key is out of the window and only the global layer can fetch it: retrieval is learnt "
                          "from the first steps instead of after a switch from local copying."},
    )
    num_experts: int = field(default=4, metadata={"help": "Routed experts per MoE layer."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Experts per token (top-k routing)."})
    moe_intermediate_size: int = field(default=128, metadata={"help": "Hidden units of each expert."})
    global_position_encoding: str = field(
        default="nope",
        metadata={"help": "Position encoding of the global ('full') layers: 'nope' (none; the iRoPE recipe of "
                          "Llama 4 / SmolLM3: rotary sliding layers + NoPE global layers, whose content-only "
                          "matching does not meet unseen rotary angles past the training length) or 'rope' (rotary, "
                          "like the sliding layers)."},
    )
    rope_theta: float = field(
        default=10_000.0,
        metadata={"help": "Rotary base (sliding layers, and global layers with --global_position_encoding rope)."},
    )
    attn_temperature_tuning: bool = field(
        default=True,
        metadata={"help": "Llama 4 query scaling on NoPE layers: queries x (1 + attn_scale * log(1 + floor((pos + 1) "
                          "/ floor_scale))), sharper attention far into long prompts."},
    )
    floor_scale: int = field(default=128, metadata={"help": "Temperature tuning: positions per scaling step."})
    attn_scale: float = field(default=0.1, metadata={"help": "Temperature tuning: strength of the scaling."})
    prefill_chunk_size: int = field(
        default=1024, metadata={"help": "Chunked prefill at inference (saved in the config; eval uses it)."}
    )
    max_position_embeddings: int = field(
        default=262_144, metadata={"help": "Longest sequence the model accepts (a check, not a learnt table)."}
    )


@dataclass
class DataArguments:
    min_length: int = field(default=96, metadata={"help": "Shortest training example, tokens (prompt + answer)."})
    max_length: int = field(default=256, metadata={"help": "Longest training example, tokens (prompt + answer)."})
    curriculum_fraction: float = field(
        default=0.6,
        metadata={"help": "The maximum length grows linearly from --min_length to --max_length over this fraction of "
                          "the steps; each batch's length is uniform between --min_length and that maximum."},
    )
    length_multiple: int = field(default=16, metadata={"help": "Batch lengths are rounded to a multiple of this."})
    tokens_per_batch: int = field(
        default=2048,
        metadata={"help": "Tokens per optimizer step (per accumulation step): a batch of length L holds "
                          "max(1, tokens_per_batch // L) examples, so short batches carry many examples and every "
                          "step costs about the same. (--per_device_train_batch_size must stay 1: each item the data "
                          "stream yields is a whole batch.)"},
    )
    label_key_echo: bool = field(
        default=True, metadata={"help": "Also train on the key's second occurrence inside the key line."}
    )
    edge_depth_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction of examples with the key at exactly depth 0.0 or 1.0 (half each) instead of a "
                          "uniform depth: right after the introduction, and right before the question where the key "
                          "line is partly inside the sliding window, two cases a uniform depth almost never gives."},
    )
    distractors: int = field(
        default=4,
        metadata={"help": "Up to this many other 5-digit numbers in each example's filler ('The sky is 40817.'; "
                          "uniform 0..N, as many as fit), so the model learns to return the number after 'pass key' "
                          "rather than any digits it sees; the final evaluation uses N. 0 = the classic task."},
    )
    eval_samples: int = field(
        default=10, metadata={"help": "Prompts per depth for the final accuracy at --max_length (5 depths)."}
    )
    time_budget_minutes: float = field(
        default=13.0,
        metadata={"help": "Stop training (and still evaluate and save) once this much wall time has passed; 0 = no "
                          "limit. The default --max_steps takes about 11 CPU-minutes (1 thread), so on 2 dedicated "
                          "cores this never triggers; on a busy machine it keeps the run under 15 minutes (with "
                          "less training, logged and recorded in results.json)."},
    )
    num_threads: int = field(
        default=0,
        metadata={"help": "torch threads; 0 = the available CPUs minus the other processes running at start (at "
                          "least 1): threads waiting for descheduled siblings slow small ops down badly."},
    )
    config_overrides: str = field(
        default="", metadata={"help": "Extra SparseMoeConfig fields, 'key=value,...' (JSON values)."}
    )


class CurriculumDataset(torch.utils.data.IterableDataset):
    """Endless stream of whole batches (`input_ids`, `labels` of shape (B, L)), one length per batch, following the
    curriculum; B = max(1, tokens_per_batch // L)."""

    def __init__(self, task: PasskeyTask, data_args: DataArguments, total_batches: int, seed: int) -> None:
        self.task, self.data_args = task, data_args
        self.total_batches, self.seed = max(1, total_batches), seed

    def length_cap(self, batch_index: int) -> int:
        args = self.data_args
        progress = min(1.0, batch_index / (self.total_batches * max(args.curriculum_fraction, 1e-9)))
        return int(args.min_length + (args.max_length - args.min_length) * progress)

    def batch_length(self, batch_index: int, rng: random.Random) -> int:
        args = self.data_args
        length = rng.randint(args.min_length, self.length_cap(batch_index))
        length = int(round(length / args.length_multiple)) * args.length_multiple
        return max(args.min_length, min(args.max_length, length))

    def __iter__(self):
        rng = random.Random(self.seed)
        batch_index = 0
        while True:
            length = self.batch_length(batch_index, rng)
            examples = [self.task.training_example(length, rng, self.data_args.label_key_echo,
                                                   self.data_args.edge_depth_fraction, self.data_args.distractors)
                        for _ in range(max(1, self.data_args.tokens_per_batch // length))]
            yield {key: torch.tensor([example[key] for example in examples]) for key in ("input_ids", "labels")}
            batch_index += 1


def collate_whole_batch(features: list[dict]) -> dict:
    """The data stream yields whole batches; the DataLoader (batch size 1) wraps each in a list of one."""
    if len(features) != 1:
        raise ValueError("--per_device_train_batch_size must be 1: each streamed item is already a whole batch.")
    return features[0]


class TrainingMonitor(TrainerCallback):
    """Records loss and batch length per logging step, and stops training at the time budget."""

    def __init__(self, budget_seconds: float, dataset: CurriculumDataset) -> None:
        self.budget_seconds, self.dataset = budget_seconds, dataset
        self.start = None
        self.history: list[dict] = []
        self.stopped_by_budget = False
        self.train_seconds = self.train_cpu_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self.start
        self.train_cpu_seconds = time.process_time() - self.cpu_start
        if self.budget_seconds and self.train_seconds > self.budget_seconds and not control.should_training_stop:
            logger.warning("Time budget reached after %d steps (%.0f s): stopping training.", state.global_step,
                           self.train_seconds)
            self.stopped_by_budget = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.history.append({"step": state.global_step, "loss": logs["loss"],
                                 "length_cap": self.dataset.length_cap(state.global_step),
                                 "seconds": time.perf_counter() - self.start})


def build_config(model_args: ModelArguments, data_args: DataArguments, tokenizer) -> SparseMoeConfig:
    layer_types = [LAYER_ALIASES.get(t.strip(), t.strip()) for t in model_args.layer_types.split(",") if t.strip()]
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        intermediate_size=2 * model_args.hidden_size,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_key_value_heads,
        sliding_window=model_args.sliding_window,
        num_experts=model_args.num_experts,
        num_experts_per_tok=model_args.num_experts_per_tok,
        max_experts_per_token=model_args.num_experts_per_tok,
        router_mode="top_k",
        moe_intermediate_size=model_args.moe_intermediate_size,
        rope_parameters={"rope_type": "default", "rope_theta": model_args.rope_theta},
        no_rope_layers=[int(t == "sliding_attention" or model_args.global_position_encoding == "rope")
                        for t in layer_types],
        attn_temperature_tuning=model_args.attn_temperature_tuning,
        floor_scale=model_args.floor_scale,
        attn_scale=model_args.attn_scale,
        prefill_chunk_size=model_args.prefill_chunk_size,
        max_position_embeddings=model_args.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    try:
        values.update(parse_config_overrides(data_args.config_overrides))
    except ValueError as error:
        raise ValueError(f"--config_overrides: {error}") from None
    return SparseMoeConfig(**values)


def build_parser() -> HfArgumentParser:
    return script_parser((ModelArguments, DataArguments, TrainingArguments), description=__doc__.split("\n\n")[0],
                         training_defaults=TRAINING_DEFAULTS)


def parse_args(argv: list[str] | None = None):
    parser = build_parser()
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv,
                                                                                  look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    task_min = PasskeyTask(build_tokenizer()).min_length + 5
    if data_args.min_length < task_min:
        parser.error(f"--min_length must be >= {task_min} (introduction + key line + question + answer).")
    if model_args.global_position_encoding not in ("nope", "rope"):
        parser.error(f"--global_position_encoding must be 'nope' or 'rope', got {model_args.global_position_encoding!r}.")
    if data_args.max_length < data_args.min_length:
        parser.error("--max_length must be >= --min_length.")
    if training_args.max_steps <= 0:
        parser.error("--max_steps must be positive (the training data is an endless stream).")
    if not 0 <= data_args.edge_depth_fraction <= 1:
        parser.error("--edge_depth_fraction must be in [0, 1].")
    if not 0 < data_args.curriculum_fraction <= 1:
        parser.error("--curriculum_fraction must be in (0, 1].")
    if training_args.per_device_train_batch_size != 1:
        parser.error("--per_device_train_batch_size must be 1: each streamed item is a whole batch; set "
                     "--tokens_per_batch instead.")
    if data_args.length_multiple < 1 or data_args.eval_samples < 1 or data_args.tokens_per_batch < 1:
        parser.error("--length_multiple, --eval_samples and --tokens_per_batch must be >= 1.")
    if data_args.distractors < 0:
        parser.error("--distractors must be >= 0 (0 = the classic passkey task).")
    return model_args, data_args, training_args


def plot_training(history: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], "o-", ms=3, color="tab:blue", label="train loss (labelled digits)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, [h["length_cap"] for h in history], "--", color="tab:gray", label="max training length")
    twin.set_ylabel("max training length (tokens)")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="upper right")
    ax.set_title("Passkey training")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def position_encoding_summary(config: SparseMoeConfig) -> str:
    """E.g. "rotary (base 10000.0) on the sliding layers, none (NoPE) on the global layers"."""
    rotary = config.no_rope_layers or [1] * config.num_hidden_layers
    kinds = {"sliding": set(), "global": set()}
    for layer_type, uses_rope in zip(config.layer_types, rotary):
        kinds["sliding" if layer_type == "sliding_attention" else "global"].add(uses_rope)
    theta = config.rope_parameters["rope_theta"]
    parts = []
    for name, values in kinds.items():
        if values:
            text = " / ".join(f"rotary (base {theta})" if v else "none (NoPE)" for v in sorted(values, reverse=True))
            parts.append(f"{text} on the {name} layers")
    summary = ", ".join(parts)
    if config.attn_temperature_tuning and 0 in rotary:
        summary += (f"; Llama 4 attention temperature tuning on NoPE layers (floor_scale {config.floor_scale}, "
                    f"attn_scale {config.attn_scale})")
    return summary


def render_card(results: dict, config: SparseMoeConfig) -> str:
    values = {
        "max_length": results["data"]["max_length"],
        "min_length": results["data"]["min_length"],
        "edge_percent": f"{100 * results['data']['edge_depth_fraction']:.0f}",
        "distractors": (f"up to {results['data']['distractors']} other 5-digit numbers in the filler of each example "
                        "(as many as fit), so the key is the number after \"pass key\", not the only one"
                        if results["data"].get("distractors") else "no other numbers in the filler"),
        "layer_types": ", ".join(t.split("_")[0] for t in config.layer_types),
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "sliding_window": config.sliding_window,
        "num_experts": config.num_experts,
        "top_k": config.num_experts_per_tok,
        "position_encoding": position_encoding_summary(config),
        "num_parameters": f"{results['num_parameters']:,}",
        "steps": results["train_steps"],
        "train_minutes": f"{results['train_time_seconds'] / 60:.1f}",
        "train_cpu_minutes": f"{results['train_cpu_seconds'] / 60:.1f}",
        "threads": results["torch_num_threads"],
        "accuracy": f"{100 * results['accuracy_at_max_length']:.0f}",
        "eval_samples": results["eval_prompts_at_max_length"],
        "eval_distractors": results["data"].get("distractors", 0),
        "accuracy_table": results["accuracy_table_md"],
        "final_loss": f"{results['final_train_loss']:.4f}",
    }
    return render_model_card(model_card_template("passkey"), values)


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    num_threads = data_args.num_threads or max(1, available_cpus() - other_running_processes())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _train(model_args, data_args, training_args, num_threads, started)
    finally:
        torch.set_num_threads(previous_threads)


def _train(model_args, data_args, training_args, num_threads, started) -> dict:
    set_seed(training_args.seed)
    load_at_start = list(os.getloadavg())
    tokenizer = build_tokenizer()
    task = PasskeyTask(tokenizer)
    config = build_config(model_args, data_args, tokenizer)
    model = SparseMoeForCausalLM(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("SparseMoe %s parameters, layers %s, window %d, %d threads; training lengths %d..%d",
                f"{num_parameters:,}", config.layer_types, config.sliding_window, num_threads,
                data_args.min_length, data_args.max_length)

    batches = training_args.max_steps * training_args.gradient_accumulation_steps
    dataset = CurriculumDataset(task, data_args, batches, training_args.seed)
    monitor = TrainingMonitor(data_args.time_budget_minutes * 60, dataset)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                      data_collator=collate_whole_batch, callbacks=[monitor])
    train_output = trainer.train()
    train_seconds = monitor.train_seconds

    # Accuracy at the longest training length, greedy generation with the model's chunked prefill.
    model.eval()
    eval_started = time.perf_counter()
    evaluation = evaluate_passkey(model, task, [data_args.max_length], (0.0, 0.25, 0.5, 0.75, 1.0),
                                  data_args.eval_samples, seed=training_args.seed + 1,
                                  distractors=data_args.distractors)
    accuracy = evaluation["overall"][str(data_args.max_length)]["exact"]
    logger.info("Exact-match accuracy at %d tokens: %.1f%% (%d prompts, %.0f s)", data_args.max_length,
                100 * accuracy, evaluation["overall"][str(data_args.max_length)]["count"],
                time.perf_counter() - eval_started)

    window = min(4, len(monitor.history)) or 1
    results = {
        "train_steps": trainer.state.global_step,
        "max_steps": training_args.max_steps,
        "stopped_by_time_budget": monitor.stopped_by_budget,
        "train_time_seconds": train_seconds,
        # CPU time of this process (all threads): with 1 thread, the wall time the same training takes on a
        # dedicated core; on a shared machine the wall time above is longer.
        "train_cpu_seconds": monitor.train_cpu_seconds,
        "load_average_at_start": load_at_start,
        "train_loss_mean": train_output.training_loss,
        "final_train_loss": (sum(h["loss"] for h in monitor.history[-window:]) / window
                             if monitor.history else train_output.training_loss),
        "accuracy_at_max_length": accuracy,
        "digit_accuracy_at_max_length": evaluation["overall"][str(data_args.max_length)]["digits"],
        "eval_prompts_at_max_length": evaluation["overall"][str(data_args.max_length)]["count"],
        "accuracy_by_depth_at_max_length": {d: cell["exact"] for d, cell in
                                            evaluation["cells"][str(data_args.max_length)].items()},
        "num_parameters": num_parameters,
        "torch_num_threads": num_threads,
        "load_average_at_end": list(os.getloadavg()),
        "data": asdict(data_args),
        "training_arguments": {k: getattr(training_args, k) for k in TRAINING_DEFAULTS},
        "loss_history": monitor.history,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    depth_row = " | ".join(f"{100 * v:.0f}%" for v in results["accuracy_by_depth_at_max_length"].values())
    results["accuracy_table_md"] = (
        "| length | " + " | ".join(f"depth {d}" for d in results["accuracy_by_depth_at_max_length"]) + " |\n"
        + "|---:|" + "---:|" * len(results["accuracy_by_depth_at_max_length"]) + "\n"
        + f"| {data_args.max_length} | {depth_row} |"
    )
    results["run_wall_time_seconds"] = time.perf_counter() - started
    extra_files = {
        "results.json": json.dumps(results, indent=2, default=str),
        "training.png": plot_training(monitor.history) if monitor.history else b"",
    }
    extra_files["README.md"] = render_card(results, config)
    if not extra_files["training.png"]:
        del extra_files["training.png"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    atomic_save_pretrained(training_args.output_dir, model, tokenizer, extra_files=extra_files)
    logger.info("Trained %d steps in %.1f min wall, %.1f min CPU (%s); accuracy %.0f%% at %d tokens; saved to %s",
                results["train_steps"], train_seconds / 60, monitor.train_cpu_seconds / 60,
                "stopped by the time budget" if monitor.stopped_by_budget else "all steps",
                100 * accuracy, data_args.max_length, training_args.output_dir)
    return results


if __name__ == "__main__":
    main()
