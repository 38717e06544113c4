"""Continuous batching and `transformers serve` on CPU: a paged cache sized for a few requests, a per-request token
budget enforced before a request reaches the batching worker, and `serve_folder` (`scripts/serve.py`), which serves a
saved lightarch folder with transformers' own server."""

from __future__ import annotations

import math

import torch


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


def check_servable_folder(model_dir, attn_implementation: str = "sdpa"):
    """(config, tokenizer) of the saved folder `serve_folder` would serve; ValueError naming the option and the fix
    when it cannot: no model, not a lightarch SparseMoe, a tokenizer without a chat template (which
    /v1/chat/completions needs), or an attention continuous batching cannot run on CPU."""
    import os

    from transformers import AutoConfig, AutoTokenizer

    from ..configuration import SparseMoeConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model_dir {model_dir} has no config.json; train or save a model there first.")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != SparseMoeConfig.model_type:
        raise ValueError(f"--model_dir holds a {config.model_type!r} model; this launcher serves lightarch SparseMoe "
                         f"models ({SparseMoeConfig.model_type!r}).")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer in {model_dir} has no chat template, which /v1/chat/completions needs. Set one "
            "(tokenizer.chat_template = lightarch.data.tokenizers.CHAT_TEMPLATE; tokenizer.save_pretrained(folder))."
        )
    if attn_implementation not in ("sdpa", "paged|eager"):
        raise ValueError(f"--attn_implementation {attn_implementation!r}: use 'sdpa' or 'paged|eager' on CPU.")
    return config, tokenizer


def serve_folder(
    model_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    continuous_batching: bool = True,
    max_concurrent_requests: int = 8,
    max_request_tokens: int | None = None,
    max_batch_tokens: int = 512,
    default_max_tokens: int = 256,
    attn_implementation: str = "sdpa",
    log_level: str = "warning",
) -> None:
    """Serve the saved lightarch folder `model_dir` with transformers' own `Serve` (OpenAI-compatible API) until
    stopped: continuous batching with a paged cache sized for `max_concurrent_requests` requests of
    `max_request_tokens` (`cpu_continuous_batching_config`), and `TokenBudgetMiddleware` refusing over-budget
    requests with HTTP 400.

    transformers 5.24's model manager resolves the class with `getattr(transformers, config.architectures[0])` (remote
    code is not looked up), so lightarch's classes are set on the transformers module first.
    """
    import logging
    import sys

    import transformers
    from transformers.cli import serve as serve_cli
    from transformers.cli.serving import model_manager, server as server_module

    from ..modeling_sparse_moe import SparseMoeForCausalLM, SparseMoeForSequenceClassification

    config, tokenizer = check_servable_folder(model_dir, attn_implementation)
    cb_config = cpu_continuous_batching_config(config, max_concurrent_requests, max_request_tokens, max_batch_tokens)
    budget = request_token_budget(config, cb_config)
    logging.getLogger(__name__).info(
        "Paged KV cache: %d blocks of %d tokens (%.1f MB); per-request budget %d tokens", cb_config.num_blocks,
        cb_config.page_size, paged_cache_bytes(config, cb_config) / 2**20, budget)

    # (Importing some transformers submodules re-registers the lazy `transformers` module, so patch the object the
    # model manager actually uses as well.)
    lazy_modules = {id(m): m for m in (transformers, model_manager.transformers, sys.modules["transformers"])}
    for module in lazy_modules.values():
        for cls in (SparseMoeForCausalLM, SparseMoeForSequenceClassification):
            setattr(module, cls.__name__, cls)

    build_server = server_module.build_server

    def build_server_with_budget(*args, **kwargs):
        app = build_server(*args, **kwargs)
        app.add_middleware(TokenBudgetMiddleware, tokenizer=tokenizer, budget=budget,
                           default_max_new_tokens=default_max_tokens)
        return app

    server_module.build_server = build_server_with_budget
    # Serve builds ContinuousBatchingConfig(**flags) from its --cb-* flags: hand it our CPU-sized config instead.
    current = sys.modules["transformers"]
    original_cb_config = current.ContinuousBatchingConfig
    current.ContinuousBatchingConfig = lambda **_: cb_config
    try:
        serve_cli.Serve(
            force_model=str(model_dir),
            continuous_batching=continuous_batching,
            attn_implementation=attn_implementation,
            device="cpu",
            dtype="float32",
            cb_num_blocks=cb_config.num_blocks,  # any --cb-* flag makes Serve build (our) config
            host=host,
            port=port,
            log_level=log_level,
        )
    finally:
        current.ContinuousBatchingConfig = original_cb_config
        server_module.build_server = build_server
