"""The kNN-LM datastore: keys = one decoder layer's hidden state at every position of a corpus, values = the token
that follows; built in batches straight into float16 `.npy` files on disk (memory bound: one batch of windows), then
indexed with faiss.

A saved datastore is one folder, in formats that never unpickle:

    datastore_config.json   what the keys are (layer, site, model), sizes, index kind
    keys.npy                (N, d) float16, read with allow_pickle=False (memory-mapped)
    values.npy              (N,) int32 next-token ids
    index.faiss             faiss's own format (faiss.write_index)
    manifest.json           sha256 of each file above

`Datastore.from_pretrained` checks every file against the manifest first: a changed, truncated or missing file
raises `DatastoreIntegrityError` naming it, before anything is parsed. The manifest detects corruption and edits of
single files; it is not a signature (whoever can rewrite the folder can rewrite the manifest).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .hooks import KEY_SITES, capture_keys
from .index import build_index, set_search_parameters
from .manifest import FolderIntegrityError, verify_manifest, write_manifest
from .search_process import neighbour_tokens

CONFIG_NAME = "datastore_config.json"
KEYS_NAME = "keys.npy"
VALUES_NAME = "values.npy"
INDEX_NAME = "index.faiss"
FORMAT = "lightarch-knn-datastore"
DATA_FILES = (CONFIG_NAME, KEYS_NAME, VALUES_NAME, INDEX_NAME)


class DatastoreIntegrityError(FolderIntegrityError):
    """A datastore file does not match its manifest (or is missing): the folder is refused, nothing is loaded."""


@dataclass
class DatastoreConfig:
    """What a datastore's keys are and how its index is searched."""

    layer: int = -1  # decoder layer whose hidden states are the keys (-1: the last)
    site: str = "ffn_input"  # "ffn_input" (kNN-LM's best) or "layer_output"; see lightarch.retrieval.hooks
    index: str = "hnsw"  # "flat" (exact), "hnsw", "ivf" or a faiss factory string
    block_size: int = 256  # tokens per forward window while building
    stride: int = 256  # window step; positions already stored by the previous window are skipped
    ef_search: int = 128  # HNSW search breadth
    nprobe: int = 16  # IVF lists searched
    num_keys: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    model_type: str = ""
    source: str = ""  # a sentence on the corpus the keys come from
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """ValueError naming the field when a value cannot work."""
        if self.site not in KEY_SITES:
            raise ValueError(f"site must be one of {KEY_SITES}, got {self.site!r}.")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (a context and a next token), got {self.block_size}.")
        if not 1 <= self.stride <= self.block_size:
            raise ValueError(f"stride must be in [1, block_size={self.block_size}], got {self.stride}.")


