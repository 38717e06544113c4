"""kNN-LM (Khandelwal et al. 2020) over any causal LM: p = lambda * p_kNN + (1 - lambda) * p_LM, where p_kNN puts
softmax(-distance / temperature) of the k nearest datastore keys on their next tokens.

Two ways in, one computation (`interpolate`):
    `KnnLM(model, datastore)(input_ids)`   a module whose logits are the mixture's log-probabilities, every position
                                           (perplexity: `lightarch.evaluation.perplexity.perplexity(knn_lm, blocks)`);
    `KnnLM.generate(...)`                  the model's own `generate()` with a `KnnLogitsProcessor`: a hook on the key
                                           site starts the search as soon as the query exists, on a worker thread
                                           (`overlap=True`), so it runs while the rest of the forward (the final
                                           feed-forward, the LM head) does; the processor collects it.

The processor rewrites the raw next-token logits, so put it first: transformers appends user processors after its own,
so with sampling warpers (temperature, top-k) these run before the mixture; greedy and beam search are exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import CausalLMOutput

from .datastore import Datastore
from .hooks import capture_keys
from .index import faiss_threads
from .overlap import Prefetcher

LAMBDA_MODES = ("fixed", "distance", "entropy")


@dataclass
class KnnLMConfig:
    """How retrieval and the LM are mixed."""

    k: int = 8  # neighbours per query
    lambda_: float = 0.25  # weight of p_kNN (the maximum, for the adaptive modes)
    temperature: float = 1.0  # p_kNN = softmax(-squared L2 distance / temperature)
    lambda_mode: str = "fixed"  # "fixed"; "distance": lambda_ * exp(-nearest distance / lambda_scale);
    # "entropy": lambda_ * H(p_LM) / log(V) (an unsure LM leans on retrieval)
    lambda_scale: float = 1.0  # distance scale of the "distance" mode

    def check(self) -> None:
        """ValueError naming the field when a value cannot work."""
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}.")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {self.lambda_}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {self.lambda_mode!r}.")
        if not self.lambda_scale > 0:
            raise ValueError(f"lambda_scale must be > 0, got {self.lambda_scale}.")


def knn_log_probs(distances: torch.Tensor, tokens: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """log p_kNN `(N, V)` from neighbours' squared distances `(N, k)` (inf = no neighbour) and next tokens `(N, k)`:
    each neighbour's softmax(-d / temperature) weight summed onto its token; -inf for tokens no neighbour has."""
    weights = torch.softmax(-distances.float() / temperature, dim=-1)  # (N, k); a row of all-inf gives nan
    weights = torch.nan_to_num(weights, nan=0.0)
    probs = torch.zeros(distances.shape[0], vocab_size, dtype=torch.float32, device=distances.device)
    probs.scatter_add_(1, tokens.long(), weights)  # (N, V)
    return probs.log()


