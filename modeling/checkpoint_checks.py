"""Loading guards: a corrupt or incomplete checkpoint folder fails with an error naming the file or weights.

transformers alone reports a truncated safetensors file as a bare `SafetensorError` without the file name, and loads
a checkpoint with missing tensors after only a log message, leaving those weights random. lightarch models refuse.

This file imports only transformers, safetensors and its sibling configuration file: it is copied into saved model
folders for `trust_remote_code`.
"""

import json
import os

from safetensors import safe_open
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .configuration_sparse_moe import check_model_location  # one rule for configs and models


def check_checkpoint_folder(folder: str) -> None:
    """Raise OSError naming the missing or unreadable file of a local checkpoint folder."""
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise OSError(f"Checkpoint folder {folder} has no {CONFIG_NAME}; it is incomplete or not a model folder.")
    try:
        with open(config_path, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as error:
        raise OSError(f"{config_path} is not valid JSON ({error}); the checkpoint is corrupt.") from error

    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            raise OSError(f"{index_path} is corrupt ({error}).") from error
    elif os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_NAME)):
        weight_files = [SAFE_WEIGHTS_NAME]
    else:
        return  # other formats (.bin, sharded without index, gguf): transformers reports those itself

    for name in weight_files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise OSError(f"Checkpoint folder {folder} is missing the weight file {name}.")
        try:
            with safe_open(path, framework="pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors raises its own error type for truncated or garbled files
            raise OSError(f"Weight file {path} is corrupt or truncated ({error}); re-save or re-download it.") from error


def disable_bnb_cpu_packing(model) -> int:
    """Make every bitsandbytes `Linear4bit` use the generic CPU path; returns how many layers were switched.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 `Linear4bit.forward` repacks its weight in place at the first inference
    forward (`support_avx512bf16_for_cpu`, set in `Linear4bit.__init__` from `has_avx512bf16()`), for a bf16 kernel.
    That kernel fails inside bitsandbytes ("shape '[32, 0]' is invalid") unless in_features is a multiple of 64 and
    out_features of 32; a model saved after the repacking reloads with different weights (measured on a 4-layer model
    with width 128: logits off by 0.31 for a range of 0.76); and it was not faster here than the generic path, which
    dequantizes exactly what is saved.
    The switch must happen before the first forward; afterwards the weights are already repacked.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            quant_state = getattr(module.weight, "quant_state", None)
            if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
                raise RuntimeError(
                    "This 4-bit model already ran inference with bitsandbytes' packed CPU kernel, which changed its "
                    "weights in place; reload it and call disable_bnb_cpu_packing before the first forward."
                )
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


class CheckedLoadingMixin:
    """`from_pretrained` that validates a local folder first and refuses missing backbone weights.

    A 4-bit bitsandbytes model is switched to bitsandbytes' generic CPU kernel (`disable_bnb_cpu_packing`), so plain
    `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` runs on every CPU.

    Pass `allow_missing_weights=True` when missing weights are intended (for example a new head, or experts added
    on top of a converted checkpoint): they are then initialised by `_init_weights` as transformers does.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_missing_weights: bool = False, **kwargs):
        check_model_location(pretrained_model_name_or_path)
        if os.path.isdir(str(pretrained_model_name_or_path)):
            check_checkpoint_folder(str(pretrained_model_name_or_path))
        user_wants_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        # A new task head (e.g. `score` when a classifier starts from a language model) may be missing; the backbone
        # may not.
        backbone = f"{cls.base_model_prefix}."
        missing = sorted(key for key in loading_info.get("missing_keys", []) if key.startswith(backbone))
        if missing and not allow_missing_weights:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise OSError(
                f"The checkpoint {pretrained_model_name_or_path} lacks {len(missing)} weight(s) the model needs: "
                f"{shown}. The checkpoint is incomplete or was saved by another architecture; pass "
                "allow_missing_weights=True to initialise them randomly instead."
            )
        disable_bnb_cpu_packing(model)
        return (model, loading_info) if user_wants_info else model
