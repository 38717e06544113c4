"""Deployment of lightarch models, one engine per module: PEFT LoRA / QLoRA (`peft`), bitsandbytes 8 / 4-bit
(`bitsandbytes`), ONNX export + ONNX Runtime int8 (`onnx`), continuous batching and `transformers serve` (`serving`).

Optional dependencies (peft, bitsandbytes, onnx, onnxruntime) are imported inside the functions that need them:
`pip install "lightarch[deploy]"`.
"""

from .bitsandbytes import (
    bnb_quantization_config,
    check_quantization_config,
    full_precision_modules,
    load_quantized,
    memory_report,
    quantizable_linears,
)
from .onnx import (
    OnnxDecoderStep,
    OrtDecoder,
    check_onnx_exportable,
    compare_onnx_with_torch,
    export_onnx_decoder,
    greedy_agreement,
    onnx_perplexity,
    quantize_onnx_int8,
)
from .peft import check_lora_targets, lora_config, lora_target_modules
from .serving import TokenBudgetMiddleware, cpu_continuous_batching_config, paged_cache_bytes, request_token_budget

__all__ = [
    "OnnxDecoderStep",
    "OrtDecoder",
    "TokenBudgetMiddleware",
    "bnb_quantization_config",
    "check_lora_targets",
    "check_onnx_exportable",
    "check_quantization_config",
    "compare_onnx_with_torch",
    "cpu_continuous_batching_config",
    "export_onnx_decoder",
    "full_precision_modules",
    "greedy_agreement",
    "load_quantized",
    "lora_config",
    "lora_target_modules",
    "memory_report",
    "onnx_perplexity",
    "paged_cache_bytes",
    "quantizable_linears",
    "quantize_onnx_int8",
    "request_token_budget",
]
