"""Perplexity of a causal LM on token blocks, and the unigram baseline it is compared with."""

from __future__ import annotations

import math

import torch
from torch import nn


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token cross entropy) over `blocks` (B, T) (no auxiliary router loss), through lightarch's
    `perplexity` evaluate metric (`lightarch.evaluation.metrics`), so every reported perplexity is one computation."""
    from .metrics import load_metric

    return load_metric("perplexity").compute(model=model, references=blocks, batch_size=batch_size)["perplexity"]


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model (counts from the train tokens) on the held-out targets.

    Targets are the tokens the language model predicts: every block position but the first.
    """
    counts = torch.bincount(train_blocks.reshape(-1), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = eval_blocks[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())
