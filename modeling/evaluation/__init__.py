"""Evaluation: metrics, task evaluations (`passkey`, `adaptive_depth`, `multimodal`), plots and model cards."""

from .model_cards import code_fence, render_model_card
from .parameters import parameter_counts
from .perplexity import perplexity, unigram_perplexity
from .plots import figure_to_png, plot_expert_load, plot_loss_curves, pyplot

__all__ = [
    "code_fence",
    "figure_to_png",
    "parameter_counts",
    "perplexity",
    "plot_expert_load",
    "plot_loss_curves",
    "pyplot",
    "render_model_card",
    "unigram_perplexity",
]
