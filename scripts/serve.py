#!/usr/bin/env python
"""Serve a saved lightarch model with `transformers serve` (OpenAI-compatible API), continuous batching sized for a CPU.

`transformers serve <folder>` alone cannot serve a lightarch folder: transformers 5.24's model manager resolves the
class with `getattr(transformers, config.architectures[0])` and fails with "module transformers has no attribute
SparseMoeForCausalLM" (remote code is not looked up). This launcher registers lightarch's classes on the transformers
module, then runs transformers' own `Serve` with:

- continuous batching on, its paged KV cache sized for `--max_concurrent_requests` requests of the model's context
  (a few MB to a few hundred MB; transformers' default sizes it from free RAM, ~10 GB here);
- every request checked before it reaches the batching worker, on every generating route (/v1/chat/completions,
  /v1/completions, /v1/responses): a malformed field (missing or empty messages, non-string content, max_tokens
  "abc" or 2.7, temperature outside [0, 2], top_p outside (0, 1], n != 1) gets HTTP 400 naming the field; a prompt
  that is empty, or whose prompt + max_tokens exceeds the per-request token budget (the context and the cache), gets
  HTTP 400 naming the numbers instead of killing the worker; requests without max_tokens get the remaining budget;
- temperature / top_p refused (400 naming the field) where they would be ignored: transformers serve never turns
  sampling on per request, so a model whose generation config is greedy (lightarch's default) decodes greedily
  whatever they say (send temperature 0, or leave them out); and the batching worker would apply the first
  request's sampling settings to every request;
- POST /load_model, POST /reset and POST /v1/audio/transcriptions refused (403): the server is pinned to --model_dir;
- a batching worker that dies anyway fails the requests it was running and is replaced on the next request;
- with --safety_dir FOLDER (a saved lightarch.safety.SafetyFilter) or --safety builtin (the shipped rules), every
  prompt and answer is screened: a blocked prompt or answer is a normal HTTP 200 answer whose text is the filter's
  safe response, with finish_reason "content_filter" and the verdict (decision, category, explanation, each
  violation) in a `safety` field, and the model is not called for a blocked prompt; a streamed answer stops at its
  first violating chunk with one final chunk of that kind, then `data: [DONE]`. If the filter itself fails, the
  server fails closed: HTTP 503 "safety_filter_unavailable" naming the error (mid-stream: the final content_filter
  chunk, `safety.decision` "error"). See lightarch.deploy.serving.SafetyMiddleware. The filter also checks each
  text with its obfuscations undone (leetspeak, letter spacing, homoglyphs, base64, split payloads;
  lightarch.safety.DeobfuscatingFilter); --no_deobfuscate turns that off.

The folder's tokenizer needs a chat template for /v1/chat/completions (the launcher refuses to start without one).
It serves lightarch's text causal LMs: SparseMoe, and AdaptiveDepth (with continuous batching only under
exit_policy 'full'; its 'estimator' and 'confidence' policies need --no_continuous_batching, see
lightarch.deploy.serving.check_batchable_exit_policy).

    python scripts/serve.py --model_dir outputs/sparse_moe --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "outputs/sparse_moe", "messages": [{"role": "user", "content": "def add("}], "max_tokens": 16}'

The work is lightarch.deploy.serving.serve_folder.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field

from transformers.hf_argparser import HfArgumentParser  # no torch: --help stays fast


@dataclass
class ServeArguments:
    model_dir: str = field(
        default="outputs/sparse_moe",
        metadata={"help": "Folder of a saved lightarch causal LM (SparseMoe or AdaptiveDepth) whose tokenizer has a "
                          "chat template."},
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
    safety_dir: str | None = field(
        default=None,
        metadata={"help": "Screen prompts and answers with the SafetyFilter saved in this folder "
                          "(lightarch.safety.SafetyFilter.save_pretrained: rules, classifier, thresholds)."},
    )
    safety: str | None = field(
        default=None,
        metadata={"help": "'builtin': screen prompts and answers with the shipped safety rules (no classifier). "
                          "Use this or --safety_dir."},
    )
    deobfuscate: bool = field(
        default=True,
        metadata={"help": "With --safety_dir / --safety: also check each prompt and answer with leetspeak, letter "
                          "spacing, homoglyphs, base64 and split payloads undone (lightarch.safety."
                          "DeobfuscatingFilter; --no_deobfuscate: the plain filter only, which obfuscated harmful "
                          "prompts get past far more often)."},
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(ServeArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    from lightarch.deploy.serving import check_servable_folder, load_server_filter, serve_folder

    try:
        load_server_filter(args.safety_dir, args.safety, args.deobfuscate)
        check_servable_folder(args.model_dir, args.attn_implementation, args.continuous_batching)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    serve_folder(**asdict(args))


if __name__ == "__main__":
    main()
