"""Deployment helpers for lightarch decoders: LoRA targets, bitsandbytes checks, continuous-batching sizing, ONNX.

Everything here is optional at import time: peft, bitsandbytes, onnx and onnxruntime are imported inside the functions
that need them (install them with `pip install "lightarch[deploy]"`).

What gets adapted or quantized, and why:

- **LoRA** (`lora_config`): the attention projections (`q_proj k_proj v_proj o_proj`), the dense MLPs of the first
  `first_k_dense_layers` layers and the shared experts (`gate_proj up_proj down_proj`, all `nn.Linear`), and the routed
  experts through PEFT's `target_parameters` (the experts are 3D `nn.Parameter`s, `(num_experts, out, in)`; PEFT gives
  every expert its own rank-`r` update). **Never the router** (`mlp.gate`): a low-rank change of the routing moves tokens
  between experts the adapter did not see, and merging it would silently change which experts run. Expert LoRA needs
  `lora_dropout=0` (PEFT cannot apply dropout to a parameter).
- **bitsandbytes** (`bnb_quantization_config`, `load_quantized`): transformers replaces every `nn.Linear`
  (attention, dense MLPs, shared experts) with `Linear8bitLt` / `Linear4bit`. The routed experts **stay in full
  precision**: they are 3D tensors consumed by `F.linear` on a slice or by `grouped_mm`, bitsandbytes only quantizes
  `nn.Linear` weights and has no grouped / batched-expert kernel, and storing them as per-expert `Linear4bit` modules would
  change the checkpoint layout that Mixtral / Qwen3-MoE conversion, the tensor- and expert-parallel plans and
  `experts_implementation` rely on. The router is a `Router` module (not `nn.Linear`), so it also stays in float32, as
  does `lm_head` (transformers skips the output layer) and the embeddings. lightarch's `from_pretrained` switches off
  bitsandbytes' packed AVX512-BF16 CPU kernel (`checkpoint_checks.disable_bnb_cpu_packing`).
- **Continuous batching** (`cpu_continuous_batching_config`, `TokenBudgetMiddleware`): a paged cache sized for a few
  requests instead of transformers' RAM-sized default, and a per-request token budget for `transformers serve`.
- **ONNX** (`OnnxDecoderStep`, `export_onnx_decoder`, `quantize_onnx_int8`, `OrtDecoder`): one decoding step with an
  explicit KV cache, exported with torch.onnx; dynamic int8 quantization keeps the routers in float; a greedy
  generation loop in ONNX Runtime.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .checkpoint_checks import disable_bnb_cpu_packing

# ----------------------------------------------------------------------------------------------------------- LoRA

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LORA_TARGET_GROUPS = ("attention", "dense_mlp", "shared_experts", "experts")
ROUTER_MODULE = "mlp.gate"


def lora_target_modules(targets: Sequence[str] = ("attention", "dense_mlp", "shared_experts")) -> str | list:
    """A PEFT `target_modules` regex for the `nn.Linear` groups in `targets` (never the router `mlp.gate`).

    `"experts"` is ignored here (it is a `target_parameters` group); with no linear group the result is `[]`.
    """
    unknown = [t for t in targets if t not in LORA_TARGET_GROUPS]
    if unknown:
        raise ValueError(f"Unknown LoRA target group(s) {unknown}; choose from {LORA_TARGET_GROUPS}.")
    patterns = []
    if "attention" in targets:
        patterns.append(r"self_attn\.(q|k|v|o)_proj")
    if "dense_mlp" in targets:
        patterns.append(r"mlp\.(gate|up|down)_proj")
    if "shared_experts" in targets:
        patterns.append(r"mlp\.shared_experts\.(gate|up|down)_proj")
    if not patterns:
        return []  # PEFT's way of saying "no modules" (experts only, through target_parameters)
    return r".*\.(" + "|".join(patterns) + r")$"


def lora_config(
    targets: Sequence[str] = ("attention", "dense_mlp", "shared_experts", "experts"),
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    **kwargs,
):
    """A `peft.LoraConfig` for a lightarch decoder, adapting the groups in `targets` (see `LORA_TARGET_GROUPS`).

    `"experts"` adds the routed experts' 3D weights through `target_parameters`; PEFT cannot apply dropout to a
    parameter, so it requires `lora_dropout=0`. The router is never targeted.
    """
    from peft import LoraConfig

    targets = tuple(targets)
    if not targets:
        raise ValueError(f"LoRA needs at least one target group from {LORA_TARGET_GROUPS}.")
    if "experts" in targets and lora_dropout:
        raise ValueError(
            f"lora_dropout={lora_dropout} cannot be used with the 'experts' target: PEFT applies expert LoRA to the 3D "
            "weight tensors, where dropout on the input is impossible. Set lora_dropout=0 or drop 'experts'."
        )
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules([t for t in targets if t != "experts"]),
        target_parameters=list(EXPERT_PARAMETERS) if "experts" in targets else None,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def check_lora_targets(model: nn.Module) -> None:
    """Raise if a PEFT-wrapped lightarch model adapts its router (routing must stay the base model's)."""
    for name, module in model.named_modules():
        if name.endswith(ROUTER_MODULE) or f"{ROUTER_MODULE}." in name:
            if any(key in name for key in ("lora_A", "lora_B")) or hasattr(module, "lora_A"):
                raise ValueError(
                    f"LoRA adapts the router {name!r}. lightarch never adapts routers: a low-rank routing change sends "
                    "tokens to experts the adapter was not trained with. Remove 'gate' from target_modules / "
                    "target_parameters (use modeling.deploy.lora_config)."
                )


# ----------------------------------------------------------------------------------------------------------- tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The printable stand-ins of bytes 0..255 used by byte-level BPE (GPT-2's `bytes_to_unicode`), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer(model_max_length: int = 4096):
    """An untrained byte-level tokenizer (256 byte tokens + `<pad>` `<s>` `</s>`, ids 0-2) with a chat template.

    Built offline in milliseconds; any text round-trips. Used by tests and as a fallback by the deploy scripts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for token in _byte_symbols():  # byte b gets id 3 + b
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )


def text_blocks(tokenizer, text: str, block_size: int) -> torch.Tensor:
    """Tokenize `text` (no special tokens) and cut it into `(num_blocks, block_size)` token ids; drops the remainder."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    num_blocks = len(ids) // block_size
    if num_blocks == 0:
        raise ValueError(
            f"The text has {len(ids)} tokens, fewer than one block of {block_size}; give more text or a smaller block."
        )
    return torch.tensor(ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Rows of token ids as causal-LM examples (labels are the inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index].clone()}


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token cross entropy) over `blocks` (no auxiliary router loss)."""
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(input_ids=batch).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / max(count, 1))


# ----------------------------------------------------------------------------------------------------------- bitsandbytes

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


# ----------------------------------------------------------------------------------------------------------- continuous batching

CB_PAGE_SIZE = 32


def cpu_continuous_batching_config(
    model_config,
    max_concurrent_requests: int = 8,
    max_request_tokens: int | None = None,
    max_batch_tokens: int = 512,
    page_size: int = CB_PAGE_SIZE,
    **kwargs,
):
    """A `ContinuousBatchingConfig` sized for a CPU: a KV cache for `max_concurrent_requests` requests of
    `max_request_tokens` tokens (prompt + generated; default `max_position_embeddings`, at most 2048).

    transformers sizes the paged cache from free device memory when `num_blocks` is unset; on a CPU that is the
    machine's RAM, ~10 GB here. `paged_cache_bytes` estimates what this config allocates.
    """
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    if max_request_tokens is None:
        max_request_tokens = min(model_config.max_position_embeddings, 2048)
    for name, value in (("max_concurrent_requests", max_concurrent_requests),
                        ("max_request_tokens", max_request_tokens), ("max_batch_tokens", max_batch_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if page_size < 4:
        raise ValueError(f"page_size must be >= 4 (transformers' paged cache minimum), got {page_size}.")
    if max_request_tokens > model_config.max_position_embeddings:
        raise ValueError(
            f"max_request_tokens={max_request_tokens} exceeds the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}); no request can be that long."
        )
    num_blocks = max_concurrent_requests * math.ceil(max_request_tokens / page_size)
    return ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_concurrent_requests,
        **kwargs,
    )


def paged_cache_bytes(model_config, cb_config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of KV cache the paged cache holds for `cb_config` (keys and values of every layer, `num_blocks` blocks
    of `page_size` tokens). Excludes attention masks and activations, which scale with `max_batch_tokens`."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    per_token = 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * head_dim * dtype.itemsize
    return cb_config.num_blocks * cb_config.page_size * per_token


def request_token_budget(model_config, cb_config=None) -> int:
    """The most tokens (prompt + generated) one request may use: the position limit, and the paged cache's capacity."""
    budget = model_config.max_position_embeddings
    if cb_config is not None and cb_config.num_blocks:
        budget = min(budget, cb_config.num_blocks * cb_config.page_size)
    return budget


