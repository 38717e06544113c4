"""Shared by the tests/test_deploy_*.py files: a tiny saved lightarch model with an offline byte-level tokenizer."""

from pathlib import Path

import torch
from conftest import tiny_sparse_moe_config

from modeling import SparseMoeForCausalLM
from modeling.deploy import byte_level_tokenizer

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
