"""Distillation losses: output distributions (forward KL, reverse KL, generalized JSD) and feature alignment.

The divergence follows TRL's `GKDTrainer.generalized_jsd_loss` (huggingface/trl, `trl/trainer/gkd_trainer.py`,
Apache-2.0; Agarwal et al. 2024, "On-Policy Distillation of Language Models", arXiv:2306.13649): `beta` interpolates
the mixture M = beta * teacher + (1 - beta) * student, the loss is beta * KL(teacher || M) + (1 - beta) *
KL(student || M), and the two ends are the plain KLs (0: forward KL(teacher || student), 1: reverse KL(student ||
teacher)). Unlike TRL, it is scaled by temperature^2 (Hinton et al. 2015, so that gradients keep their size when the
temperature changes), masked to real tokens, and works for [B, C] classification logits as well as [B, T, V].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
            "the same shape; for a vocabulary mismatch align the tokenizers or use feature / sequence-level "
            "distillation instead of logit distillation."
        )
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, C] or [B, T, V], got shape {tuple(student_logits.shape)}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {beta}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def distillation_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between teacher and student output distributions, averaged over real positions.

    student_logits, teacher_logits: [B, C] (classification) or [B, T, V] (causal LM, already aligned so that
    position t of both predicts the same token). mask: [B] or [B, T], 1/True for positions that count (padding and
    prompt tokens 0); None counts every position. beta: 0 forward KL(teacher || student) (mean-seeking, Hinton),
    1 reverse KL(student || teacher) (mode-seeking, MiniLLM), in between the generalized JSD. The result is
    multiplied by temperature^2. Returns a scalar (0 when no position is real).
    """
    _check_logits(student_logits, teacher_logits, beta, temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # half precision upcast, float64 kept
    student_log_probs = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [B, (T,) V]
    teacher_log_probs = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0.0:
        per_position = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1.0:
        per_position = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + math.log(1.0 - beta), teacher_log_probs + math.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        per_position = beta * kl_teacher + (1.0 - beta) * kl_student
    per_position = per_position.sum(dim=-1)  # [B] or [B, T]
    if mask is None:
        loss = per_position.mean()
    else:
        if mask.shape != per_position.shape:
            raise ValueError(f"mask must have shape {tuple(per_position.shape)} (the logits without their last "
                             f"dimension), got {tuple(mask.shape)}.")
        weights = mask.to(per_position.dtype)
        loss = (per_position * weights).sum() / weights.sum().clamp(min=1.0)
    return loss * temperature**2


def masked_mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, H] -> [B, H], the mean over real tokens: a sequence-level feature that two tokenizers can share."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # [B, T, 1]
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def feature_alignment_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    loss_type: str = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between (projected) student features and teacher features of the same shape, [B, H] or [B, T, H].

    "mse": mean squared error per feature; "cosine": 1 - cosine similarity per position. mask ([B, T] for token
    features) keeps real tokens only. Returns a scalar.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"student features {tuple(student_features.shape)} and teacher features "
                         f"{tuple(teacher_features.shape)} differ: project the student first (feature_projection) "
                         "or pool both (feature_pooling='mean') when the tokenizers differ.")
    student_features, teacher_features = student_features.float(), teacher_features.float()
    if loss_type == "mse":
        per_position = (student_features - teacher_features).pow(2).mean(dim=-1)
    elif loss_type == "cosine":
        per_position = 1.0 - F.cosine_similarity(student_features, teacher_features, dim=-1)
    else:
        raise ValueError(f"feature loss_type must be 'mse' or 'cosine', got {loss_type!r}.")
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)