class TokenBudgetMiddleware:
    """ASGI middleware for `transformers serve`: refuse, with HTTP 400 naming the numbers, a chat / text completion
    whose prompt plus `max_tokens` exceeds the per-request token budget; fill in `max_tokens` when it is absent.

    Without it, an over-long request reaches the continuous-batching worker thread, where the model's position check
    raises and the worker dies: every later request fails with 503 until the server restarts.
    """

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app, tokenizer, budget: int, default_max_new_tokens: int = 1024) -> None:
        self.app = app
        self.tokenizer = tokenizer
        self.budget = budget
        self.default_max_new_tokens = default_max_new_tokens

    def count_prompt_tokens(self, path: str, body: dict) -> int:
        if path == "/v1/completions":
            prompt = body.get("prompt", "")
            return len(self.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else 0
        messages = []
        for message in body.get("messages") or []:
            content = message.get("content", "")
            if isinstance(content, list):  # OpenAI content parts: keep the text
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            messages.append({"role": message.get("role", "user"), "content": content or ""})
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return len(ids["input_ids"])

    def check(self, path: str, body: dict) -> tuple[str | None, dict]:
        """(error message or None, body with max_tokens filled in)."""
        prompt_tokens = self.count_prompt_tokens(path, body)
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        if prompt_tokens >= self.budget:
            return (
                f"The prompt has {prompt_tokens} tokens but this server's per-request token budget is {self.budget} "
                "(prompt + generated tokens; the model's max_position_embeddings and the paged KV cache size). "
                "Shorten the prompt.",
                body,
            )
        if requested is not None:
            if int(requested) < 1:
                return f"max_tokens must be >= 1, got {requested}.", body
            if prompt_tokens + int(requested) > self.budget:
                return (
                    f"The prompt has {prompt_tokens} tokens and max_tokens is {requested}: {prompt_tokens + int(requested)} "
                    f"tokens exceed this server's per-request token budget of {self.budget} (prompt + generated "
                    f"tokens). Lower max_tokens to at most {self.budget - prompt_tokens} or shorten the prompt.",
                    body,
                )
            return None, body
        body = dict(body)
        body["max_tokens"] = min(self.default_max_new_tokens, self.budget - prompt_tokens)
        return None, body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            await self.app(scope, receive, send)
            return
        import json

        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            try:
                error, body = self.check(scope["path"], body)
            except Exception:  # a malformed request: the server's own validation answers it
                error = None
            if error is not None:
                payload = json.dumps({"error": {"message": error, "type": "invalid_request_error",
                                                "code": "context_length_exceeded"}}).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
                return
            raw = json.dumps(body).encode()
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = dict(scope, headers=headers + [(b"content-length", str(len(raw)).encode())])
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------------------------- ONNX

ONNX_METADATA = "onnx_decoder.json"


ONNX_MODEL_TYPES = ("lightarch_sparse_moe", "lightarch_adaptive")


def check_onnx_exportable(config) -> None:
    """Raise ValueError naming the option when the ONNX decoder step cannot represent this model.

    The adaptive-depth model exports its full-depth path (`exit_policy="full"`): the graph is one fixed-depth step,
    while the estimator and confidence policies choose a depth per input / token at run time.
    """
    if getattr(config, "model_type", None) not in ONNX_MODEL_TYPES:
        raise ValueError(f"ONNX export supports lightarch decoders ({', '.join(ONNX_MODEL_TYPES)}), not model_type "
                         f"{config.model_type!r}.")
    policy = getattr(config, "exit_policy", "full")
    if policy != "full":
        raise ValueError(
            f"exit_policy={policy!r}: the ONNX export is a fixed-depth decoding step and cannot pick a depth at run "
            "time. Export the full-depth model (save it with config.exit_policy = 'full'); exits and the estimator "
            "stay in torch."
        )
    if getattr(config, "num_sink_tokens", 0):
        raise ValueError(
            f"num_sink_tokens={config.num_sink_tokens}: attention sinks (streaming preset) are not supported by the "
            "ONNX export; export a model without sinks."
        )
    implementation = getattr(config, "sliding_window_implementation", "windowed")
    if implementation != "windowed":
        raise ValueError(
            f"sliding_window_implementation={implementation!r} is not supported by the ONNX export (only 'windowed')."
        )
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"rope_type={rope_type!r}: the ONNX export bakes position handling for 'default' and 'linear' rotary "
            "embeddings only (dynamic / yarn / longrope rescale at run time)."
        )
    if config.attention_dropout and config.attention_dropout > 0:
        pass  # inference only: dropout is off


