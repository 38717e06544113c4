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
