"""Text corpora as causal-LM data: deterministic file listing and splitting, token streams cut into blocks, and the
held-out text a trained model is evaluated on."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) for `key` (stable across runs, machines and Python's hash seed)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def list_source_files(root: str | os.PathLike, pattern: str = "*.py", exclude_dirs: Sequence[str] = ()) -> list[str]:
    """Relative paths (POSIX style, sorted) of the files under `root` matching `pattern`.

    Directories named in `exclude_dirs` (e.g. `site-packages`, `__pycache__`) are not entered.
    """
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs)
        for name in filenames:
            if fnmatch.fnmatch(name, pattern):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def split_by_file(paths: Iterable[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Split paths into (train, held-out) by a hash of each path; each list is ordered by that hash.

    Ordering by hash spreads a capped selection (`paths[:n]`) over the whole tree instead of its first folders.
    """
    ordered = sorted(paths, key=lambda p: (hashlib.sha256(p.encode("utf-8")).hexdigest(), p))
    heldout = [p for p in ordered if hash_fraction("heldout:" + p) < heldout_fraction]
    heldout_set = set(heldout)
    return [p for p in ordered if p not in heldout_set], heldout


def read_text_files(root: str | os.PathLike, paths: Iterable[str], limit: int, max_bytes: int | None = None
                    ) -> tuple[list[str], list[str]]:
    """Read up to `limit` UTF-8 files (in the given order), skipping empty, undecodable or too large ones.

    Returns (texts, the relative paths used).
    """
    texts, used = [], []
    for path in paths:
        if len(used) >= limit:
            break
        full = Path(root) / path
        if max_bytes is not None and full.stat().st_size > max_bytes:
            continue
        try:
            text = full.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
            used.append(path)
    return texts, used


def split_text_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split one text into (head, tail) at a line boundary, the tail holding about `fraction` of the lines."""
    lines = text.splitlines(keepends=True)
    if fraction <= 0 or len(lines) < 2:
        return text, ""
    cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - fraction))))
    return "".join(lines[:cut]), "".join(lines[cut:])


def tokenize_documents(tokenizer, texts: Sequence[str], batch_size: int = 64, desc: str = "Tokenizing") -> list[int]:
    """One token stream: each document is `<|bos|> tokens <|eos|>`, documents concatenated in order."""
    from tqdm.auto import tqdm

    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=len(texts) <= batch_size):
        for ids in tokenizer(list(texts[start : start + batch_size]), verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    return stream


def token_blocks(token_ids: Sequence[int], block_size: int) -> torch.Tensor:
    """A token stream cut into `(num_blocks, block_size)` rows; the remainder is dropped (as run_clm.py does)."""
    num_blocks = len(token_ids) // block_size
    return torch.tensor(token_ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Rows of token ids, `(num_blocks, block_size)`, as causal-LM examples: labels are the inputs (the model shifts
    them). Build it from a token stream with `BlockDataset(token_blocks(ids, block_size))`."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"BlockDataset takes (num_blocks, block_size) token ids, got shape {tuple(blocks.shape)}.")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def text_blocks(tokenizer, text: str, block_size: int) -> torch.Tensor:
    """Tokenize `text` (no special tokens) and cut it into `(num_blocks, block_size)` token ids; drops the remainder."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < block_size:
        raise ValueError(
            f"The text has {len(ids)} tokens, fewer than one block of {block_size}; give more text or a smaller block."
        )
    return token_blocks(ids, block_size)


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
