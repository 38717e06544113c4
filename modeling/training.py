"""Helpers for training lightarch models with `transformers.Trainer` (used by `scripts/train.py`).

- Data: list a source tree deterministically, split it by file, train a byte-level BPE tokenizer, cut token
  streams into fixed-size blocks (as transformers' `run_clm.py` does).
- `MoeStatsCallback`: per-step train loss and router statistics (experts per token, expert load) during training
  and evaluation, saved into each checkpoint so a resumed run keeps its history.
- Measurements: unigram baseline perplexity, total vs active parameters per token.
- Outputs: loss / routing plots (PNG bytes), model card rendering, and `atomic_save_pretrained`, which writes
  everything into a temporary sibling folder and swaps it into place.

This module is not imported by `modeling/__init__.py` and is never copied into saved model folders.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import math
import os
import shutil
import string
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainerCallback

from .layers import Experts, Router

STATS_FILE = "moe_stats.json"
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) for `key` (stable across runs, machines and Python's hash seed)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def list_source_files(root: str | os.PathLike, pattern: str = "*.py", exclude_dirs: Sequence[str] = ()) -> list[str]:
    """Relative paths (POSIX style, sorted) of the files under `root` matching `pattern`.

    Directories named in `exclude_dirs` (e.g. `site-packages`, `__pycache__`) are not entered.
    """
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs)
        for name in filenames:
            if fnmatch.fnmatch(name, pattern):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def split_by_file(paths: Iterable[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Split paths into (train, held-out) by a hash of each path; each list is ordered by that hash.

    Ordering by hash spreads a capped selection (`paths[:n]`) over the whole tree instead of its first folders.
    """
    ordered = sorted(paths, key=lambda p: (hashlib.sha256(p.encode("utf-8")).hexdigest(), p))
    heldout = [p for p in ordered if hash_fraction("heldout:" + p) < heldout_fraction]
    heldout_set = set(heldout)
    return [p for p in ordered if p not in heldout_set], heldout


def read_text_files(root: str | os.PathLike, paths: Iterable[str], limit: int, max_bytes: int | None = None
                    ) -> tuple[list[str], list[str]]:
    """Read up to `limit` UTF-8 files (in the given order), skipping empty, undecodable or too large ones.

    Returns (texts, the relative paths used).
    """
    texts, used = [], []
    for path in paths:
        if len(used) >= limit:
            break
        full = Path(root) / path
        if max_bytes is not None and full.stat().st_size > max_bytes:
            continue
        try:
            text = full.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
            used.append(path)
    return texts, used


