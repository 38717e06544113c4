"""Lets `modeling_sparse_moe.py` import its config relatively, as remote code needs.

Installed, this re-exports `lightarch.configuration.configuration_sparse_moe`; in a saved model folder the real configuration
file takes this name (it is copied there after the modeling files).
"""

from lightarch.configuration.configuration_sparse_moe import (
    SparseMoeConfig,
    check_config_location,
    check_model_location,
)

__all__ = ["SparseMoeConfig", "check_config_location", "check_model_location"]
