"""Privacy accounting: noise calibration (Opacus), an independent epsilon (Google's dp-accounting), and the
accountant's state in a checkpoint.

DP-SGD with Poisson sampling at rate q, noise multiplier sigma and T steps is the T-fold composition of the
sampled Gaussian mechanism; Opacus's accountants (RDP, PRV) and dp-accounting's (RDP, PLD) bound the same
mechanism with different analyses, so their epsilons must agree closely for the same (sigma, q, T, delta).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..checkpoints import write_atomically

ACCOUNTANT_FILE = "privacy_accountant.json"  # in every checkpoint-<step> folder of a private run
ACCOUNTANTS = ("rdp", "prv", "gdp")


def check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}.")


def calibrate_noise(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """The smallest noise multiplier (within Opacus's 0.01 tolerance) whose epsilon after `steps` is <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    check_accountant(accountant)
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


def opacus_epsilon(history: list, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of an Opacus accountant history [(noise_multiplier, sample_rate, steps), ...]."""
    from opacus.accountants import create_accountant

    check_accountant(accountant)
    if not history:
        return 0.0
    account = create_accountant(accountant)
    account.history = [tuple(entry) for entry in history]
    return float(account.get_epsilon(delta=delta))


def independent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                        method: str = "rdp") -> float:
    """Epsilon of the same DP-SGD run from Google's dp-accounting (`method` "rdp" or "pld"), not from Opacus."""
    import dp_accounting

    logging.getLogger("absl").setLevel(logging.ERROR)  # per-order convergence notes, not errors
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    if method == "rdp":
        account = dp_accounting.rdp.RdpAccountant()
    elif method == "pld":
        account = dp_accounting.pld.PLDAccountant()
    else:
        raise ValueError(f"method must be 'rdp' or 'pld', got {method!r}.")
    return float(account.compose(event).get_epsilon(delta))


def save_accountant(folder: str | os.PathLike, state: dict) -> None:
    """Write the accountant's state (history, delta, accountant, sampling rate, ...) into a checkpoint folder."""
    write_atomically(Path(folder) / ACCOUNTANT_FILE, json.dumps(state, indent=2))


def load_accountant(folder: str | os.PathLike) -> dict:
    """The accountant state of a checkpoint; a checkpoint without one cannot continue a private run."""
    path = Path(folder) / ACCOUNTANT_FILE
    if not path.is_file():
        raise ValueError(f"resume_from_checkpoint={str(folder)!r} has no {ACCOUNTANT_FILE}: it is not a checkpoint "
                         "of a private run, and continuing from it would not account for the privacy already "
                         "spent; resume from a PrivateTrainer checkpoint or start a new run.")
    return json.loads(path.read_text())


__all__ = [
    "ACCOUNTANTS",
    "ACCOUNTANT_FILE",
    "calibrate_noise",
    "independent_epsilon",
    "load_accountant",
    "opacus_epsilon",
    "save_accountant",
]
