"""Shared fixtures: tiny configs so every test runs in seconds on 2 CPU cores, with no hub access."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on a shared CPU

import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # tests also run from a plain checkout, before `pip install -e .`
    sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import modeling  # noqa: E402,F401  (registers the Auto classes)
from configuration import SparseMoeConfig  # noqa: E402


def tiny_sparse_moe_config(**overrides) -> SparseMoeConfig:
    """A 3-layer hybrid (sliding, full, sliding) SparseMoe with 4 experts; override any field."""
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_experts_per_token=3,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return SparseMoeConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
