"""Parameter counts: total, and active per token for a sparse model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layers import Experts


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
