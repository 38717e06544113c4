"""`DistillationConfig`: TrainingArguments plus what a teacher -> student run needs (as TRL's GKDConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .weighting import TASK_WEIGHTINGS

FEATURE_LOSSES = ("mse", "cosine")
FEATURE_POOLINGS = ("auto", "tokens", "mean")


@dataclass
class DistillationConfig(TrainingArguments):
    """TrainingArguments for `DistillationTrainer`.

    Per task, loss = (1 - alpha) * cross-entropy on the labels + alpha * distillation_divergence(beta, temperature);
    the task losses are combined by `task_weighting`; then `feature_weight` * the feature-alignment loss and the MoE
    student's router auxiliary loss are added.
    """

    beta: float = field(default=0.0, metadata={"help": "0 forward KL(teacher||student), 1 reverse KL, in between "
                                                        "the generalized JSD (TRL's GKD)."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the divergence (loss x T^2)."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the distillation divergence; the hard-label "
                                                         "cross-entropy gets 1 - alpha. 0 trains without the teacher's "
                                                         "logits."})
    feature_weight: float = field(default=0.0, metadata={"help": "Weight of intermediate-feature alignment (0: off)."})
    feature_layer_map: str = field(default="uniform", metadata={"help": "'uniform', 'last-K' or pairs 's:t,s:t' "
                                                                         "(1-based layers, 0 = embeddings)."})
    feature_loss: str = field(default="mse", metadata={"help": f"One of {FEATURE_LOSSES}."})
    feature_pooling: str = field(default="auto", metadata={"help": "'tokens' (same tokenizer), 'mean' (pooled "
                                                                    "sequence features, any tokenizers), 'auto' "
                                                                    "(tokens when the teacher gets the student's "
                                                                    "inputs, else mean)."})
    feature_projection: bool = field(default=True, metadata={"help": "Learned linear maps student width -> teacher "
                                                                      "width (needed when the widths differ)."})
    save_distillation_modules: bool = field(default=False, metadata={
        "help": "Also write the projections and task weights (distillation_modules.safetensors) beside the final "
                "student; checkpoints always hold them (resume)."})
    task_weighting: str = field(default="sum", metadata={"help": f"One of {TASK_WEIGHTINGS}: 'fixed' uses "
                                                                  "--task_weights, 'uncertainty' learns them "
                                                                  "(Kendall et al. 2018), 'gradnorm' balances "
                                                                  "their gradients (Chen et al. 2018)."})
    gradnorm_alpha: float = field(default=1.5, metadata={"help": "GradNorm's asymmetry alpha (task_weighting="
                                                                  "'gradnorm'): larger pulls slow tasks harder."})
    task_weights: list[float] | None = field(default=None, metadata={"help": "One weight per task, for "
                                                                              "task_weighting='fixed'."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the teacher's inputs and "
                                                                          "task ids are not student arguments."})

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (0.0 <= self.beta <= 1.0, f"beta must be in [0, 1], got {self.beta}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.feature_weight >= 0, f"feature_weight must be >= 0, got {self.feature_weight}"),
            (self.feature_loss in FEATURE_LOSSES,
             f"feature_loss must be one of {FEATURE_LOSSES}, got {self.feature_loss!r}"),
            (self.feature_pooling in FEATURE_POOLINGS,
             f"feature_pooling must be one of {FEATURE_POOLINGS}, got {self.feature_pooling!r}"),
            (self.task_weighting in TASK_WEIGHTINGS,
             f"task_weighting must be one of {TASK_WEIGHTINGS}, got {self.task_weighting!r}"),
            (self.task_weighting != "fixed" or self.task_weights, "task_weighting='fixed' needs task_weights"),
            (self.gradnorm_alpha >= 0, f"gradnorm_alpha must be >= 0, got {self.gradnorm_alpha}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DistillationConfig: {message}.")
