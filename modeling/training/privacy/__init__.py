"""Differential-privacy training (DP-SGD through Opacus, MoE experts included): issue 16.

- `grad_samplers`: exact per-sample gradients for lightarch's layers (RMSNorm, Router, 3D Experts, shared experts),
  registered with Opacus; `prepare_per_sample_gradients` / `finish_per_sample_gradients`.
- `loss`: `private_loss`, the model's loss as a mean of per-example terms (per-sequence balance loss).
- `trainer`: `PrivacyArguments`, `PrivateTrainer` (Poisson sampling, clipping, calibrated noise, epsilon in logs and
  checkpoints, chunked logical batches) and the settings it refuses.
- `accounting`: noise calibration, an independent epsilon from dp-accounting, the accountant in checkpoints.
"""

from .accounting import (
    calibrate_noise,
    independent_epsilon,
    load_accountant,
    opacus_epsilon,
    save_accountant,
)
from .grad_samplers import finish_per_sample_gradients, prepare_per_sample_gradients
from .loss import per_sequence_aux_loss, private_loss
from .trainer import (
    PrivacyArguments,
    PrivateTrainer,
    check_privacy_arguments,
    check_privacy_setup,
)

__all__ = [
    "PrivacyArguments",
    "PrivateTrainer",
    "calibrate_noise",
    "check_privacy_arguments",
    "check_privacy_setup",
    "finish_per_sample_gradients",
    "independent_epsilon",
    "load_accountant",
    "opacus_epsilon",
    "per_sequence_aux_loss",
    "prepare_per_sample_gradients",
    "private_loss",
    "save_accountant",
]
