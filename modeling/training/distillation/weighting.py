"""Combining several task losses in one run: fixed weights, a plain sum, or learned weights (uncertainty weighting,
GradNorm).

Uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR; the classification form, eq. 10): each task t has a learned log-variance s_t and
contributes exp(-s_t) * L_t + s_t / 2, so a task whose loss stays high (noisy, hard) is down-weighted, and the
s_t / 2 term stops every weight from collapsing to 0. The effective weights exp(-s_t) are logged.

GradNorm (Chen, Badrinarayanan, Lee & Rabinovich 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
Deep Multitask Networks", ICML): the loss is sum_t w_t * L_t with weights w_t that the network's gradient does not
move (they enter it detached); instead, each training step, G_t = w_t * ||grad_W L_t|| over the last shared
parameters W is pulled towards mean(G) * r_t^alpha, where r_t is task t's loss ratio L_t / L_t(0) over the mean ratio
(a task that trains slower gets a larger target), by the gradient of sum_t |G_t - target_t| (target held constant) on
w only; after every optimizer step the weights are renormalized to sum to the number of tasks. ||grad_W L_t|| is
computed without a second-order graph (G_t is linear in w_t), one small backward per task to W only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

TASK_WEIGHTINGS = ("sum", "fixed", "uncertainty", "gradnorm")
LEARNED_WEIGHTINGS = ("uncertainty", "gradnorm")


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
        # GradNorm's w_t, and each task's first loss L_t(0) (-1 until the task is first seen; saved for resume).
        self.gradnorm_weights = nn.Parameter(torch.ones(num_tasks), requires_grad=mode == "gradnorm")
        self.register_buffer("initial_losses", torch.full((num_tasks,), -1.0))

    def forward(self, task_losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """task_losses [K] (any value where not present), present [K] bool -> scalar."""
        losses = torch.where(present, task_losses, torch.zeros_like(task_losses))
        if self.mode == "uncertainty":
            terms = torch.exp(-self.log_variances) * losses + 0.5 * self.log_variances
        elif self.mode == "gradnorm":  # w_t moves only by `gradnorm_update`
            terms = self.gradnorm_weights.detach() * losses
        else:
            terms = self.fixed_weights.to(losses.device) * losses
        return (terms * present.to(terms.dtype)).sum()

    def effective_weights(self) -> torch.Tensor:
        """[K]: the multiplier of each task's loss (exp(-s_t) when learned)."""
        if self.mode == "uncertainty":
            return torch.exp(-self.log_variances.detach())
        if self.mode == "gradnorm":
            return self.gradnorm_weights.detach().clone()
        return self.fixed_weights.clone()

    def gradnorm_update(self, task_losses: torch.Tensor, present: torch.Tensor, shared: Sequence[nn.Parameter],
                        alpha: float = 1.5) -> torch.Tensor | None:
        """Add GradNorm's gradient to `gradnorm_weights.grad` (module docstring); call it on every training
        micro-batch, before the loss's backward (it keeps the graph). task_losses [K] (with their graph to `shared`),
        present [K] bool. Returns the GradNorm loss (None when fewer than two tasks are present)."""
        if self.mode != "gradnorm":
            raise ValueError(f"gradnorm_update needs task_weighting='gradnorm', not {self.mode!r}.")
        first = present & (self.initial_losses < 0)
        self.initial_losses[first] = task_losses.detach()[first].to(self.initial_losses.dtype)
        tasks = [int(k) for k in torch.nonzero(present).flatten()]
        if len(tasks) < 2:
            return None
        norms = []
        for k in tasks:  # ||grad_W L_k||: one backward to the shared parameters only
            grads = torch.autograd.grad(task_losses[k], list(shared), retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
        norms = torch.stack(norms).detach()  # [P]
        weights = self.gradnorm_weights[tasks]  # [P], with grad
        g = weights * norms  # G_t
        ratios = task_losses.detach()[tasks].float() / self.initial_losses[tasks].clamp(min=1e-12)
        target = (g.mean() * (ratios / ratios.mean()) ** alpha).detach()
        gradnorm_loss = (g - target).abs().sum()
        (grad,) = torch.autograd.grad(gradnorm_loss, self.gradnorm_weights)
        self.gradnorm_weights.grad = grad if self.gradnorm_weights.grad is None else self.gradnorm_weights.grad + grad
        return gradnorm_loss.detach()

    @torch.no_grad()
    def renormalize(self) -> None:
        """GradNorm's weights back to positive values summing to the number of tasks (after each optimizer step)."""
        if self.mode == "gradnorm":
            weights = self.gradnorm_weights.clamp(min=1e-3)
            self.gradnorm_weights.copy_(weights * (len(weights) / weights.sum()))
