"""lightarch models. Importing this package registers every config and model with transformers' Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from configuration import SparseMoeConfig

from .conversion import from_transformers, to_transformers
from .modeling_sparse_moe import (
    SparseMoeCausalLMOutputWithPast,
    SparseMoeForCausalLM,
    SparseMoeForSequenceClassification,
    SparseMoeModel,
    SparseMoeModelOutputWithPast,
    SparseMoePreTrainedModel,
    router_statistics,
)

AutoConfig.register(SparseMoeConfig.model_type, SparseMoeConfig, exist_ok=True)
AutoModel.register(SparseMoeConfig, SparseMoeModel, exist_ok=True)
AutoModelForCausalLM.register(SparseMoeConfig, SparseMoeForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(SparseMoeConfig, SparseMoeForSequenceClassification, exist_ok=True)

# Saved folders carry the code, so they load with trust_remote_code=True where lightarch is not installed.
SparseMoeConfig.register_for_auto_class()
SparseMoeModel.register_for_auto_class("AutoModel")
SparseMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SparseMoeForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "SparseMoeCausalLMOutputWithPast",
    "SparseMoeConfig",
    "SparseMoeForCausalLM",
    "SparseMoeForSequenceClassification",
    "SparseMoeModel",
    "SparseMoeModelOutputWithPast",
    "SparseMoePreTrainedModel",
    "from_transformers",
    "router_statistics",
    "to_transformers",
]

# ---- Adaptive depth (early exits, complexity estimator, per-token early exit, self-speculative decoding) ----
from configuration import AdaptiveDepthConfig  # noqa: E402

from .modeling_adaptive_depth import (  # noqa: E402
    AdaptiveDepthCausalLMOutputWithPast,
    AdaptiveDepthForCausalLM,
    AdaptiveDepthForSequenceClassification,
    AdaptiveDepthGenerateOutput,
    AdaptiveDepthModel,
    AdaptiveDepthPreTrainedModel,
)

AutoConfig.register(AdaptiveDepthConfig.model_type, AdaptiveDepthConfig, exist_ok=True)
AutoModel.register(AdaptiveDepthConfig, AdaptiveDepthModel, exist_ok=True)
AutoModelForCausalLM.register(AdaptiveDepthConfig, AdaptiveDepthForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(AdaptiveDepthConfig, AdaptiveDepthForSequenceClassification, exist_ok=True)
AdaptiveDepthConfig.register_for_auto_class()
AdaptiveDepthModel.register_for_auto_class("AutoModel")
AdaptiveDepthForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AdaptiveDepthForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ += [
    "AdaptiveDepthCausalLMOutputWithPast",
    "AdaptiveDepthConfig",
    "AdaptiveDepthForCausalLM",
    "AdaptiveDepthForSequenceClassification",
    "AdaptiveDepthGenerateOutput",
    "AdaptiveDepthModel",
    "AdaptiveDepthPreTrainedModel",
]