class OnnxDecoderStep(nn.Module):
    """One decoding step of a lightarch SparseMoe (or the full-depth path of an adaptive-depth model), written for
    ONNX export with an explicit KV cache.

    `forward(input_ids (B, T), attention_mask (B, P + T), past_key_0, past_value_0, ...)` returns
    `(logits (B, T, V), present_key_0, present_value_0, ...)` with `past_*` of shape `(B, kv_heads, P, head_dim)` and
    `present_*` of shape `(B, kv_heads, P + T, head_dim)`. Prefill passes `P = 0`. Positions come from the mask's
    cumulative sum, so left padding works as in `generate`. Sliding-window layers keep every key and apply the window
    in the mask (the same attention as the torch model's trimmed cache).

    The routed experts run as a static loop over experts, each gathering the tokens routed to it (a data-dependent
    `NonZero`), with its own 2D weight constants: ONNX Runtime's dynamic quantization then turns every expert matmul
    into an int8 one. The router stays a float matmul.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = model.config
        check_onnx_exportable(config)
        self.model = model
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.expert_weights = nn.ModuleDict()
        for i, layer in enumerate(model.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                self.expert_weights[str(i)] = nn.ParameterList(
                    [nn.Parameter(experts.gate_up_proj[e].detach().clone(), requires_grad=False)
                     for e in range(experts.num_experts)]
                    + [nn.Parameter(experts.down_proj[e].detach().clone(), requires_grad=False)
                       for e in range(experts.num_experts)]
                )

    def _attention(self, layer_idx, attn, hidden, cos, sin, past_key, past_value, mask):
        from .layers import apply_rotary_pos_emb, repeat_kv

        batch, length, _ = hidden.shape
        shape = (batch, length, -1, attn.head_dim)
        query = attn.q_norm(attn.q_proj(hidden).view(shape)).transpose(1, 2)
        key = attn.k_norm(attn.k_proj(hidden).view(shape)).transpose(1, 2)
        value = attn.v_proj(hidden).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key = torch.cat([past_key, key], dim=2)
        value = torch.cat([past_value, value], dim=2)
        scores = torch.matmul(query, repeat_kv(key, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling
        probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(probs, repeat_kv(value, attn.num_key_value_groups)).transpose(1, 2)
        return attn.o_proj(output.reshape(batch, length, -1)), key, value

    def _moe(self, layer_idx, block, hidden):
        import torch.nn.functional as F

        batch, length, dim = hidden.shape
        flat = hidden.reshape(-1, dim)
        _, routing_weights, selected = block.gate(flat)
        weights = self.expert_weights[str(layer_idx)]
        num_experts = block.num_experts
        output = torch.zeros_like(flat)
        for e in range(num_experts):
            hit = selected == e  # (tokens, slots): at most one slot per token picks expert e
            token_weight = (routing_weights * hit.to(routing_weights.dtype)).sum(dim=-1)
            token_idx = torch.nonzero(hit.any(dim=-1)).squeeze(-1)
            gate, up = F.linear(flat[token_idx], weights[e]).chunk(2, dim=-1)
            expert_out = F.linear(block.experts.act_fn(gate) * up, weights[num_experts + e])
            output = output.index_add(0, token_idx, expert_out * token_weight[token_idx].unsqueeze(-1))
        if block.shared_experts is not None:
            output = output + block.shared_experts(flat)
        return output.reshape(batch, length, dim)

    def forward(self, input_ids, attention_mask, *past):
        decoder = self.model.model
        config = self.config
        past_length = past[0].shape[2]
        length = input_ids.shape[1]
        hidden = decoder.embed_tokens(input_ids)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0).narrow(1, past_length, length)
        cos, sin = decoder.rotary_emb(hidden, positions)

        query_index = torch.arange(length, device=input_ids.device) + past_length
        key_index = torch.arange(past_length + length, device=input_ids.device)
        distance = query_index[:, None] - key_index[None, :]  # (T, P + T)
        allowed = (distance >= 0)[None, None] & attention_mask.bool()[:, None, None, :]
        minimum = torch.finfo(hidden.dtype).min
        masks = {"full_attention": torch.where(allowed, 0.0, minimum).to(hidden.dtype)}
        if config.sliding_window is not None:
            windowed = allowed & (distance < config.sliding_window)[None, None]
            masks["sliding_attention"] = torch.where(windowed, 0.0, minimum).to(hidden.dtype)

        presents = []
        for i, layer in enumerate(decoder.layers[: self.num_layers]):
            residual = hidden
            attn_out, key, value = self._attention(
                i, layer.self_attn, layer.input_layernorm(hidden), cos, sin, past[2 * i], past[2 * i + 1],
                masks[config.layer_types[i]],
            )
            presents += [key, value]
            hidden = residual + attn_out
            residual = hidden
            normed = layer.post_attention_layernorm(hidden)
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts"):
                hidden = residual + self._moe(i, layer.mlp, normed)
            else:
                hidden = residual + layer.mlp(normed)
        logits = self.model.lm_head(decoder.norm(hidden))
        return (logits, *presents)


def onnx_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_{i}", f"past_value_{i}"]
        outputs += [f"present_key_{i}", f"present_value_{i}"]
    return inputs, outputs


def export_onnx_decoder(model: nn.Module, path, opset: int = 18) -> dict:
    """Export `OnnxDecoderStep(model)` to `path` (one .onnx file) with dynamic batch, length and cache length.

    Writes `onnx_decoder.json` (I/O names, cache shapes, special tokens) next to it and returns that metadata.
    """
    import json
    import os
    import warnings

    config = model.config
    step = OnnxDecoderStep(model.eval()).eval()
    head_dim = config.head_dim
    kv_heads = config.num_key_value_heads
    batch, length, past_length = 2, 3, 4  # >= 2 so that torch.export keeps every axis symbolic
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, past_length + length, dtype=torch.long)
    past = [torch.zeros(batch, kv_heads, past_length, head_dim) for _ in range(2 * config.num_hidden_layers)]
    input_names, output_names = onnx_io_names(config.num_hidden_layers)
    auto = torch.export.Dim.AUTO  # torch.export infers the relations (mask length = past + new tokens)
    dynamic_shapes = {
        "input_ids": {0: auto, 1: auto},
        "attention_mask": {0: auto, 1: auto},
        "past": tuple({0: auto, 2: auto} for _ in past),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            step,
            (input_ids, attention_mask, *past),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    metadata = {
        "num_layers": config.num_hidden_layers,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "input_names": input_names,
        "output_names": output_names,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), ONNX_METADATA), "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata


def quantize_onnx_int8(fp32_path, int8_path, keep_float: Sequence[str] = ("router",),
                       per_channel: bool = True) -> list[str]:
    """Dynamic int8 quantization (int8 weights, activations quantized at run time) with ONNX Runtime.

    `keep_float` names node groups left in float: `"router"` (the MoE gates: a rounding error there changes which
    experts run) and/or `"lm_head"`. `per_channel` gives every output channel its own weight scale (measured on the
    realtime model: 95.6% greedy agreement with torch fp32 instead of 90.4% per tensor). Returns the names of the
    nodes kept in float.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    unknown = [k for k in keep_float if k not in ("router", "lm_head")]
    if unknown:
        raise ValueError(f"keep_float entries {unknown} are unknown; use 'router' and/or 'lm_head'.")
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    patterns = []
    if "router" in keep_float:
        patterns.append(re.compile(r"layers\.\d+\.mlp\.gate\.weight$"))
    if "lm_head" in keep_float:
        patterns.append(re.compile(r"lm_head\.weight$"))
    initializers = {init.name for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}

    def source_initializer(name: str) -> str | None:
        """The initializer a tensor comes from through Transpose / Identity / Cast nodes, if any."""
        for _ in range(8):
            if name in initializers:
                return name
            node = producers.get(name)
            if node is None or node.op_type not in ("Transpose", "Identity", "Cast") or not node.input:
                return None
            name = node.input[0]
        return None

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    keep = set()
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = source_initializer(node.input[1])
        if weight is None:
            continue  # activations times activations (attention): never quantized
        if any(p.search(weight) for p in patterns):
            keep.add(node.name)
        # Weights renamed by constant folding: a router is the weight matmul feeding a Softmax, lm_head makes logits.
        elif "router" in keep_float and "Softmax" in consumers.get(node.output[0], []):
            keep.add(node.name)
        elif "lm_head" in keep_float and node.output[0] == "logits":
            keep.add(node.name)
    import logging

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(max(level, logging.WARNING))  # the quantizer logs one INFO line per activation tensor
    try:
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=sorted(keep),
            per_channel=per_channel,
        )
    finally:
        root_logger.setLevel(level)
    return sorted(keep)


