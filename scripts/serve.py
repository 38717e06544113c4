#!/usr/bin/env python
"""Serve a saved lightarch model with `transformers serve` (OpenAI-compatible API), continuous batching sized for a CPU.

`transformers serve <folder>` alone cannot serve a lightarch folder: transformers 5.24's model manager resolves the
class with `getattr(transformers, config.architectures[0])` and fails with "module transformers has no attribute
SparseMoeForCausalLM" (remote code is not looked up). This launcher registers lightarch's classes on the transformers
module, then runs transformers' own `Serve` with:

- continuous batching on, its paged KV cache sized for `--max_concurrent_requests` requests of the model's context
  (a few MB to a few hundred MB; transformers' default sizes it from free RAM, ~10 GB here);
- a per-request token budget (prompt + max_tokens <= the context and the cache): over-budget requests get HTTP 400
  naming the numbers instead of killing the batching worker; requests without max_tokens get the remaining budget.

The folder's tokenizer needs a chat template for /v1/chat/completions (the launcher refuses to start without one).

    python scripts/serve.py --model_dir outputs/sparse_moe --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "outputs/sparse_moe", "messages": [{"role": "user", "content": "def add("}], "max_tokens": 16}'
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field


import transformers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser  # noqa: E402

import lightarch  # noqa: E402  (registers the lightarch Auto classes)
from lightarch.deploy.serving import (  # noqa: E402
    TokenBudgetMiddleware,
    cpu_continuous_batching_config,
    paged_cache_bytes,
    request_token_budget,
)

logger = logging.getLogger("serve")


@dataclass
class ServeArguments:
    model_dir: str = field(
        default="outputs/sparse_moe",
        metadata={"help": "Folder of a saved lightarch causal LM whose tokenizer has a chat template."},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Listen address (loopback by default)."})
    port: int = field(default=8000, metadata={"help": "Listen port."})
    continuous_batching: bool = field(
        default=True, metadata={"help": "Continuous batching with a paged KV cache (--no_continuous_batching: off)."}
    )
    max_concurrent_requests: int = field(
        default=8, metadata={"help": "Requests the paged cache holds at full length at once (sizes the cache)."}
    )
    max_request_tokens: int | None = field(
        default=None,
        metadata={"help": "Per-request budget, prompt + generated tokens; default the model's context (max 2048)."},
    )
    max_batch_tokens: int = field(default=512, metadata={"help": "Tokens processed per forward (prefill chunking)."})
    default_max_tokens: int = field(
        default=256, metadata={"help": "max_tokens for requests that give none (clipped to the remaining budget)."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention for continuous batching on CPU: 'sdpa' or 'paged|eager'."}
    )
    log_level: str = field(default="warning", metadata={"help": "transformers / uvicorn log level."})


def lightarch_architectures() -> dict:
    return {name: getattr(lightarch, name) for name in lightarch.__all__ if name.startswith("SparseMoeFor")}


def check_folder(args: ServeArguments):
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise ValueError(f"--model_dir {args.model_dir} has no config.json; train or save a model there first.")
    config = AutoConfig.from_pretrained(args.model_dir)
    if config.model_type != lightarch.SparseMoeConfig.model_type:
        raise ValueError(f"--model_dir holds a {config.model_type!r} model; this launcher serves lightarch models.")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer in {args.model_dir} has no chat template, which /v1/chat/completions needs. Set one "
            "(tokenizer.chat_template = lightarch.data.tokenizers.CHAT_TEMPLATE; tokenizer.save_pretrained(folder))."
        )
    if args.attn_implementation not in ("sdpa", "paged|eager"):
        raise ValueError(f"--attn_implementation {args.attn_implementation!r}: use 'sdpa' or 'paged|eager' on CPU.")
    return config, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(ServeArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, tokenizer = check_folder(args)
    cb_config = cpu_continuous_batching_config(
        config, args.max_concurrent_requests, args.max_request_tokens, args.max_batch_tokens
    )
    budget = request_token_budget(config, cb_config)
    logger.info("Paged KV cache: %d blocks of %d tokens (%.1f MB); per-request budget %d tokens",
                cb_config.num_blocks, cb_config.page_size, paged_cache_bytes(config, cb_config) / 2**20, budget)

    from transformers.cli import serve as serve_cli
    from transformers.cli.serving import model_manager, server as server_module

    # transformers serve resolves the model class by name on the transformers module. (Importing some transformers
    # submodules re-registers the lazy `transformers` module, so patch the object the model manager actually uses.)
    lazy_modules = {id(m): m for m in (transformers, model_manager.transformers, sys.modules["transformers"])}
    for module in lazy_modules.values():
        for name, cls in lightarch_architectures().items():
            setattr(module, name, cls)

    build_server = server_module.build_server

    def build_server_with_budget(*a, **kw):
        app = build_server(*a, **kw)
        app.add_middleware(TokenBudgetMiddleware, tokenizer=tokenizer, budget=budget,
                           default_max_new_tokens=args.default_max_tokens)
        return app

    server_module.build_server = build_server_with_budget
    # Serve builds ContinuousBatchingConfig(**flags) from its --cb-* flags: hand it our CPU-sized config instead.
    current = sys.modules["transformers"]
    original_cb_config = current.ContinuousBatchingConfig
    current.ContinuousBatchingConfig = lambda **_: cb_config
    try:
        serve_cli.Serve(
            force_model=args.model_dir,
            continuous_batching=args.continuous_batching,
            attn_implementation=args.attn_implementation,
            device="cpu",
            dtype="float32",
            cb_num_blocks=cb_config.num_blocks,  # any --cb-* flag makes Serve build (our) config
            host=args.host,
            port=args.port,
            log_level=args.log_level,
        )
    finally:
        current.ContinuousBatchingConfig = original_cb_config
        server_module.build_server = build_server


if __name__ == "__main__":
    main()
