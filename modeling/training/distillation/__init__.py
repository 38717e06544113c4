"""Multi-task distillation (a teacher into a smaller lightarch student) on Trainer (issue 14).

- `losses`: `distillation_divergence` (forward KL / generalized JSD / reverse KL, T^2, masked) and feature losses;
- `features`: layer maps and the learned width projections;
- `weighting`: fixed, sum, uncertainty and GradNorm task weighting;
- `config`, `trainer`: `DistillationConfig` (TrainingArguments) and `DistillationTrainer` (Trainer);
- `topk`: offline mode, a teacher's top-k logits stored once as safetensors (`TeacherTopK`, `compute_teacher_topk`)
  and the loss against them with the tail as one bucket (`topk_distillation_divergence`);
- `multitask`: the text-classification recipe of scripts/distill.py (teacher, students, collators, scoring);
- `language_model`: the LM recipe of scripts/distill.py --task lm (a scripts/train.py teacher, perplexity);
- `report`: scripts/eval_distill.py's per-task table, plot and the student's model card.
"""

from .config import DistillationConfig
from .features import FeatureProjector, layer_map
from .losses import distillation_divergence, feature_alignment_loss, masked_mean_pool
from .topk import TeacherTopK, compute_teacher_topk, topk_distillation_divergence
from .trainer import DistillationTrainer
from .weighting import TaskWeighting

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "FeatureProjector",
    "TaskWeighting",
    "TeacherTopK",
    "compute_teacher_topk",
    "distillation_divergence",
    "feature_alignment_loss",
    "layer_map",
    "masked_mean_pool",
    "topk_distillation_divergence",
]