class OrtDecoder:
    """Runs an ONNX decoder step exported by `export_onnx_decoder` in ONNX Runtime, with a greedy generation loop."""

    def __init__(self, path, num_threads: int = 0) -> None:
        import json
        import os

        import onnxruntime as ort

        metadata_path = os.path.join(os.path.dirname(os.path.abspath(path)), ONNX_METADATA)
        if not os.path.isfile(metadata_path):
            raise FileNotFoundError(f"{metadata_path} is missing; export with modeling.deploy.export_onnx_decoder.")
        with open(metadata_path) as f:
            self.metadata = json.load(f)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.num_layers = self.metadata["num_layers"]

    def empty_cache(self, batch_size: int) -> list:
        import numpy as np

        shape = (batch_size, self.metadata["num_key_value_heads"], 0, self.metadata["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers)]

    def step(self, input_ids, attention_mask, past):
        """One forward: numpy int64 ids (B, T), mask (B, P + T), 2 * layers past arrays -> (logits, presents)."""
        import numpy as np

        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        for i in range(self.num_layers):
            feed[f"past_key_{i}"] = past[2 * i]
            feed[f"past_value_{i}"] = past[2 * i + 1]
        outputs = self.session.run(None, feed)
        return outputs[0], outputs[1:]

    def logits(self, input_ids, attention_mask=None):
        """Full-sequence logits (B, T, V) for numpy or torch inputs, like `model(input_ids).logits`."""
        import numpy as np

        input_ids = np.asarray(input_ids)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        logits, _ = self.step(input_ids, np.asarray(attention_mask), self.empty_cache(input_ids.shape[0]))
        return logits

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 16, eos_token_id=None):
        """Greedy generation with the KV cache; returns (B, T + new) int64, finished rows padded with pad_token_id.

        Stops early when every row has produced `eos_token_id` (default: the model's; pass -1 to never stop).
        """
        import numpy as np

        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, length = input_ids.shape
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if length + max_new_tokens > self.metadata["max_position_embeddings"]:
            raise ValueError(
                f"{length} prompt tokens + {max_new_tokens} new tokens exceed max_position_embeddings "
                f"({self.metadata['max_position_embeddings']})."
            )
        eos = self.metadata["eos_token_id"] if eos_token_id is None else eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None, -1}
        pad = self.metadata["pad_token_id"] if self.metadata["pad_token_id"] is not None else 0
        logits, past = self.step(input_ids, attention_mask, self.empty_cache(batch))
        finished = np.zeros(batch, dtype=bool)
        tokens = []
        for step in range(max_new_tokens):
            next_tokens = logits[:, -1].argmax(-1).astype(np.int64)
            next_tokens = np.where(finished, pad, next_tokens)
            tokens.append(next_tokens)
            finished |= np.isin(next_tokens, list(eos)) if eos else False
            if finished.all() or step == max_new_tokens - 1:
                break
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), np.int64)], axis=1)
            logits, past = self.step(next_tokens[:, None], attention_mask, past)
        return np.concatenate([input_ids, np.stack(tokens, axis=1)], axis=1)