def window_plan(num_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, first stored position) of each forward window over a stream of `num_tokens` tokens.

    Window `start` predicts targets start+1 .. start+length-1; it stores only targets after those the previous window
    stored, so every target is stored once, with the longest context that window gives it.
    """
    plan, stored_until = [], 0  # targets 1..stored_until are in the datastore
    for start in range(0, max(num_tokens - 1, 0), stride):
        length = min(block_size, num_tokens - start)
        if length < 2 or start + length - 1 <= stored_until:
            continue
        first = max(0, stored_until - start)  # position p predicts target start + p + 1
        plan.append((start, length, first))
        stored_until = start + length - 1
    return plan


class Datastore:
    """Keys `(N, d)` float16, values `(N,)` int32 and a faiss index over the keys; `search` returns neighbours'
    squared L2 distances and next tokens."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, index, config: DatastoreConfig,
                 folder: str | os.PathLike | None = None) -> None:
        if keys.ndim != 2 or values.shape != (keys.shape[0],):
            raise ValueError(f"keys must be (N, d) and values (N,), got {keys.shape} and {values.shape}.")
        if index.ntotal != keys.shape[0] or index.d != keys.shape[1]:
            raise ValueError(f"index holds {index.ntotal} vectors of dim {index.d}, keys are {keys.shape}.")
        self.keys, self.values, self.index, self.config = keys, values, index, config
        self.folder = Path(folder) if folder is not None else None  # where keys / values live on disk, if anywhere

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances `(Q, k)` float32 (inf where fewer than k were found) and next-token ids `(Q, k)`
        int64 (0 there) of the k nearest keys of each query `(Q, d)`. faiss releases the GIL while it searches."""
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.keys.shape[1])
        return neighbour_tokens(*self.index.search(queries, k), self.values)

    def reindex(self, kind: str, **options) -> None:
        """Replace the index by a new one of `kind` over the same keys (e.g. "flat" for exact search)."""
        self.index = build_index(self.keys, kind, ef_search=self.config.ef_search, nprobe=self.config.nprobe,
                                 **options)
        self.config.index = kind

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the datastore as one folder (the module docstring's files), the manifest last."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in ((KEYS_NAME, self.keys), (VALUES_NAME, self.values)):
            source = self.folder / name if self.folder is not None else None
            if source is not None and source.is_file() and source.resolve() == (folder / name).resolve():
                continue  # built in place
            if source is not None and source.is_file():
                shutil.copyfile(source, folder / name)
            else:
                np.save(folder / name, np.asarray(array), allow_pickle=False)
        faiss.write_index(self.index, str(folder / INDEX_NAME))
        self.config.num_keys, self.config.hidden_size = int(self.keys.shape[0]), int(self.keys.shape[1])
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n", encoding="utf-8")
        write_manifest(folder, DATA_FILES, FORMAT)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, verify: bool = True) -> "Datastore":
        """Load a folder written by `save_pretrained`: every file is checked against manifest.json first
        (`DatastoreIntegrityError` naming the file); keys are memory-mapped, nothing is unpickled."""
        import faiss

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"datastore folder {folder}: no such folder (build one with scripts/build_datastore.py).")
        verify_manifest(folder, DATA_FILES, FORMAT, what="the datastore", writer="Datastore.save_pretrained",
                        error=DatastoreIntegrityError, verify=verify)
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        known = DatastoreConfig.__dataclass_fields__
        config = DatastoreConfig(**{k: v for k, v in raw.items() if k in known})
        keys = np.load(folder / KEYS_NAME, mmap_mode="r", allow_pickle=False)
        values = np.load(folder / VALUES_NAME, mmap_mode="r", allow_pickle=False)
        index = faiss.read_index(str(folder / INDEX_NAME))
        set_search_parameters(index, config.ef_search, config.nprobe)
        return cls(keys, values, index, config, folder=folder)


@torch.no_grad()
def build_datastore(
    model: nn.Module,
    token_ids: Sequence[int] | torch.Tensor,
    work_dir: str | os.PathLike,
    config: DatastoreConfig | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> Datastore:
    """Run `model` over `token_ids` (one stream) in windows of `config.block_size` tokens every `config.stride`,
    and store each position's key (the hidden state at `config.layer` / `config.site`) and next token.

    Keys and values are written to `work_dir/keys.npy` (float16) and `values.npy` as they are computed (memory:
    one batch of `batch_size` windows plus faiss's index); `Datastore.save_pretrained(work_dir)` then completes the
    folder in place. `max_tokens` caps the stream.
    """
    from tqdm.auto import tqdm

    config = config or DatastoreConfig()
    config.check()
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    plan = window_plan(len(ids), config.block_size, config.stride)
    if not plan:
        raise ValueError(f"token_ids has {len(ids)} tokens: at least 2 are needed to store one key.")
    num_keys = sum(length - 1 - first for _, length, first in plan)
    hidden_size = int(getattr(model.config, "hidden_size", 0) or 0)

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    captured: list[torch.Tensor] = []
    keys = values = None
    written = 0
    model.eval()
    device = next(model.parameters()).device
    by_length: dict[int, list] = {}  # windows of equal length batch together (only the tail ones are shorter)
    for window in plan:
        by_length.setdefault(window[1], []).append(window)
    batches = [group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]
    with capture_keys(model, captured.append, config.layer, config.site):
        # `disable` only when asked: passing it always would override the TQDM_DISABLE environment variable
        for batch in tqdm(batches, desc="Datastore", unit="batch", **({} if progress else {"disable": True})):
            inputs = torch.stack([ids[s : s + length] for s, length, _ in batch]).to(device)  # (B, L)
            captured.clear()
            model(input_ids=inputs, use_cache=False)
            hidden = captured[-1]  # (B, L, d)
            if keys is None:
                hidden_size = hidden.shape[-1]
                keys = np.lib.format.open_memmap(work_dir / KEYS_NAME, mode="w+", dtype=np.float16,
                                                 shape=(num_keys, hidden_size))
                values = np.lib.format.open_memmap(work_dir / VALUES_NAME, mode="w+", dtype=np.int32,
                                                   shape=(num_keys,))
            for row, (start, length, first) in enumerate(batch):
                count = length - 1 - first
                keys[written : written + count] = hidden[row, first : length - 1].float().cpu().numpy()
                values[written : written + count] = ids[start + first + 1 : start + length].numpy()
                written += count
    keys.flush()
    values.flush()
    del keys, values
    keys = np.load(work_dir / KEYS_NAME, mmap_mode="r", allow_pickle=False)
    values = np.load(work_dir / VALUES_NAME, mmap_mode="r", allow_pickle=False)
    config.num_keys, config.hidden_size = num_keys, hidden_size
    config.vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
    config.model_type = str(getattr(model.config, "model_type", ""))
    index = build_index(keys, config.index, ef_search=config.ef_search, nprobe=config.nprobe)
    return Datastore(keys, values, index, config, folder=work_dir)
