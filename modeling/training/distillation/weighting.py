"""Combining several task losses in one run: fixed weights, a plain sum, or learned uncertainty weighting.

Uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR; the classification form, eq. 10): each task t has a learned log-variance s_t and
contributes exp(-s_t) * L_t + s_t / 2, so a task whose loss stays high (noisy, hard) is down-weighted, and the
s_t / 2 term stops every weight from collapsing to 0. The effective weights exp(-s_t) are logged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

TASK_WEIGHTINGS = ("sum", "fixed", "uncertainty")


class TaskWeighting(nn.Module):
    """Task losses [K] (with a [K] bool mask of the tasks present in the batch) -> one scalar."""

    def __init__(self, num_tasks: int, mode: str = "sum", weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if mode not in TASK_WEIGHTINGS:
            raise ValueError(f"task_weighting must be one of {TASK_WEIGHTINGS}, got {mode!r}.")
        if mode == "fixed" and (weights is None or len(weights) != num_tasks):
            raise ValueError(f"task_weighting='fixed' needs task_weights with one weight per task ({num_tasks}), "
                             f"got {None if weights is None else len(weights)}.")
        self.mode = mode
        fixed = torch.tensor(list(weights), dtype=torch.float32) if mode == "fixed" else torch.ones(num_tasks)
        self.register_buffer("fixed_weights", fixed, persistent=False)
        # s_t = log sigma_t^2, learned only under uncertainty weighting (a parameter either way: one layout to save).
        self.log_variances = nn.Parameter(torch.zeros(num_tasks), requires_grad=mode == "uncertainty")

    def forward(self, task_losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """task_losses [K] (any value where not present), present [K] bool -> scalar."""
        losses = torch.where(present, task_losses, torch.zeros_like(task_losses))
        if self.mode == "uncertainty":
            terms = torch.exp(-self.log_variances) * losses + 0.5 * self.log_variances
        else:
            terms = self.fixed_weights.to(losses.device) * losses
        return (terms * present.to(terms.dtype)).sum()

    def effective_weights(self) -> torch.Tensor:
        """[K]: the multiplier of each task's loss (exp(-s_t) when learned)."""
        if self.mode == "uncertainty":
            return torch.exp(-self.log_variances.detach())
        return self.fixed_weights.clone()
