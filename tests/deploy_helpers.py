"""Shared by the tests/test_deploy_*.py files: a tiny saved lightarch model with an offline byte-level tokenizer."""

from pathlib import Path

import torch
from conftest import tiny_sparse_moe_config

from lightarch import SparseMoeForCausalLM
from lightarch.data.tokenizers import byte_level_tokenizer

BYTE_VOCAB = 259  # 256 bytes + <pad> <s> </s> (ids 0, 1, 2 like tiny_sparse_moe_config's special ids)


def tiny_byte_config(**overrides):
    """tiny_sparse_moe_config with the byte-level tokenizer's vocabulary."""
    return tiny_sparse_moe_config(vocab_size=BYTE_VOCAB, **overrides)



def save_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny SparseMoe (eval mode) and the byte-level tokenizer into `folder`."""
    torch.manual_seed(seed)
    model = SparseMoeForCausalLM(tiny_byte_config(**overrides)).eval()
    model.save_pretrained(folder)
    byte_level_tokenizer(model_max_length=model.config.max_position_embeddings).save_pretrained(folder)
    return Path(folder)


def tiny_adaptive_config(**overrides):
    """The tiny byte-vocabulary decoder as an adaptive-depth model: 4 layers (MoE from layer 1), exits after 1, 2, 4."""
    from lightarch import AdaptiveDepthConfig, SparseMoeConfig

    values = tiny_byte_config().to_dict()
    # (not model_type: an explicit value would override AdaptiveDepthConfig's "lightarch_adaptive")
    values = {k: values[k] for k in SparseMoeConfig.__dataclass_fields__ if k in values and k != "model_type"}
    values.update(num_hidden_layers=4, first_k_dense_layers=1, num_shared_experts=1, router_mode="top_p",
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  exit_layers=[1, 2, 4], estimator_input_layer=1)
    values.update(overrides)
    return AdaptiveDepthConfig(**values)


def save_tiny_adaptive_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny AdaptiveDepthForCausalLM and the byte-level tokenizer into `folder`."""
    from lightarch import AdaptiveDepthForCausalLM

    torch.manual_seed(seed)
    model = AdaptiveDepthForCausalLM(tiny_adaptive_config(**overrides)).eval()
    model.save_pretrained(folder)
    byte_level_tokenizer(model_max_length=model.config.max_position_embeddings).save_pretrained(folder)
    return Path(folder)
