"""Loading guards: a corrupt or incomplete checkpoint folder fails with an error naming the file or weights.

transformers alone reports a truncated safetensors file as a bare `SafetensorError` without the file name, and loads
a checkpoint with missing tensors after only a log message, leaving those weights random. lightarch models refuse
(`CheckedLoadingMixin`, one rule for every class: `missing_weights_to_refuse`).

This file imports only transformers, safetensors and its sibling configuration file: it is copied into saved model
folders for `trust_remote_code`.
"""

import json
import logging
import os

from safetensors import safe_open
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .configuration_sparse_moe import check_config_location, check_model_location  # the configs' rule

logger = logging.getLogger(__name__)


def check_checkpoint_folder(folder: str) -> None:
    """Raise OSError naming the missing or unreadable file of a local checkpoint folder."""
    check_config_location(folder)  # the configs' message for a missing folder or config.json
    config_path = os.path.join(folder, CONFIG_NAME)
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


def missing_weights_to_refuse(model, missing_keys) -> list[str]:
    """The missing weights (of `missing_keys`, after transformers' tying) that the checkpoint should have held.

    One rule for every lightarch class: every missing weight counts (task heads included: an untied `lm_head.weight`
    the checkpoint lacks would be a random head), except a *new head*: the weights outside the base model
    (`base_model_prefix`) of a class with a head, when the checkpoint was saved by another class (its config's
    `architectures`), e.g. `score` when a causal-LM checkpoint is loaded into `...ForSequenceClassification`, or
    `lm_head` when a bare `...Model` checkpoint is loaded into `...ForCausalLM`. Tied weights are never missing
    (transformers drops them from `missing_keys` when their source loaded). A class that is its own base model
    (`...Model`, `MultiModalModel`) has no head that may be new.
    """
    missing = sorted(missing_keys)
    saved_by = set(getattr(model.config, "architectures", None) or ())
    if model.base_model is model or type(model).__name__ in saved_by or not saved_by:
        return missing
    backbone = f"{model.base_model_prefix}."
    return [key for key in missing if key.startswith(backbone)]


def missing_weights_message(pretrained_model_name_or_path, keys: list[str]) -> str:
    """The one-line message naming the weights a checkpoint lacks and `allow_missing_weights=True`."""
    shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return (f"The checkpoint {pretrained_model_name_or_path} lacks {len(keys)} weight(s) the model needs: {shown}. "
            "The checkpoint is incomplete or was saved by another architecture; pass allow_missing_weights=True to "
            "initialise them randomly instead.")


class CheckedLoadingMixin:
    """`from_pretrained` that validates a local folder first and refuses missing weights (`missing_weights_to_refuse`).

    A 4-bit bitsandbytes model is switched to bitsandbytes' generic CPU kernel (`disable_bnb_cpu_packing`), so plain
    `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` runs on every CPU.

    - A checkpoint that lacks weights it should hold raises OSError naming them, unless `allow_missing_weights=True`
      (then they are initialised by `_init_weights`, as transformers does, and listed in its load report).
    - A new head (see `missing_weights_to_refuse`) is initialised and reported as transformers does: its load report
      (a logged warning) and `loading_info["missing_keys"]`; it is never refused.
    - `output_loading_info=True` means the caller inspects the loading: nothing is refused, the missing weights are
      returned in `loading_info["missing_keys"]` (as transformers does) and the weights that would have been refused
      are named in a logged warning.
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
        refused = missing_weights_to_refuse(model, loading_info.get("missing_keys", ()))
        if refused and not allow_missing_weights:
            message = missing_weights_message(pretrained_model_name_or_path, refused)
            if not user_wants_info:
                raise OSError(message)
            logger.warning("%s (Not raised: output_loading_info=True returns them in loading_info['missing_keys'].)",
                           message)
        disable_bnb_cpu_packing(model)
        return (model, loading_info) if user_wants_info else model