def interpolation_weight(config: KnnLMConfig, lm_log_probs: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """lambda per row `(N, 1)`: fixed, from the nearest distance, or from the LM's entropy; 0 where no neighbour."""
    lam = torch.full((lm_log_probs.shape[0], 1), config.lambda_, dtype=torch.float32, device=lm_log_probs.device)
    nearest = distances.float().min(dim=-1, keepdim=True).values  # (N, 1)
    if config.lambda_mode == "distance":
        lam = lam * torch.exp(-nearest.clamp_min(0) / config.lambda_scale)
    elif config.lambda_mode == "entropy":
        entropy = -(lm_log_probs.exp() * lm_log_probs).nan_to_num(0.0).sum(-1, keepdim=True)
        lam = lam * (entropy / math.log(lm_log_probs.shape[-1])).clamp(0.0, 1.0)
    return torch.where(torch.isfinite(nearest), lam, torch.zeros_like(lam))


def interpolate(lm_logits: torch.Tensor, distances: torch.Tensor, tokens: torch.Tensor,
                config: KnnLMConfig, knn: torch.Tensor | None = None) -> torch.Tensor:
    """log(lambda * p_kNN + (1 - lambda) * p_LM) `(N, V)` from LM logits `(N, V)` and neighbours `(N, k)`, in log
    space (logaddexp), so lambda = 0 gives exactly log_softmax(lm_logits). `knn` is log p_kNN when already computed
    (`knn_log_probs` of the same neighbours, e.g. on the retrieval worker)."""
    lm_log_probs = torch.log_softmax(lm_logits.float(), dim=-1)
    if distances.shape[0] != lm_logits.shape[0]:
        raise ValueError(f"{distances.shape[0]} neighbour rows for {lm_logits.shape[0]} logit rows.")
    if knn is None:
        check_token_ids(tokens, lm_logits.shape[-1])
        knn = knn_log_probs(distances, tokens, lm_logits.shape[-1], config.temperature)
    lam = interpolation_weight(config, lm_log_probs, distances)
    return torch.logaddexp(torch.log(lam) + knn, torch.log1p(-lam) + lm_log_probs)


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """ValueError when a neighbour's next token is outside the model's vocabulary (another tokenizer's datastore)."""
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(f"the datastore holds token id {int(tokens.max())}, outside the model's vocabulary of "
                         f"{vocab_size}: it was built with another tokenizer.")


class KnnLM(nn.Module):
    """A causal LM plus a datastore. Calling it gives the mixture's log-probabilities as `logits` (every position);
    `generate()` is the model's `generate()` with the mixture applied to each next-token distribution.

    `overlap=True` runs each decoding step's search on a worker thread, started by the key hook during the forward;
    `overlap=False` runs the same search in the logits processor (the sequential reference). Call `close()` (or use
    it as a context manager) to stop the worker.
    """

    def __init__(self, model: nn.Module, datastore: Datastore, config: KnnLMConfig | None = None,
                 overlap: bool = True) -> None:
        super().__init__()
        self.model, self.datastore = model, datastore
        self.knn_config = config or KnnLMConfig()
        self.knn_config.check()
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is not None and datastore.config.site == "ffn_input" and hidden != datastore.keys.shape[1]:
            raise ValueError(f"the datastore's keys have dim {datastore.keys.shape[1]}, the model's hidden_size is "
                             f"{hidden}: build the datastore with this model.")
        self.prefetcher = Prefetcher(overlap)

    @property
    def config(self):  # the wrapped model's config (what perplexity helpers and generate expect to find)
        return self.model.config

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The datastore's k nearest neighbours of `queries` `(Q, d)`: distances and next tokens, `(Q, k)`."""
        return self.datastore.search(queries, self.knn_config.k)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutput:
        """logits `(B, T, V)` = log p of the mixture at every position; loss as a causal LM's (labels shifted)."""
        captured: list[torch.Tensor] = []
        with capture_keys(self.model, captured.append, self.datastore.config.layer, self.datastore.config.site):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits  # (B, T, V)
        hidden = captured[-1]  # (B, T, d)
        batch, length, vocab = logits.shape
        distances, tokens = self.search(hidden.reshape(batch * length, -1).float().cpu().numpy())
        mixed = interpolate(logits.reshape(batch * length, vocab), torch.from_numpy(distances).to(logits.device),
                            torch.from_numpy(tokens).to(logits.device), self.knn_config).view(batch, length, vocab)
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(mixed[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                          ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=mixed)

    def _search_step(self, query: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoding step's retrieval: neighbours' distances and tokens `(B, k)`, and log p_kNN `(B, V)` (on the
        worker when overlapped, so only the mixing itself is left for the logits processor)."""
        with faiss_threads(1):  # one query per sequence: nothing to split, and spinning threads would slow the decoder
            distances, tokens = (torch.from_numpy(array) for array in self.search(query))
        vocab_size = int(self.model.config.get_text_config().vocab_size)  # a composite model's text config
        check_token_ids(tokens, vocab_size)
        return distances, tokens, knn_log_probs(distances, tokens, vocab_size, self.knn_config.temperature)

    def _start_step_search(self, hidden: torch.Tensor) -> None:
        query = hidden[:, -1].float().cpu().numpy().copy()  # (B, d): the position whose next token is chosen
        self.prefetcher.start(self._search_step, query)

    @contextlib.contextmanager
    def attached(self) -> Iterator["KnnLogitsProcessor"]:
        """Hook the model for decoding: each forward starts the search for its last position. Yields the logits
        processor that collects it (pass it to `model.generate(logits_processor=...)` yourself, or use `generate`)."""
        with capture_keys(self.model, self._start_step_search, self.datastore.config.layer,
                          self.datastore.config.site):
            yield KnnLogitsProcessor(self)

    def generate(self, *args, logits_processor: LogitsProcessorList | None = None, **kwargs):
        """`model.generate(*args, **kwargs)` with p = lambda * p_kNN + (1 - lambda) * p_LM at every step."""
        with self.attached() as processor:
            processors = LogitsProcessorList([processor, *(logits_processor or [])])
            return self.model.generate(*args, logits_processor=processors, **kwargs)

    def close(self) -> None:
        self.prefetcher.close()

    def __enter__(self) -> "KnnLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KnnLogitsProcessor(LogitsProcessor):
    """Replaces next-token logits `(B, V)` by log(lambda * p_kNN + (1 - lambda) * p_LM), with the neighbours of the
    step's query that `KnnLM.attached()`'s hook started searching during the forward."""

    def __init__(self, knn_lm: KnnLM) -> None:
        self.knn_lm = knn_lm

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.knn_lm.prefetcher.pending:
            raise RuntimeError("KnnLogitsProcessor: no retrieval for this step; use it inside KnnLM.attached() "
                               "(or call KnnLM.generate).")
        distances, tokens, knn = (tensor.to(scores.device) for tensor in self.knn_lm.prefetcher.result())
        if knn.shape[-1] != scores.shape[-1]:  # logits wider or narrower than config.vocab_size: weigh them here
            knn = None
        return interpolate(scores, distances, tokens, self.knn_lm.knn_config, knn=knn).to(scores.dtype)