def split_text_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split one text into (head, tail) at a line boundary, the tail holding about `fraction` of the lines."""
    lines = text.splitlines(keepends=True)
    if fraction <= 0 or len(lines) < 2:
        return text, ""
    cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - fraction))))
    return "".join(lines[:cut]), "".join(lines[cut:])


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = True):
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`; returns a `PreTrainedTokenizerFast`.

    Special tokens: `<|pad|>` (0), `<|bos|>` (1), `<|eos|>` (2). Encoding prepends `<|bos|>`. Training is
    deterministic for the same texts and settings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=1_000_000, **SPECIAL_TOKENS)


def tokenize_documents(tokenizer, texts: Sequence[str], batch_size: int = 64, desc: str = "Tokenizing") -> list[int]:
    """One token stream: each document is `<|bos|> tokens <|eos|>`, documents concatenated in order."""
    from tqdm.auto import tqdm

    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=len(texts) <= batch_size):
        for ids in tokenizer(list(texts[start : start + batch_size]), verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    return stream


class BlockDataset(torch.utils.data.Dataset):
    """A token stream cut into blocks of `block_size` (the remainder is dropped); labels are the inputs."""

    def __init__(self, token_ids: Sequence[int], block_size: int) -> None:
        num_blocks = len(token_ids) // block_size
        self.blocks = torch.tensor(token_ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model (counts from the train tokens) on the held-out targets.

    Targets are the tokens the language model predicts: every block position but the first.
    """
    counts = torch.bincount(train_blocks.reshape(-1), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = eval_blocks[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())


def parameter_counts(model: torch.nn.Module, experts_per_token: Sequence[float] | None = None) -> dict[str, int]:
    """Total parameters, and parameters a token uses: all but the routed experts, plus its experts' share.

    `active_max` assumes every token fills `experts_per_token_limit` experts; `active_mean` (only when
    `experts_per_token`, one measured value per MoE layer in layer order, is given) uses the measured means.
    """
    total = sum(p.numel() for p in model.parameters())
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    routed = sum(p.numel() for m in experts for p in m.parameters())
    limit = model.config.experts_per_token_limit
    counts = {"total": total, "routed_experts": routed}
    per_expert = [sum(p.numel() for p in m.parameters()) / m.num_experts for m in experts]
    counts["active_max"] = int(total - routed + sum(n * limit for n in per_expert))
    if experts_per_token is not None:
        counts["active_mean"] = int(total - routed + sum(n * k for n, k in zip(per_expert, experts_per_token)))
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Trainer callback
# ----------------------------------------------------------------------------------------------------------------


class _Accumulator:
    """Sums for one optimizer step (training) or one evaluation."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.loss_sum = 0.0  # sum of per-token LM losses
        self.tokens = 0  # LM targets
        self.aux_sum = 0.0  # aux loss weighted by forwards
        self.forwards = 0
        self.routed_tokens = torch.zeros(num_layers, dtype=torch.float64)
        self.selections = torch.zeros(num_layers, num_experts, dtype=torch.float64)

    def summary(self) -> dict:
        loss = self.loss_sum / max(self.tokens, 1)
        load = self.selections / self.selections.sum(dim=1, keepdim=True).clamp(min=1.0)
        return {
            "loss": loss,
            "aux_loss": self.aux_sum / max(self.forwards, 1),
            "tokens": self.tokens,
            "experts_per_token": (self.selections.sum(dim=1) / self.routed_tokens.clamp(min=1.0)).tolist(),
            "expert_load": load.tolist(),
        }


class MoeStatsCallback(TrainerCallback):
    """Records, per optimizer step and per evaluation, the LM loss and the routing of every MoE layer.

    Forward hooks on the model and on each `Router` see every forward that has `labels`: the language-model loss
    (the model's loss minus its router `aux_loss`, weighted by the number of target tokens), and the experts each
    token selected. Forwards without labels (generation) are ignored, and so are the recomputations of gradient
    checkpointing (they run after the model's forward has returned).

    - `train_history`: one dict per optimizer step: `step`, `loss`, `aux_loss`, `tokens`, `experts_per_token`
      (per MoE layer), `expert_load` (per MoE layer, fraction of the selections each expert got).
    - `eval_history`: the same per evaluation (`loss` is the held-out LM loss, without the auxiliary terms).
    - `train_seconds`: training wall time, carried over from the checkpoint on resume.

    `on_save` writes the history into the checkpoint folder; `load_checkpoint(folder)` restores it.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers: list[Router] = [m for m in model.modules() if isinstance(m, Router)]
        self.num_layers = len(self.routers)
        self.num_experts = self.routers[0].num_experts if self.routers else 0
        self.moe_layer_indices = [
            int(name.split("layers.")[1].split(".")[0])
            for name, m in model.named_modules()
            if isinstance(m, Router) and "layers." in name
        ]
        self.train_history: list[dict] = []
        self.eval_history: list[dict] = []
        self.train_seconds = 0.0
        self._session_start: float | None = None
        self._seconds_before = 0.0
        self._recording = False
        self._token_mask: torch.Tensor | None = None
        self._train_acc = self._new_acc()
        self._eval_acc = self._new_acc()
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._router_hook(layer)))
        self._model = model

    def _new_acc(self) -> _Accumulator:
        return _Accumulator(self.num_layers, self.num_experts)

    @property
    def _acc(self) -> _Accumulator:
        return self._train_acc if self._model.training else self._eval_acc

    # -- hooks --
    def _before_forward(self, module, args, kwargs) -> None:
        self._recording = kwargs.get("labels") is not None
        mask = kwargs.get("attention_mask")
        self._token_mask = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _router_hook(self, layer: int):
        def hook(module, args, output) -> None:
            if not self._recording:
                return
            selected = output[2].detach()
            if self._token_mask is not None and self._token_mask.numel() == selected.shape[0]:
                selected = selected[self._token_mask.to(selected.device)]
            acc = self._acc
            counts = torch.bincount(selected.reshape(-1).cpu(), minlength=self.num_experts + 1)[: self.num_experts]
            acc.selections[layer] += counts.double()
            acc.routed_tokens[layer] += selected.shape[0]

        return hook

    def _after_forward(self, module, args, kwargs, output) -> None:
        if not self._recording:
            return
        self._recording = False
        labels = kwargs["labels"]
        loss = output["loss"] if isinstance(output, dict) else output[0]
        aux = output.get("aux_loss") if isinstance(output, dict) else None
        lm_loss = float(loss.detach()) - (float(aux.detach()) if aux is not None else 0.0)
        tokens = int((labels[..., 1:] != -100).sum())
        # With `num_items_in_batch` (Trainer, gradient accumulation) the model divides by the whole step's tokens.
        scale = kwargs.get("num_items_in_batch")
        scale = int(scale) if scale is not None else tokens
        acc = self._acc
        acc.loss_sum += lm_loss * scale
        acc.tokens += tokens
        acc.aux_sum += float(aux.detach()) if aux is not None else 0.0
        acc.forwards += 1

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- Trainer events --
    def on_train_begin(self, args, state, control, **kwargs):
        self._session_start = time.perf_counter()
        self._seconds_before = self.train_seconds
        self._train_acc = self._new_acc()

    def on_step_end(self, args, state, control, **kwargs):
        while self.train_history and self.train_history[-1]["step"] >= state.global_step:
            self.train_history.pop()  # recorded after the checkpoint this run resumed from
        self.train_history.append({"step": state.global_step, **self._train_acc.summary()})
        self._train_acc = self._new_acc()
        self._update_time()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        entry = {"step": state.global_step, **self._eval_acc.summary()}
        entry["perplexity"] = math.exp(min(entry["loss"], 50.0))
        if metrics and "eval_loss" in metrics:
            entry["trainer_eval_loss"] = metrics["eval_loss"]
        self.eval_history.append(entry)
        self._eval_acc = self._new_acc()

    def on_train_end(self, args, state, control, **kwargs):
        self._update_time()
        self._session_start = None

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._update_time()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            data = {
                "step": state.global_step,
                "train_seconds": self.train_seconds,
                "train_history": self.train_history,
                "eval_history": self.eval_history,
            }
            write_atomically(folder / STATS_FILE, json.dumps(data).encode("utf-8"))

    def _update_time(self) -> None:
        if self._session_start is not None:
            self.train_seconds = self._seconds_before + time.perf_counter() - self._session_start

    def load_checkpoint(self, folder: str | os.PathLike) -> bool:
        """Restore the history saved in a checkpoint folder (returns False if it has none)."""
        path = Path(folder) / STATS_FILE
        if not path.is_file():
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
        step = data["step"]
        self.train_history = [e for e in data["train_history"] if e["step"] <= step]
        self.eval_history = [e for e in data["eval_history"] if e["step"] <= step]
        self.train_seconds = data.get("train_seconds", 0.0)
        return True


class TimeBudgetCallback(TrainerCallback):
    """Ends training early when going on would overrun a wall-clock deadline.

    After every optimizer step it projects the time still needed: one more step, the final evaluation (the last
    measured `eval_runtime`, or before any evaluation `eval_step_equivalents` forward passes estimated at half a
    training step each) and `reserve_seconds` for generation and saving. If that passes `deadline` (a
    `time.perf_counter()` value; None disables the budget), training stops: the step reached is checkpointed and
    evaluated (per the save / eval strategies), so `--resume_from_checkpoint` can continue to `max_steps` later.
    `stopped_at_step` tells whether it fired.
    """

    def __init__(self, deadline: float | None, eval_step_equivalents: float = 0.0, reserve_seconds: float = 20.0):
        self.deadline = deadline
        self.eval_step_equivalents = eval_step_equivalents
        self.reserve_seconds = reserve_seconds
        self.stopped_at_step: int | None = None
        self._step_start: float | None = None
        self._step_seconds: float | None = None
        self._eval_seconds: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_runtime" in metrics:
            self._eval_seconds = float(metrics["eval_runtime"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.deadline is None or self._step_start is None or state.global_step >= state.max_steps:
            return
        seconds = time.perf_counter() - self._step_start
        self._step_seconds = seconds if self._step_seconds is None else 0.8 * self._step_seconds + 0.2 * seconds
        eval_seconds = self._eval_seconds
        if eval_seconds is None:
            eval_seconds = 0.5 * self._step_seconds * self.eval_step_equivalents
        needed = self._step_seconds + eval_seconds + self.reserve_seconds
        eval_every = getattr(state, "eval_steps", None)
        if args.eval_strategy == "steps" and eval_every and (state.global_step + 1) % eval_every == 0:
            needed += eval_seconds  # the next step has a scheduled evaluation too
        if time.perf_counter() + needed > self.deadline:
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
            control.should_evaluate = args.eval_strategy != "no"
            self.stopped_at_step = state.global_step


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-<step>` folder with the highest step whose save finished (it has `trainer_state.json`).

    Unlike `transformers.trainer_utils.get_last_checkpoint`, a checkpoint cut short by a crash is skipped.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for child in output_dir.iterdir():
        name = child.name
        if child.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            if (child / "trainer_state.json").is_file():
                steps.append((int(name[len("checkpoint-"):]), child))
    return str(max(steps)[1]) if steps else None


# ----------------------------------------------------------------------------------------------------------------
# CPUs
# ----------------------------------------------------------------------------------------------------------------


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def other_running_processes() -> int:
    """Runnable tasks on the machine right now, besides this one (Linux `/proc/loadavg`; 0 elsewhere).

    Scripts give torch `available_cpus() - other_running_processes()` threads: on a busy machine, threads that wait
    for each other at every op make small ops hundreds of times slower.
    """
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_config_overrides(text: str) -> dict:
    """`--config_overrides` of the scripts: '{"a": 1}' or 'a=1,b=true,c=[1,0]' -> dict.

    Values are JSON when they parse, strings otherwise; commas inside brackets belong to the value (a JSON list stays
    whole). Raises ValueError for an item without '='.
    """
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return value
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    overrides = {}
    for item in filter(None, (part.strip() for part in [*items, current])):
        if "=" not in item:
            raise ValueError(f"{item!r} is not key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


class ScriptArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line naming the option (not the usage of 130 TrainingArguments)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help` for every option)\n")


def script_parser(
    dataclass_types: Sequence[type],
    description: str,
    training_defaults: dict,
    help_overrides: dict[str, str] | None = None,
) -> ScriptArgumentParser:
    """The parser of a training script: its dataclasses, TrainingArguments defaults it changes (listed in the epilog
    of `--help`), and clearer help for options whose meaning the script narrows (e.g. `output_dir`)."""
    parser = ScriptArgumentParser(
        tuple(dataclass_types),
        description=description,
        epilog="TrainingArguments defaults changed by this script: "
        + ", ".join(f"{k}={v}" for k, v in training_defaults.items()),
    )
    parser.set_defaults(**training_defaults)
    for action in parser._actions:
        if action.dest in (help_overrides or {}):
            action.help = help_overrides[action.dest]
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def figure_to_png(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes (for `write_atomically`) and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (scripts run headless)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(
    train_history: Sequence[dict],
    eval_history: Sequence[dict],
    baseline_loss: float | None = None,
    logged_train_loss: Sequence[tuple[int, float]] = (),
    layer_labels: Sequence[str] | None = None,
) -> bytes:
    """PNG: train LM loss per step (+ moving average), held-out loss points, and the unigram baseline; second
    panel: mean experts per token per MoE layer over training. `logged_train_loss` ((step, loss) pairs from
    the Trainer's log) fills steps the per-step history lacks (e.g. before a resume from a checkpoint without it)."""
    plt = pyplot()
    fig, (ax_loss, ax_route) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})

    steps = [e["step"] for e in train_history]
    losses = [e["loss"] for e in train_history]
    first_recorded = min(steps) if steps else float("inf")
    logged = [(s, v) for s, v in logged_train_loss if s < first_recorded]
    if logged:
        ax_loss.plot(*zip(*logged), "o-", color="tab:gray", ms=3, lw=1, label="train loss (Trainer log)")
    if steps:
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train loss (per step)")
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]
        ax_loss.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss ({window}-step mean)")
    if eval_history:
        ax_loss.plot([e["step"] for e in eval_history], [e["loss"] for e in eval_history], "o-", color="tab:red",
                     ms=6, lw=1.5, label="held-out loss")
    if baseline_loss is not None:
        ax_loss.axhline(baseline_loss, color="tab:green", ls="--", lw=1.5, label="unigram baseline (held-out)")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy (nats / token)")
    ax_loss.set_title("Language-model loss (router auxiliary terms excluded)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)

    if train_history and train_history[0]["experts_per_token"]:
        per_layer = list(zip(*[e["experts_per_token"] for e in train_history]))
        for i, values in enumerate(per_layer):
            label = layer_labels[i] if layer_labels else f"MoE layer {i}"
            ax_route.plot(steps, values, lw=1.2, label=label)
        ax_route.legend(fontsize=8)
    ax_route.set_xlabel("optimizer step")
    ax_route.set_ylabel("mean experts per token")
    ax_route.set_title("Dynamic routing during training")
    ax_route.grid(alpha=0.3)
    fig.tight_layout()
    return figure_to_png(fig)


def plot_expert_load(
    expert_load: Sequence[Sequence[float]],
    experts_per_token: Sequence[float],
    layer_labels: Sequence[str] | None = None,
    max_experts_per_token: int | None = None,
) -> bytes:
    """PNG: heatmap of the fraction of selections per (MoE layer, expert), and mean experts per token per layer."""
    plt = pyplot()
    load = torch.tensor(expert_load, dtype=torch.float64)
    num_layers, num_experts = load.shape
    labels = list(layer_labels) if layer_labels else [f"layer {i}" for i in range(num_layers)]
    fig, (ax_heat, ax_bar) = plt.subplots(
        1, 2, figsize=(max(9, 4 + 0.7 * num_experts + 4), 1.2 + 0.6 * max(num_layers, 3)),
        gridspec_kw={"width_ratios": [max(num_experts, 3), 3]},
    )
    image = ax_heat.imshow(load.numpy(), cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(load.max()), 1e-9))
    for i in range(num_layers):
        for j in range(num_experts):
            value = float(load[i, j])
            ax_heat.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                         color="black" if value > 0.6 * float(load.max()) else "white")
    ax_heat.set_xticks(range(num_experts), [str(j) for j in range(num_experts)])
    ax_heat.set_yticks(range(num_layers), labels)
    ax_heat.set_xlabel("expert")
    ax_heat.set_title(f"Expert load on held-out data (uniform = {1 / num_experts:.3g})")
    fig.colorbar(image, ax=ax_heat, fraction=0.046, pad=0.04, label="fraction of selections")

    ax_bar.barh(range(num_layers), experts_per_token, color="tab:orange")
    for i, value in enumerate(experts_per_token):
        ax_bar.text(value, i, f" {value:.2f}", va="center", fontsize=8)
    ax_bar.set_yticks(range(num_layers), labels)
    ax_bar.invert_yaxis()
    xlabel = "mean experts per token"
    if max_experts_per_token:
        ax_bar.axvline(max_experts_per_token, color="gray", ls="--", lw=1)
        ax_bar.set_xlim(0, max_experts_per_token * 1.3)
        xlabel += f" (dashed: maximum {max_experts_per_token})"
    ax_bar.set_xlabel(xlabel)
    ax_bar.set_title("Experts per token (held-out)")
    fig.tight_layout()
    return figure_to_png(fig)


