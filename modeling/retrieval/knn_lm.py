"""kNN-LM (Khandelwal et al. 2020) over any causal LM: p = lambda * p_kNN + (1 - lambda) * p_LM, where p_kNN puts
softmax(-distance / temperature) of the k nearest datastore keys on their next tokens.

Two ways in, one computation (`mix`):
    `KnnLM(model, datastore)(input_ids)`   a module whose logits are the mixture's log-probabilities, every position
                                           (perplexity: `lightarch.evaluation.perplexity.perplexity(knn_lm, blocks)`);
    `KnnLM.generate(...)`                  the model's own `generate()` with a `KnnLogitsProcessor`: a hook on the key
                                           site starts the search as soon as the query exists, in a worker process
                                           (`overlap=True`, `search_process.py` says why not a thread), so it runs
                                           while the rest of the forward (the final feed-forward, the LM head)
                                           does; the processor collects it.

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
from transformers.utils import logging

from ..training.cli import available_cpus
from .datastore import Datastore
from .hooks import capture_keys
from .index import faiss_threads
from .search_process import (LAMBDA_MODES, KnnDistribution, SearchProcess, knn_distribution, mixing_terms,
                             row_lambdas)

logger = logging.get_logger(__name__)

# How long the search worker and the decoder poll for each other's byte before blocking, when the decoder's torch
# threads leave a core free (`SearchProcess`): longer than a decoding step, so that the worker stays awake through a
# generation.
SPIN_SECONDS = 0.05
NO_RETRIEVAL = ("KnnLogitsProcessor: no retrieval for this step; use it inside KnnLM.attached() (or call "
                "KnnLM.generate).")


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


def interpolation_weight(config: KnnLMConfig, lm_log_probs: torch.Tensor, nearest: np.ndarray) -> np.ndarray:
    """lambda per row `(N,)` float64: fixed, from the nearest distance `(N,)`, or from the LM's entropy (LM
    log-probabilities `(N, V)`); 0 where no neighbour (`row_lambdas`)."""
    entropy_fraction = None
    if config.lambda_mode == "entropy":
        entropy = -(lm_log_probs.exp() * lm_log_probs).nan_to_num(0.0).sum(-1)  # (N,)
        entropy_fraction = np.clip(entropy.detach().double().cpu().numpy() / math.log(lm_log_probs.shape[-1]), 0.0, 1.0)
    return row_lambdas(nearest, config.lambda_, config.lambda_mode, config.lambda_scale, entropy_fraction)


def check_datastore_tokens(max_token: int, vocab_size: int) -> None:
    """ValueError when the datastore's largest next-token id does not fit the model's vocabulary."""
    if max_token >= vocab_size:
        raise ValueError(f"the datastore holds token id {max_token}, outside the model's vocabulary of {vocab_size}: "
                         "it was built with another tokenizer.")


def mix(lm_logits: torch.Tensor, knn: KnnDistribution, config: KnnLMConfig) -> torch.Tensor:
    """log(lambda * p_kNN + (1 - lambda) * p_LM) `(N, V)` from LM logits `(N, V)`: log((1 - lambda) p_LM) everywhere,
    then logaddexp with log(lambda p_kNN) on p_kNN's entries only, so lambda = 0 gives exactly log_softmax(lm_logits)
    and a row without neighbours keeps the LM's distribution (`mixing_terms`; taken from `knn` when the search worker
    computed them, whose token ids KnnLM checked once against the vocabulary).

    This runs on the decoder's thread at every step, where each call costs tens of microseconds (the forward in
    between evicts the caches): on CPU without autograd the steps after the log-softmax are three numpy calls, in
    place on its output."""
    lm_log_probs = torch.log_softmax(lm_logits.float(), dim=-1)  # (N, V)
    if knn.nearest.shape[0] != lm_logits.shape[0]:
        raise ValueError(f"{knn.nearest.shape[0]} neighbour rows for {lm_logits.shape[0]} logit rows.")
    if knn.log_keep is None:
        if knn.tokens.size:
            check_datastore_tokens(int(knn.tokens.max()), lm_logits.shape[-1])
        log_keep, log_weighted = mixing_terms(knn, interpolation_weight(config, lm_log_probs, knn.nearest))
    else:
        log_keep, log_weighted = knn.log_keep, knn.log_weighted  # (N,), (n,)
    if lm_log_probs.device.type == "cpu" and not lm_log_probs.requires_grad:
        mixed = lm_log_probs.numpy()  # (N, V): the tensor's own memory, written in place; the tensor is returned
        mixed += log_keep[:, None]
        mixed[knn.rows, knn.tokens] = np.logaddexp(mixed[knn.rows, knn.tokens], log_weighted)
        return lm_log_probs
    device = lm_log_probs.device
    mixed = lm_log_probs + torch.from_numpy(log_keep).to(device)[:, None]  # (N, V)
    if knn.tokens.size:
        rows, tokens = torch.from_numpy(knn.rows).to(device), torch.from_numpy(knn.tokens).to(device)
        mixed[rows, tokens] = torch.logaddexp(mixed[rows, tokens], torch.from_numpy(log_weighted).to(device))
    return mixed


def interpolate(lm_logits: torch.Tensor, distances: np.ndarray | torch.Tensor, tokens: np.ndarray | torch.Tensor,
                config: KnnLMConfig) -> torch.Tensor:
    """`mix` of LM logits `(N, V)` with the p_kNN of neighbours' distances and tokens `(N, k)`."""
    return mix(lm_logits, knn_distribution(distances, tokens, config.temperature), config)


