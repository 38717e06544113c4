"""DP-SGD through `transformers.Trainer` with Opacus: `PrivacyArguments` and `PrivateTrainer`.

What makes a Trainer run differentially private, and what this trainer does for each:

- Poisson sampling (each example joins each batch independently with probability q = batch size / N): the
  accountant's amplification by sampling assumes it. The training loader is Opacus's `DPDataLoader`; batches have
  random sizes (possibly empty: the step still adds noise and is counted).
- Per-example gradients clipped to `per_sample_max_grad_norm`, summed, and Gaussian noise of std
  `noise_multiplier * per_sample_max_grad_norm` added (Opacus's `DPOptimizer`); the loss is `private_loss`, a mean
  of per-example terms (the routers' balance loss per sequence: see `lightarch.training.privacy.loss`), and the
  per-sample gradients of lightarch's layers come from `lightarch.training.privacy.grad_samplers`.
- Noise calibrated to (`target_epsilon`, `target_delta`) for the run's steps, or a given `noise_multiplier`;
  epsilon logged with every log line; the accountant's history saved in every checkpoint and restored on resume,
  so a resumed run reports the epsilon of an uninterrupted one.
- Ghost / fast gradient clipping (`grad_sample_mode="ghost"`): per-example gradient norms instead of per-sample
  gradients, then a second backward of the clipping-weighted per-example losses (Opacus's machinery; see
  `lightarch.training.privacy.ghost` for what happens to each lightarch layer). Same step, noise and accounting.
- Logical batches larger than memory: each Poisson batch runs in chunks of at most `max_physical_batch_size`
  examples whose clipped gradients are summed before the one noisy step (as Opacus's `BatchMemoryManager`).

Refused, because they void the guarantee:

- Trainer-side clipping (`max_grad_norm > 0`): it runs on the non-private gradient and Trainer logs that
  gradient's norm, a release of the data the accountant does not count. (Trainer's logged `grad_norm` is dropped
  here for the same reason.) The per-example bound is `per_sample_max_grad_norm`.
- A sampler other than Poisson (`poisson_sampling=False`), and gradient accumulation (a Poisson batch is one step:
  use `max_physical_batch_size`).
- The DeepSeek-V3 aux-loss-free bias update (`router_bias_update_rate > 0`, `RouterBiasUpdateCallback`): the bias
  moves by `sign(mean load - load)` computed from each batch's expert counts, outside the gradient, so no clipping
  bounds it and no noise covers it. It is switched off under DP rather than accounted for; the balance loss keeps
  experts balanced instead, and being part of the loss (per sequence) it is clipped and noised like any gradient.

Not private: the training loss Trainer logs is computed on the private batches (as in dp-transformers); evaluation
on held-out data and the model are covered by the guarantee.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ...layers import Router
from ..router_bias import RouterBiasUpdateCallback
from .accounting import (
    calibrate_noise,
    check_accountant,
    load_accountant,
    save_accountant,
)
from .ghost import (
    GRAD_SAMPLE_MODES,
    check_ghost_supported,
    ghost_backward,
    make_private_ghost,
    per_example_private_losses,
)
from .grad_samplers import finish_per_sample_gradients, prepare_per_sample_gradients
from .loss import private_loss


@dataclass
class PrivacyArguments:
    """The (epsilon, delta) guarantee of a DP-SGD run and how it is reached."""

    target_epsilon: float | None = field(
        default=8.0,
        metadata={"help": "Epsilon the whole run may spend; the noise multiplier is calibrated to reach at most this "
                  "after max_steps (or the epochs' steps). Ignored when --noise_multiplier is given."},
    )
    target_delta: float | None = field(
        default=None, metadata={"help": "Delta of the guarantee, in (0, 1); default 1 / (number of training examples)."}
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "Noise std / clipping norm, instead of calibrating to --target_epsilon; the epsilon it "
                  "reaches is reported."},
    )
    per_sample_max_grad_norm: float = field(
        default=1.0, metadata={"help": "Every example's gradient is clipped to this L2 norm (DP-SGD's C)."}
    )
    max_physical_batch_size: int | None = field(
        default=None,
        metadata={"help": "Run each Poisson batch in chunks of at most this many examples (memory); the step, the "
                  "noise and the accounting are the same. Default: the whole batch at once."},
    )
    accountant: str = field(default="rdp", metadata={"help": "Opacus accountant: 'rdp', 'prv' or 'gdp'."})
    poisson_sampling: bool = field(
        default=True, metadata={"help": "Must stay True: the accountant assumes Poisson sampling."}
    )
    grad_sample_mode: str = field(
        default="hooks",
        metadata={"help": "'hooks': every parameter's per-sample gradient is kept until clipping; 'ghost': ghost / "
                  "fast gradient clipping (Opacus): only per-example gradient norms, then a second backward gives "
                  "the clipped sum (same step, noise and epsilon; less memory). See lightarch.training.privacy.ghost."},
    )


def check_privacy_arguments(privacy: PrivacyArguments) -> None:
    """The checks of `PrivacyArguments` alone (before any data is prepared); a ValueError names the field."""
    check_accountant(privacy.accountant)
    if privacy.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got "
                         f"{privacy.grad_sample_mode!r}.")
    if not privacy.poisson_sampling:
        raise ValueError("poisson_sampling=False: the accountant's epsilon assumes Poisson sampling (every example "
                         "joins every batch independently); keep poisson_sampling=True.")
    if privacy.noise_multiplier is None and privacy.target_epsilon is None:
        raise ValueError("Set target_epsilon (the noise is calibrated to it) or noise_multiplier.")
    if privacy.noise_multiplier is not None and privacy.noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {privacy.noise_multiplier}.")
    if privacy.noise_multiplier is None and not privacy.target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {privacy.target_epsilon}.")
    if privacy.target_delta is not None and not 0 < privacy.target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {privacy.target_delta}.")
    if not privacy.per_sample_max_grad_norm > 0:
        raise ValueError(f"per_sample_max_grad_norm must be > 0, got {privacy.per_sample_max_grad_norm}.")
    if privacy.max_physical_batch_size is not None and privacy.max_physical_batch_size < 1:
        raise ValueError(f"max_physical_batch_size must be >= 1, got {privacy.max_physical_batch_size}.")


def check_privacy_setup(privacy: PrivacyArguments, args, model: torch.nn.Module, callbacks=()) -> None:
    """A ValueError naming the setting and the fix for everything that would void the guarantee."""
    check_privacy_arguments(privacy)
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        raise ValueError(
            f"max_grad_norm={args.max_grad_norm}: Trainer would clip the non-private summed gradient and log its "
            "norm, a release of the training data the accountant does not count; set max_grad_norm=0 (the "
            "per-example clipping norm is PrivacyArguments.per_sample_max_grad_norm)."
        )
    if args.gradient_accumulation_steps != 1:
        raise ValueError(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: a Poisson batch is one "
                         "DP step; set it to 1 and use max_physical_batch_size to bound memory.")
    if args.gradient_checkpointing:
        raise ValueError("gradient_checkpointing=True runs layers twice per backward, which the per-sample "
                         "gradient hooks do not support; set gradient_checkpointing=False.")
    if privacy.grad_sample_mode == "ghost":
        check_ghost_supported(model)
    for name, module in model.named_modules():
        if isinstance(module, Router) and module.bias_update_rate > 0:
            raise ValueError(
                f"{name}: router_bias_update_rate={module.bias_update_rate}: the DeepSeek-V3 bias update moves the "
                "routing bias by each batch's expert counts, outside the clipped and noised gradient, so DP-SGD's "
                "guarantee does not cover it; set router_bias_update_rate=0 under DP (the balance loss, part of "
                "the private gradient, keeps experts balanced)."
            )
    if any(isinstance(callback, RouterBiasUpdateCallback) or callback is RouterBiasUpdateCallback
           for callback in callbacks or ()):
        raise ValueError("RouterBiasUpdateCallback: the bias update is a non-private release of each batch's expert "
                         "counts; remove it from the callbacks of a PrivateTrainer.")


class PrivateTrainer(Trainer):
    """`Trainer` running DP-SGD (Opacus) on a lightarch model; see the module docstring for what is guaranteed.

    `PrivateTrainer(model, args, privacy=PrivacyArguments(...), train_dataset=..., ...)`; `args.max_grad_norm` must
    be 0. After training, `privacy_report()` gives epsilon, delta, accountant, sampling rate, steps, noise
    multiplier and clipping norm.
    """

    def __init__(self, *args, privacy: PrivacyArguments | None = None, **kwargs) -> None:
        self.privacy = privacy if privacy is not None else PrivacyArguments()
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is None or training_args is None:
            raise ValueError("PrivateTrainer needs model and args (TrainingArguments with max_grad_norm=0).")
        check_privacy_setup(self.privacy, training_args, model, kwargs.get("callbacks"))
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # private_loss is a per-example mean; no token-count rescaling
        self.args.ignore_data_skip = True  # Poisson batches are drawn afresh: nothing to skip on resume
        self.privacy_engine = None
        self.sample_rate = self.noise_multiplier = self.delta = None
        self._resumed_history: list = []

    # ---- data, optimizer, Opacus ----

    def get_train_dataloader(self) -> DataLoader:
        """Opacus's Poisson-sampling loader; makes the model, optimizer and accountant private on first call."""
        if self.privacy_engine is not None:
            return self._private_loader
        from opacus import PrivacyEngine

        if self.train_dataset is None:
            raise ValueError("PrivateTrainer: training requires a train_dataset.")
        base = DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          num_workers=self.args.dataloader_num_workers)
        self.sample_rate = 1.0 / len(base)
        self.delta = self.privacy.target_delta or 1.0 / len(self.train_dataset)
        steps = self.planned_steps(len(base))
        if self.privacy.noise_multiplier is not None:
            self.noise_multiplier = float(self.privacy.noise_multiplier)
        else:
            self.noise_multiplier = calibrate_noise(self.privacy.target_epsilon, self.delta, self.sample_rate, steps,
                                                    self.privacy.accountant)
        if self.optimizer is None:
            self.create_optimizer()
        engine = PrivacyEngine(accountant=self.privacy.accountant)
        if self.privacy.grad_sample_mode == "ghost":
            wrapped, self.optimizer, self._private_loader = make_private_ghost(
                engine, self.model, self.optimizer, base, self.noise_multiplier, self.privacy.per_sample_max_grad_norm)
        else:
            wrapped, self.optimizer, self._private_loader = engine.make_private(
                module=self.model, optimizer=self.optimizer, data_loader=base, noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.privacy.per_sample_max_grad_norm, poisson_sampling=True, loss_reduction="mean",
                grad_sample_mode="hooks",
            )
        prepare_per_sample_gradients(wrapped, loss_reduction="mean")
        self._dp_module = wrapped
        self._dp_optimizer = self.optimizer
        engine.accountant.history = [tuple(entry) for entry in self._resumed_history]
        self.privacy_engine = engine
        return self._private_loader

    def planned_steps(self, batches_per_epoch: int) -> int:
        """The optimizer steps the noise is calibrated for: max_steps, or the epochs' steps."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * batches_per_epoch))

    # ---- one DP step ----

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One Poisson batch, in chunks of at most `max_physical_batch_size`; Trainer's `optimizer.step()` follows."""
        optimizer = self._dp_optimizer
        optimizer.zero_grad(set_to_none=True)  # grad_sample / summed_grad of the previous step
        model.train()
        inputs = self._prepare_inputs(inputs)
        batch_size = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        ghost = self.privacy.grad_sample_mode == "ghost"
        if batch_size == 0:  # an empty Poisson batch: the step still adds noise and is accounted for
            for param in optimizer.params:
                if ghost:  # the fast-clipping optimizer sums .grad
                    param.grad = torch.zeros_like(param)
                else:
                    param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
            return torch.zeros((), device=self.args.device)
        chunk = self.privacy.max_physical_batch_size or batch_size
        total = torch.zeros((), device=self.args.device)
        for start in range(0, batch_size, chunk):
            part = {key: value[start:start + chunk] if isinstance(value, torch.Tensor) else value
                    for key, value in inputs.items()}
            if ghost:  # per-example losses (b,); two backward passes leave the clipped sum in .grad
                with self.compute_loss_context_manager():
                    losses, _ = per_example_private_losses(model, part)
                ghost_backward(self._dp_module, optimizer, losses)
                loss = losses.detach().mean()
            else:
                with self.compute_loss_context_manager():
                    loss = private_loss(model, part)
                self.accelerator.backward(loss)
                finish_per_sample_gradients(model)
            total = total + loss.detach() * min(chunk, batch_size - start)
            if start + chunk < batch_size:  # clip and sum this chunk now; the noisy step comes with the last one
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return total / batch_size

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer would log the norm of the non-private gradient: nothing is logged instead."""
        return

    # ---- epsilon: logs, checkpoints, resume ----

    def epsilon(self) -> float:
        """Epsilon spent so far (0 before the first step)."""
        if self.privacy_engine is None or not self.privacy_engine.accountant.history:
            return 0.0
        return float(self.privacy_engine.get_epsilon(self.delta))

    def privacy_report(self) -> dict:
        """The guarantee of the steps taken: what a model card must state."""
        steps = sum(entry[2] for entry in self.privacy_engine.accountant.history) if self.privacy_engine else 0
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "accountant": self.privacy.accountant,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self._train_batch_size,
            "steps": steps,
            "noise_multiplier": self.noise_multiplier,
            "per_sample_max_grad_norm": self.privacy.per_sample_max_grad_norm,
            "target_epsilon": None if self.privacy.noise_multiplier is not None else self.privacy.target_epsilon,
            "poisson_sampling": True,
            "grad_sample_mode": self.privacy.grad_sample_mode,
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.privacy_engine is not None:
            logs["epsilon"] = round(self.epsilon(), 4)
        logs.pop("grad_norm", None)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if os.path.isdir(folder) and self.privacy_engine is not None:
            save_accountant(folder, {**self.privacy_report(), "history": self.privacy_engine.accountant.history,
                                     "privacy_arguments": asdict(self.privacy)})

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; on resume the accountant continues from the checkpoint's history."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {self.args.output_dir}.")
        if resume_from_checkpoint:
            state = load_accountant(resume_from_checkpoint)
            if state["accountant"] != self.privacy.accountant:
                raise ValueError(f"accountant={self.privacy.accountant!r} but the checkpoint was accounted with "
                                 f"{state['accountant']!r}; resume with accountant={state['accountant']!r}.")
            self._resumed_history = state["history"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


__all__ = ["PrivacyArguments", "PrivateTrainer", "check_privacy_arguments", "check_privacy_setup"]
