"""Differential-privacy training (DP-SGD through Opacus, MoE experts included): issue 16.

- `grad_samplers`: exact per-sample gradients for lightarch's layers (RMSNorm, Router, 3D Experts, shared experts),
  registered with Opacus; `prepare_per_sample_gradients` / `finish_per_sample_gradients`.
- `loss`: `private_loss`, the model's loss as a mean of per-example terms (per-sequence balance loss).
- `trainer`: `PrivacyArguments`, `PrivateTrainer` (Poisson sampling, clipping, calibrated noise, epsilon in logs and
  checkpoints, chunked logical batches, `grad_sample_mode="ghost"`) and the settings it refuses.
- `ghost`: ghost / fast gradient clipping through Opacus (`GhostClippingModule`, `per_example_private_losses`,
  `ghost_backward`, `make_private_ghost`): per-example norms instead of per-sample gradients.
- `accounting`: noise calibration, an independent epsilon from dp-accounting, the accountant in checkpoints.
"""

from .accounting import (
    calibrate_noise,
    independent_epsilon,
    load_accountant,
    opacus_epsilon,
    save_accountant,
)
from .ghost import (
    GhostClippingModule,
    ghost_backward,
    make_private_ghost,
    per_example_private_losses,
)
from .grad_samplers import finish_per_sample_gradients, prepare_per_sample_gradients
from .loss import per_sequence_aux_loss, per_sequence_aux_losses, private_loss
from .trainer import (
    PrivacyArguments,
    PrivateTrainer,
    check_privacy_arguments,
    check_privacy_setup,
)

__all__ = [
    "GhostClippingModule",
    "PrivacyArguments",
    "PrivateTrainer",
    "calibrate_noise",
    "check_privacy_arguments",
    "check_privacy_setup",
    "finish_per_sample_gradients",
    "ghost_backward",
    "independent_epsilon",
    "load_accountant",
    "make_private_ghost",
    "opacus_epsilon",
    "per_example_private_losses",
    "per_sequence_aux_loss",
    "per_sequence_aux_losses",
    "prepare_per_sample_gradients",
    "private_loss",
    "save_accountant",
]