class KnnLM(nn.Module):
    """A causal LM plus a datastore. Calling it gives the mixture's log-probabilities as `logits` (every position);
    `generate()` is the model's `generate()` with the mixture applied to each next-token distribution.

    `overlap=True` runs each decoding step's search in a worker process (`SearchProcess`), sent by the key hook
    during the forward; `overlap=False` runs the same search in the logits processor (the sequential reference). Call
    `close()` (or use it as a context manager) to stop the worker.
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
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab_size = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_size is not None and len(datastore):
            check_datastore_tokens(int(np.max(datastore.values)), int(vocab_size))
        self._tokens_checked = vocab_size is not None  # then the worker may compute the mixing terms unchecked
        self.overlap = overlap
        self._search_process: SearchProcess | None = None  # the overlapped path's worker, from the first step
        self._spin_seconds = 0.0  # the worker's polling, set per generation by attached()
        self._pending_query: np.ndarray | None = None  # the sequential path's query, until the processor searches it

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
        mixed = interpolate(logits.reshape(batch * length, vocab), distances, tokens,
                            self.knn_config).view(batch, length, vocab)
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(mixed[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                          ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=mixed)

    def _start_step_search(self, hidden: torch.Tensor) -> None:
        """The key hook during decoding: send the last position's query `(B, d)` to the worker process (overlapped),
        or keep it for the logits processor (sequential)."""
        if hidden.device.type == "cpu" and hidden.dtype == torch.float32:
            query = hidden.numpy()[:, -1]  # (B, d): the position whose next token is chosen (a view: one call)
        else:
            query = hidden[:, -1].float().cpu().numpy()
        if self.overlap:
            if self._search_process is None:  # started at the first decoding step: perplexity alone never needs it
                self._search_process = SearchProcess(self.datastore.index, self.datastore.values)
            self._search_process.spin_seconds = self._spin_seconds
            config = self.knn_config
            self._search_process.start(query, config.k, config.temperature,
                                       lambda_=config.lambda_ if self._tokens_checked else None,
                                       lambda_mode=config.lambda_mode, lambda_scale=config.lambda_scale)
        else:
            self._pending_query = query.copy()

    def _collect_step(self) -> KnnDistribution:
        """The pending step's p_kNN: from the worker process, or searched here and now (the sequential reference,
        the same numpy steps as the worker's)."""
        if self.overlap:
            if self._search_process is None or not self._search_process.pending:
                raise RuntimeError(NO_RETRIEVAL)
            return self._search_process.result(copy=False)  # mixed before the next step overwrites it
        query, self._pending_query = self._pending_query, None
        if query is None:
            raise RuntimeError(NO_RETRIEVAL)
        with faiss_threads(1):  # one query per sequence: nothing to split, and idle threads would spin
            distances, tokens = self.search(query)
        return knn_distribution(distances, tokens, self.knn_config.temperature)

    @contextlib.contextmanager
    def attached(self) -> Iterator["KnnLogitsProcessor"]:
        """Hook the model for decoding: each forward starts the search for its last position. Yields the logits
        processor that collects it (pass it to `model.generate(logits_processor=...)` yourself, or use `generate`).

        The overlapped search needs a core the decoder does not use: with torch's threads on every core the worker
        does not poll (and a warning says so), and searching in line may then be as fast."""
        if self.overlap:
            threads, cpus = torch.get_num_threads(), available_cpus()
            self._spin_seconds = SPIN_SECONDS if threads < cpus else 0.0
            if threads >= cpus:
                logger.warning_once(
                    f"KnnLM(overlap=True): torch uses {threads} threads on {cpus} CPUs, so "
                    "the search worker has no core of its own and competes with the forward; call "
                    "torch.set_num_threads(<CPUs - 1>) or use overlap=False.")
        with capture_keys(self.model, self._start_step_search, self.datastore.config.layer,
                          self.datastore.config.site):
            yield KnnLogitsProcessor(self)

    def generate(self, *args, logits_processor: LogitsProcessorList | None = None, **kwargs):
        """`model.generate(*args, **kwargs)` with p = lambda * p_kNN + (1 - lambda) * p_LM at every step."""
        with self.attached() as processor:
            processors = LogitsProcessorList([processor, *(logits_processor or [])])
            return self.model.generate(*args, logits_processor=processors, **kwargs)

    def close(self) -> None:
        """Stop the worker process (a later `generate` starts a new one)."""
        self._pending_query = None
        if self._search_process is not None:
            self._search_process.close()
            self._search_process = None

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
        return mix(scores, self.knn_lm._collect_step(), self.knn_lm.knn_config).to(scores.dtype)
