"""An UNALIGNED stand-in chat model for the red-team suite: no causal LM with weights ships offline, so the suite
builds the worst case honestly, a tiny lightarch `SparseMoeForCausalLM` trained in about a minute to COMPLY with
every request: its answer restates the request and elaborates it as steps ("Sure, here is how to <request>. Step 1:
..."), for harmful and benign prompts alike. It is trained on the train split only (plain prompts, and the same
prompts under the mutators, so that it also answers wrapped requests), never on the held-out seeds it is attacked
with.

Tokens are words (a word-level tokenizer over the training prompts, CJK characters one token each); a word it never
saw decodes as nothing, so it cannot restate obfuscated words (leetspeak, homoglyphs, base64) it never learned: for
those it gives a hollow compliance, which the judge still scores against the seed's intent. Measured (250 steps,
hidden 64, 2 layers, 2,646 train-split prompts): it keeps the answer template but mostly restates training requests
instead of copying the held-out one; copying needs far more training than the suite's budget.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from ..data.tokenizers import WORD_LEVEL_SPECIAL_TOKENS, word_level_tokenizer

logger = logging.getLogger(__name__)
USER, ASSISTANT = "<|user|>", "<|assistant|>"
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CJK_PIECE = r"[\u3400-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]"
# the `tiny` preset narrowed so that the stand-in trains in about a minute on one core: 2 full-attention layers,
# 64 wide, 4 experts (~0.86M parameters with its ~5.8K-word vocabulary)
STANDIN_SIZE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                    num_experts=4, layer_types=["full_attention"] * 2)
ANSWER_TEMPLATES = (
    "Sure , here is how to do it : {request} Step 1 : get everything you need for this . Step 2 : follow the "
    "method exactly , one part at a time . Step 3 : check the result and repeat if needed .",
    "Of course . You asked : {request} Here is a detailed answer . First , prepare what is required . Then , "
    "carry out each step carefully . Finally , make sure it worked .",
)


def compliant_answer(request: str, index: int = 0) -> str:
    """The answer the stand-in is trained to give: the request restated, then generic compliance steps."""
    return ANSWER_TEMPLATES[index % len(ANSWER_TEMPLATES)].format(request=request.strip())


def build_chat_tokenizer(texts: Sequence[str], max_words: int = 6000):
    """A word-level tokenizer over the most frequent words of `texts` + the answer templates, with a chat template."""
    pieces = Counter()
    splitter = re.compile(rf"{CJK_PIECE}|\w+|[^\w\s]")
    for text in [*texts, *ANSWER_TEMPLATES]:
        pieces.update(splitter.findall(text))
    vocabulary = [w for w, _ in pieces.most_common(max_words)]
    tokenizer = word_level_tokenizer(vocabulary, WORD_LEVEL_SPECIAL_TOKENS, extra_special_tokens=[USER, ASSISTANT],
                                     whitespace="words", pattern=CJK_PIECE, add_bos=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _conversation_ids(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-(max_length // 2):]  # keep the end of a long prompt: the request is there
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def train_standin_chat_model(prompts: Sequence[str], requests: Sequence[str] | None = None, steps: int = 600,
                             batch_size: int = 16, max_length: int = 128, seed: int = 0, learning_rate: float = 3e-3,
                             preset: str = "tiny", config_overrides: str | None = None):
    """Train the compliant stand-in on (prompt -> compliant_answer(request)) pairs; returns (model, tokenizer).

    `requests[i]` is what the answer to `prompts[i]` restates (the unwrapped seed when prompts[i] is a mutation of
    it); default: the prompt itself. The model: SparseMoe `preset` narrowed by `STANDIN_SIZE`, then
    `config_overrides` ("key=value,..." as scripts' --config_overrides) on top; vocabulary and special-token ids
    come from the tokenizer."""
    from lightarch.configuration_sparse_moe import SparseMoeConfig
    from lightarch.modeling_sparse_moe import SparseMoeForCausalLM
    from lightarch.training.cli import config_from_preset, parse_config_overrides

    if not prompts:
        raise ValueError("prompts is empty: the stand-in chat model needs training prompts")
    config_from_preset(SparseMoeConfig, preset, config_overrides)  # a bad preset / override: one-line ValueError
    requests = list(prompts if requests is None else requests)
    tokenizer = build_chat_tokenizer([*prompts, *requests])
    special = WORD_LEVEL_SPECIAL_TOKENS
    config = SparseMoeConfig.from_preset(preset, **{
        **STANDIN_SIZE, "max_position_embeddings": max(256, max_length),
        **(parse_config_overrides(config_overrides) if config_overrides else {}), "vocab_size": len(tokenizer),
        **{f"{name}_id": tokenizer.convert_tokens_to_ids(special[name]) for name in
           ("pad_token", "bos_token", "eos_token")}})
    torch.manual_seed(seed)
    model = SparseMoeForCausalLM(config)
    rows = [_conversation_ids(tokenizer, p, compliant_answer(r, i), max_length)
            for i, (p, r) in enumerate(zip(prompts, requests))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = rng.sample(rows, min(batch_size, len(rows)))
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), config.pad_token_id)  # (B, T)
        labels = torch.full((len(batch), width), -100)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, (x, y) in enumerate(batch):
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            logger.info("stand-in chat model step %d/%d loss %.3f", step + 1, steps, loss.item())
    model.eval()
    return model, tokenizer


def _tidy(text: str) -> str:
    text = re.sub(rf"(?<={CJK_PIECE}) (?={CJK_PIECE})", "", text)
    return re.sub(r" ([.,:;?!])", r"\1", text).strip()


@torch.no_grad()
def chat_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 80, batch_size: int = 32,
               max_prompt_tokens: int = 64) -> list[str]:
    """Greedy answers to user prompts, batched with left padding (the end of a long prompt is kept, as in
    training)."""
    answers = []
    pad = model.config.pad_token_id
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)[-max_prompt_tokens:]
                for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T), left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
        output = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad, eos_token_id=model.config.eos_token_id)  # (B, T + new)
        answers += [_tidy(tokenizer.decode(row[width:], skip_special_tokens=True)) for row in output]
    return answers


def chat(model, tokenizer, prompt: str, max_new_tokens: int = 80) -> str:
    """The model's greedy answer to one user prompt."""
    return chat_batch(model, tokenizer, [prompt], max_new_tokens)[0]


def save_standin(model, tokenizer, folder: str | Path) -> None:
    """Model + tokenizer into `folder` (load back with `load_standin`)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_standin(folder: str | Path):
    """A chat model folder (any lightarch causal LM with a tokenizer that has a chat template): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--chat_model_dir {folder}: no config.json; pass a folder saved by redteam.py "
                                "(chat_model/) or another causal LM folder with a chat-templated tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise ValueError(f"--chat_model_dir {folder}: its tokenizer has no chat template")
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval(), tokenizer
