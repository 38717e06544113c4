"""Plots as PNG bytes (matplotlib's Agg backend, imported on first use): loss curves and expert load."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch


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
