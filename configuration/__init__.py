"""One `PretrainedConfig` per lightarch architecture."""

from .configuration_sparse_moe import SparseMoeConfig

__all__ = ["SparseMoeConfig"]

from .configuration_adaptive_depth import AdaptiveDepthConfig  # noqa: E402

__all__ += ["AdaptiveDepthConfig"]

from .configuration_multimodal import MultiModalConfig  # noqa: E402

__all__ += ["MultiModalConfig"]
