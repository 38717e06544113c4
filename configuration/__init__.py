"""One `PretrainedConfig` per lightarch architecture."""

from .configuration_sparse_moe import SparseMoeConfig

__all__ = ["SparseMoeConfig"]
