"""Trainer callbacks: per-step loss and router statistics saved with each checkpoint, and a wall-time budget."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..layers import Router
from .checkpoints import write_atomically


STATS_FILE = "moe_stats.json"


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
