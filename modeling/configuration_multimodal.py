"""Lets `modeling_multimodal.py` import its config relatively, as remote code needs.

Installed, this re-exports `lightarch.configuration.configuration_multimodal`; in a saved model folder the real configuration
file takes this name (it is copied there after the modeling files, together with `configuration_sparse_moe.py`, which
it imports relatively).
"""

from lightarch.configuration.configuration_multimodal import MultiModalConfig

__all__ = ["MultiModalConfig"]
