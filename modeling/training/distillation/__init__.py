"""Multi-task distillation (a teacher into a smaller lightarch student) on Trainer (issue 14).

- `losses`: `distillation_divergence` (forward KL / generalized JSD / reverse KL, T^2, masked) and feature losses;
- `features`: layer maps and the learned width projections;
- `weighting`: fixed, sum and uncertainty task weighting;
- `config`, `trainer`: `DistillationConfig` (TrainingArguments) and `DistillationTrainer` (Trainer);
- `multitask`: the text-classification recipe of scripts/distill.py (teacher, students, collators, scoring);
- `report`: scripts/eval_distill.py's per-task table, plot and the student's model card.
"""

from .config import DistillationConfig
from .features import FeatureProjector, layer_map
from .losses import distillation_divergence, feature_alignment_loss, masked_mean_pool
from .trainer import DistillationTrainer
from .weighting import TaskWeighting

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "FeatureProjector",
    "TaskWeighting",
    "distillation_divergence",
    "feature_alignment_loss",
    "layer_map",
    "masked_mean_pool",
]