def heldout_texts(model_dir=None, heldout_file=None, max_files: int = 12) -> tuple[list[str], str]:
    """Held-out evaluation text and a description of where it came from.

    `heldout_file` wins; otherwise the held-out files a `scripts/train.py` run recorded in `model_dir/results.json`
    (`data.eval_files`, relative to the standard library); otherwise standard-library files picked by a hash of their
    path (which may overlap the training data of a model trained on the standard library).
    """
    import hashlib
    import json
    import sysconfig
    from pathlib import Path

    if heldout_file is not None:
        return [Path(heldout_file).read_text(encoding="utf-8")], f"the text file {heldout_file}"
    root = Path(sysconfig.get_paths()["stdlib"])
    results_path = Path(model_dir) / "results.json" if model_dir is not None else None
    if results_path is not None and results_path.is_file():
        files = []
        try:
            files = json.loads(results_path.read_text()).get("data", {}).get("eval_files")
        except (ValueError, AttributeError):
            pass
        if isinstance(files, list):  # a run that recorded its held-out file names
            texts = [(root / f).read_text(encoding="utf-8") for f in files[:max_files] if (root / f).is_file()]
            if texts:
                return texts, f"the {len(texts)} held-out standard-library files recorded in {results_path}"
        try:  # scripts/train.py's own deterministic held-out split, with its default data arguments
            import sys

            repo = str(Path(__file__).resolve().parents[1])
            if repo not in sys.path:
                sys.path.insert(0, repo)
            from scripts.train import DataArguments, load_corpus

            corpus = load_corpus(DataArguments())
            if corpus["eval_texts"]:
                return corpus["eval_texts"], (
                    f"scripts/train.py's held-out split with default data arguments ({corpus['heldout']})"
                )
        except Exception:  # train.py absent or changed: fall back to files chosen by hash below
            pass
    paths = sorted(p.relative_to(root).as_posix() for p in root.glob("*.py"))
    paths.sort(key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    texts = []
    for path in paths:
        if len(texts) >= max_files:
            break
        try:
            text = (root / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 2_000 < len(text) < 200_000:
            texts.append(text)
    return texts, f"{len(texts)} standard-library files chosen by path hash (may overlap the training data)"


def heldout_token_stream(tokenizer, texts: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids


def compare_onnx_with_torch(model, decoder: OrtDecoder, vocab_size: int, seed: int = 0) -> float:
    """Max |logits| difference between ONNX Runtime and torch: a left-padded batch, then 3 cached decode steps."""
    import numpy as np

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits.numpy()
    logits, past = decoder.step(input_ids.numpy(), attention_mask.numpy(), decoder.empty_cache(2))
    real = attention_mask.numpy().astype(bool)
    worst = float(np.abs(logits - expected)[real].max())
    ids, mask = input_ids, attention_mask
    for _ in range(3):  # incremental steps through the exported cache against a full torch forward
        next_ids = torch.randint(3, vocab_size, (2, 1), generator=generator)
        ids = torch.cat([ids, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        logits, past = decoder.step(next_ids.numpy(), mask.numpy(), past)
        with torch.no_grad():
            expected = model(ids, attention_mask=mask).logits[:, -1:].numpy()
        worst = max(worst, float(np.abs(logits - expected).max()))
    return worst


def greedy_agreement(model, decoder: OrtDecoder, prompts: torch.Tensor, max_new_tokens: int) -> dict:
    """Fraction of greedy tokens (position by position) where ONNX Runtime agrees with torch, prompt by prompt."""
    import numpy as np

    agree = total = exact = 0
    for prompt in prompts:
        prompt = prompt[None]
        expected = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)[0, prompt.shape[1]:].numpy()  # -1: never stop early
        actual = decoder.generate(prompt.numpy(), max_new_tokens=max_new_tokens, eos_token_id=-1)[0, prompt.shape[1]:]
        agree += int((expected == actual).sum())
        total += len(expected)
        exact += int(np.array_equal(expected, actual))
    return {"token_agreement": agree / total, "identical_continuations": exact, "prompts": len(prompts),
            "tokens": total}


def onnx_perplexity(decoder: OrtDecoder, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Like `perplexity`, with the logits from ONNX Runtime."""
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        logits = torch.from_numpy(decoder.logits(batch.numpy())).float()
        total += nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    return math.exp(total / max(count, 1))