# ----------------------------------------------------------------------------------------------------------------
# Model card and atomic save
# ----------------------------------------------------------------------------------------------------------------


def render_model_card(template: str, values: dict) -> str:
    """Fill a `string.Template` (`${name}` placeholders); a missing value raises KeyError naming it."""
    return string.Template(template).substitute({k: str(v) for k, v in values.items()})


def code_fence(text: str, language: str = "") -> str:
    """`text` in a Markdown code block whose fence is longer than any backtick run inside it."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file through a temporary sibling and `os.replace`: readers never see half a file."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_pretrained(
    folder: str | os.PathLike,
    *objects,
    extra_files: dict[str, bytes | str] | None = None,
    keep: Sequence[str] = ("checkpoint-*", "runs"),
) -> Path:
    """Save `objects` (anything with `save_pretrained`) and `extra_files` (name -> content) as `folder`, atomically.

    Everything is written into a temporary sibling folder (`.<name>.tmp-*`) and flushed to disk; only then is the
    previous `folder` moved aside and the new one renamed into place. If saving fails or the process dies,
    `folder` is untouched: it still holds the previous complete save, or does not exist. (A crash between the
    two renames leaves `folder` missing and the new save complete in the temporary sibling.)

    `keep`: glob patterns of entries of the previous `folder` to carry over into the new one (default: Trainer's
    `checkpoint-*` folders and `runs` logs, so a run saved into its own output_dir can still be resumed); every
    other previous entry is deleted. Pass `keep=()` to replace the folder entirely.
    """
    folder = Path(folder).absolute()
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{folder.name}.tmp-*"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old = None
    if folder.exists():
        old = parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(parent)
    if old is not None:
        for entry in sorted(old.iterdir()):
            if any(fnmatch.fnmatch(entry.name, pattern) for pattern in keep) and not (folder / entry.name).exists():
                os.replace(entry, folder / entry.name)
        shutil.rmtree(old, ignore_errors=True)
    return folder
