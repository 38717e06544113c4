"""lightarch models. Importing this package registers every config and model with transformers' Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoProcessor,
)

from .configuration import AdaptiveDepthConfig, MultiModalConfig, SparseMoeConfig

from .interop import from_transformers, to_transformers
from .modeling_adaptive_depth import (
    AdaptiveDepthCausalLMOutputWithPast,
    AdaptiveDepthForCausalLM,
    AdaptiveDepthForSequenceClassification,
    AdaptiveDepthGenerateOutput,
    AdaptiveDepthModel,
    AdaptiveDepthPreTrainedModel,
)
from .modeling_multimodal import (
    MultiModalCausalLMOutputWithPast,
    MultiModalForConditionalGeneration,
    MultiModalModel,
    MultiModalOutput,
    MultiModalPreTrainedModel,
    loss_parts,
)
from .modeling_sparse_moe import (
    SparseMoeCausalLMOutputWithPast,
    SparseMoeForCausalLM,
    SparseMoeForSequenceClassification,
    SparseMoeModel,
    SparseMoeModelOutputWithPast,
    SparseMoePreTrainedModel,
    router_statistics,
)
from .processing_multimodal import MultiModalProcessor


def _register(config_class, model_class, causal_lm_class, classifier_class) -> None:
    """Register one architecture with the Auto classes, and for remote code: saved folders then carry their code,
    so they load with trust_remote_code=True where lightarch is not installed."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_class, model in (
        (AutoModel, model_class),
        (AutoModelForCausalLM, causal_lm_class),
        (AutoModelForSequenceClassification, classifier_class),
    ):
        auto_class.register(config_class, model, exist_ok=True)
        model.register_for_auto_class(auto_class.__name__)


_register(SparseMoeConfig, SparseMoeModel, SparseMoeForCausalLM, SparseMoeForSequenceClassification)
_register(AdaptiveDepthConfig, AdaptiveDepthModel, AdaptiveDepthForCausalLM, AdaptiveDepthForSequenceClassification)


def _register_multimodal() -> None:
    """The multimodal model: AutoModel (aligned embeddings), AutoModelForImageTextToText (answers), AutoProcessor;
    and for remote code, so a saved folder carries its modeling, configuration and processing files."""
    AutoConfig.register(MultiModalConfig.model_type, MultiModalConfig, exist_ok=True)
    MultiModalConfig.register_for_auto_class()
    for auto_class, model in (
        (AutoModel, MultiModalModel),
        (AutoModelForImageTextToText, MultiModalForConditionalGeneration),
    ):
        auto_class.register(MultiModalConfig, model, exist_ok=True)
        model.register_for_auto_class(auto_class.__name__)
    AutoProcessor.register(MultiModalConfig, MultiModalProcessor, exist_ok=True)
    MultiModalProcessor.register_for_auto_class("AutoProcessor")


_register_multimodal()

__all__ = [
    "AdaptiveDepthCausalLMOutputWithPast",
    "AdaptiveDepthConfig",
    "AdaptiveDepthForCausalLM",
    "AdaptiveDepthForSequenceClassification",
    "AdaptiveDepthGenerateOutput",
    "AdaptiveDepthModel",
    "AdaptiveDepthPreTrainedModel",
    "DistillationConfig",
    "DistillationTrainer",
    "MultiModalCausalLMOutputWithPast",
    "MultiModalConfig",
    "MultiModalForConditionalGeneration",
    "MultiModalModel",
    "MultiModalOutput",
    "MultiModalPreTrainedModel",
    "MultiModalProcessor",
    "PrivacyArguments",
    "PrivateTrainer",
    "SparseMoeCausalLMOutputWithPast",
    "SparseMoeConfig",
    "SparseMoeForCausalLM",
    "SparseMoeForSequenceClassification",
    "SparseMoeModel",
    "SparseMoeModelOutputWithPast",
    "SparseMoePreTrainedModel",
    "TeacherTopK",
    "compute_teacher_topk",
    "distillation_divergence",
    "from_transformers",
    "loss_parts",
    "router_statistics",
    "to_transformers",
    "topk_distillation_divergence",
]

# Training recipes that pull in Trainer (and Opacus) load on first use, so that `import lightarch` stays light.
_LAZY_EXPORTS = {
    "DistillationConfig": "lightarch.training.distillation",
    "DistillationTrainer": "lightarch.training.distillation",
    "distillation_divergence": "lightarch.training.distillation",
    "TeacherTopK": "lightarch.training.distillation",
    "compute_teacher_topk": "lightarch.training.distillation",
    "topk_distillation_divergence": "lightarch.training.distillation",
    "PrivacyArguments": "lightarch.training.privacy",
    "PrivateTrainer": "lightarch.training.privacy",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightarch' has no attribute {name!r}")
