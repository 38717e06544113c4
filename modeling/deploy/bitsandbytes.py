"""bitsandbytes 8-bit / 4-bit loading of lightarch models: which modules quantize, config checks, memory report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..checkpoint_checks import disable_bnb_cpu_packing


BNB_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
ALWAYS_SKIPPED = ("lm_head",)  # transformers keeps the output layer in full precision; so do we
# The adaptive-depth model's complexity estimator picks the depth of a whole input, like a router picks experts: a
# rounding error there changes which layers run, so it stays in full precision too.
ADAPTIVE_SKIPPED = ("model.estimator",)


def full_precision_modules(model_config) -> tuple[str, ...]:
    """Modules `bnb_quantization_config` keeps in full precision (besides what bitsandbytes cannot quantize)."""
    adaptive = getattr(model_config, "model_type", None) == "lightarch_adaptive"
    return ALWAYS_SKIPPED + (ADAPTIVE_SKIPPED if adaptive else ())


def _meta_model(model_config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def quantizable_linears(model_or_config) -> dict[str, tuple[int, int]]:
    """`{module name: (in_features, out_features)}` of the `nn.Linear` layers bitsandbytes would quantize.

    Takes a model or a config (then a weightless meta-device model is built). The routed experts (3D tensors), the
    router (`Router`, not `nn.Linear`), the embeddings, `lm_head` and the adaptive model's estimator are not listed:
    they stay in full precision.
    """
    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    kept = full_precision_modules(model.config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _skipped(name, kept)
    }


def _skipped(name: str, skip_modules: Iterable[str] | None) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return not should_convert_module(name, list(skip_modules) if skip_modules is not None else None)


def check_quantization_config(model_config, quantization_config) -> None:
    """Raise ValueError naming the problem when a `BitsAndBytesConfig` cannot apply to this lightarch model.

    Checked: 8-bit or 4-bit requested; the 4-bit quant type and compute dtype (bitsandbytes silently computes garbage
    with e.g. an int8 compute dtype and ignores float64); skip entries that match no module (a typo would quantize
    what the user meant to keep); a skip list that leaves only what bitsandbytes cannot quantize (the routed experts,
    the router). Configs of other quantizers pass through unchecked.
    """
    from transformers import BitsAndBytesConfig

    if isinstance(quantization_config, dict):
        if quantization_config.get("quant_method", "bitsandbytes") != "bitsandbytes":
            return
        quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
    if not isinstance(quantization_config, BitsAndBytesConfig):
        return
    load_in_4bit = quantization_config.load_in_4bit
    if not (load_in_4bit or quantization_config.load_in_8bit):
        raise ValueError("The BitsAndBytesConfig quantizes nothing: set load_in_8bit=True or load_in_4bit=True.")
    if load_in_4bit:
        if quantization_config.bnb_4bit_quant_type not in BNB_4BIT_QUANT_TYPES:
            raise ValueError(
                f"bnb_4bit_quant_type={quantization_config.bnb_4bit_quant_type!r} is not supported; use one of "
                f"{BNB_4BIT_QUANT_TYPES}."
            )
        compute_dtype = quantization_config.bnb_4bit_compute_dtype or torch.float32
        if compute_dtype not in BNB_COMPUTE_DTYPES:
            raise ValueError(
                f"bnb_4bit_compute_dtype={compute_dtype} is not supported: 4-bit matmuls run in a floating dtype, one "
                f"of {[str(d) for d in BNB_COMPUTE_DTYPES]} (float32 is the fast one on CPU)."
            )
    skip = quantization_config.llm_int8_skip_modules
    model = _meta_model(model_config)
    names = [name for name, _ in model.named_modules() if name]
    for entry in skip or []:
        if not any(_skipped(name, [entry]) for name in names):
            raise ValueError(
                f"llm_int8_skip_modules entry {entry!r} matches no module of this model; module names look like "
                "'model.layers.0.self_attn.q_proj' (a suffix such as 'o_proj' or a regex such as 'layers.0' works)."
            )
    if not any(not _skipped(n, skip) for n in quantizable_linears(model)):
        raise ValueError(
            f"llm_int8_skip_modules={skip} leaves no nn.Linear layer to quantize. bitsandbytes quantizes only "
            "nn.Linear layers: the routed experts (3D weight tensors) and the router always stay in full precision. "
            "Remove entries from the skip list, or load in full precision."
        )


def bnb_quantization_config(
    model_config,
    bits: int = 8,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    skip_modules: Sequence[str] = (),
):
    """A checked `BitsAndBytesConfig` for a lightarch model: 8-bit (LLM.int8) or 4-bit (`quant_type` nf4 / fp4).

    `lm_head` (and the adaptive model's `estimator`) are always kept in full precision (with an explicit skip list
    transformers no longer adds `lm_head` itself). Raises ValueError when the request cannot apply.
    """
    from transformers import BitsAndBytesConfig

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 for bitsandbytes, got {bits}.")
    kept = full_precision_modules(model_config)
    skip = list(kept) + [m for m in skip_modules if m not in kept]
    if bits == 4:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant,
            llm_int8_skip_modules=skip,
        )
    else:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    check_quantization_config(model_config, quantization_config)
    return quantization_config


def load_quantized(path, quantization_config, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, quantization_config=...)`, checked, for CPU inference and saving.

    Runs `check_quantization_config` first and `disable_bnb_cpu_packing` after loading (lightarch's `from_pretrained`
    already does; this covers models loaded through another class).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    check_quantization_config(config, quantization_config)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config, **kwargs)
    disable_bnb_cpu_packing(model)
    return model


def _tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def memory_report(model: nn.Module) -> dict:
    """Bytes held by the model by kind, with the float32 size of the same model for comparison.

    Kinds: `quantized_linear` (bitsandbytes weights with their scales), `linear` (full-precision `nn.Linear`
    except `lm_head`), `experts`, `router`, `embeddings_and_lm_head`, `other` (norms, biases, buffers).
    `fp32_bytes` counts every parameter and buffer as 4 bytes per element (quantized weights at their logical shape).
    """
    kinds = dict.fromkeys(("quantized_linear", "linear", "experts", "router", "embeddings_and_lm_head", "other"), 0)
    fp32 = 0
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own:
            continue
        cls = type(module).__name__
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if cls in ("Linear8bitLt", "Linear4bit"):
            kind = "quantized_linear"
            fp32 += 4 * module.in_features * module.out_features + sum(
                4 * t.numel() for n, t in own if n != "weight"
            )
            extra = 0
            if quant_state is not None:  # 4-bit: absmax (+ nested statistics) and the code table
                for value in quant_state.as_dict(packed=False).values():
                    extra += _tensor_bytes(value)
            scb = getattr(module.weight, "SCB", None)  # 8-bit: one scale per output row
            extra += _tensor_bytes(scb) if not any(t is scb for _, t in own) else 0
            kinds[kind] += sum(_tensor_bytes(t) for _, t in own) + extra
            continue
        if cls == "Experts":
            kind = "experts"
        elif cls == "Router":
            kind = "router"
        elif isinstance(module, nn.Embedding) or name.split(".")[-1] == "lm_head":
            kind = "embeddings_and_lm_head"
        elif type(module) is nn.Linear:
            kind = "linear"
        else:
            kind = "other"
        kinds[kind] += sum(_tensor_bytes(t) for _, t in own)
        fp32 += sum(4 * t.numel() for _, t in own)
    total = sum(kinds.values())
    return {"total_bytes": total, "fp32_bytes": fp32, "ratio_to_fp32": total / fp32 if fp32 else float("nan"), **kinds}
