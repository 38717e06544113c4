"""Text corpora as causal-LM data: deterministic file listing and splitting, the main job's corpus (the Python
standard library split by file, or a text file), token streams cut into blocks, and the held-out text a trained model
is evaluated on."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# A few paragraphs of plain English prose (written for lightarch), the default text of LoRA fine-tuning
# (`lightarch.deploy.peft.finetune_lora`) and of small tests: offline, and unlike the code corpus.
ENGLISH_SAMPLE_TEXT = """\
The lighthouse keeper climbed the stairs at dusk, as he had every evening for thirty years. He counted the steps out
of habit, one hundred and twelve, and paused at the small window on the landing to look at the sea. The wind had come
round to the north, and the waves were breaking white against the rocks below the point.
At the top he trimmed the wick, cleaned the glass and wound the clockwork that turned the lens. The light began to
sweep across the water, once every ten seconds, as it had done since before he was born. Far out, a fishing boat was
making for the harbour, its own small lamp rising and falling with the swell.
He wrote in the log: wind north, rising; sea rough; visibility good; one vessel inbound. Then he sat by the stove with
a cup of tea and listened to the building hum and creak around him, a tall stone instrument played by the weather.
In the morning the storm had passed. The keeper walked down to the shore and found the beach covered in kelp and
driftwood, and among it a wooden crate stamped with the name of a ship he did not know. Inside, packed in straw, were
six glass floats, green and blue, each as large as a man's head, and not one of them was broken.
He carried them up to the house two at a time and set them on the windowsill, where they caught the low winter sun
and threw coloured light across the kitchen table. His daughter, when she visited at the end of the month, said they
looked like the eyes of some great creature of the deep, watching the room. He laughed and said that was exactly right.
A garden is a slow conversation between a person and a piece of ground. In the first year you mostly listen: where
the water stands after rain, where the frost lingers, which corner the sun reaches last. In the second year you begin
to answer, a row of beans here, a currant bush there, and the ground answers back with weeds, slugs and surprises.
By the third year the conversation has a rhythm. You know that the lettuces will bolt in July if you sow them late,
that the apple tree crops heavily every other year, and that the robin will follow you along the bed whenever you dig.
The bread was rising on the windowsill. She had mixed flour, water, salt and a spoonful of the old starter the night
before, folded the dough four times in the morning, and now it sat under a damp cloth, slowly doubling. Baking is
mostly waiting, her grandmother used to say, and the waiting is the part that makes the bread taste of something.
"""

# Not source code worth learning from: installed packages, bytecode caches, and encodings/ (codec tables).
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__", "encodings")


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


@dataclass
class TextCorpus:
    """Train and held-out texts, the files they came from, and how to describe them in a model card."""

    train_texts: list[str]
    eval_texts: list[str]
    train_files: list[str]
    eval_files: list[str]  # relative to the source folder (standard library) or the text file paths
    description: str  # a sentence or two for the model card
    short: str  # e.g. "Python 3.12 standard library source code"
    heldout: str  # what is held out, for the model card
    dataset_type: str  # model-index dataset type ("python-source" or "text")
    dataset_name: str


def stdlib_dir() -> str:
    """The folder of the Python standard library's source files (the main job's default corpus)."""
    return sysconfig.get_paths()["stdlib"]


def check_corpus_options(
    train_file: str | os.PathLike | None,
    validation_file: str | os.PathLike | None,
    source_dir: str | os.PathLike | None,
    validation_fraction: float,
    max_train_files: int,
    max_eval_files: int,
    max_file_bytes: int,
) -> None:
    """Raise ValueError naming the option (`--train_file`, ...) when `load_corpus` cannot build a corpus from these
    arguments (the same as `load_corpus`'s)."""

    def check(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    check(0.0 <= validation_fraction < 1.0, f"--validation_fraction must be in [0, 1), got {validation_fraction}.")
    check(max_train_files >= 1, f"--max_train_files must be >= 1, got {max_train_files}.")
    check(max_eval_files >= 1, f"--max_eval_files must be >= 1, got {max_eval_files}.")
    check(max_file_bytes >= 0, f"--max_file_bytes must be >= 0, got {max_file_bytes}.")
    if train_file is not None:
        check(Path(train_file).is_file(), f"--train_file {train_file}: no such file.")
    if validation_file is not None:
        check(train_file is not None, "--validation_file requires --train_file.")
        check(Path(validation_file).is_file(), f"--validation_file {validation_file}: no such file.")
    else:
        check(validation_fraction > 0,
              "--validation_fraction must be > 0 to hold out data for evaluation (or pass --validation_file).")
    if train_file is None:
        folder = source_dir if source_dir is not None else stdlib_dir()
        check(Path(folder).is_dir(), f"--source_dir {folder}: no such folder.")


def load_corpus(
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.1,
    max_train_files: int = 300,
    max_eval_files: int = 12,
    max_file_bytes: int = 60_000,
) -> TextCorpus:
    """The main job's corpus (`scripts/train.py`); the defaults are its default run's.

    With `train_file`: that text, held out as `validation_file` or else its last `validation_fraction` of lines.
    Otherwise the `*.py` files under `source_dir` (default: the standard library, without site-packages and the codec
    tables in encodings/), split by a hash of each relative path: `validation_fraction` of the files are held out, and
    the first `max_train_files` / `max_eval_files` of each split in hash order (skipping files over `max_file_bytes`
    bytes; 0 = no limit) are read. The split is deterministic: the same on every machine and run. Invalid options
    raise ValueError (`check_corpus_options`).
    """
    check_corpus_options(train_file, validation_file, source_dir, validation_fraction, max_train_files,
                         max_eval_files, max_file_bytes)
    if train_file is not None:
        name = Path(train_file).name
        text = Path(train_file).read_text(encoding="utf-8")
        if validation_file is not None:
            train_text, eval_text = text, Path(validation_file).read_text(encoding="utf-8")
            heldout = f"Held out: `{Path(validation_file).name}`."
        else:
            train_text, eval_text = split_text_tail(text, validation_fraction)
            heldout = f"Held out: the last {validation_fraction:.0%} of the lines of the training file."
        return TextCorpus(
            train_texts=[train_text], eval_texts=[eval_text] if eval_text.strip() else [],
            train_files=[str(train_file)], eval_files=[str(validation_file or train_file)],
            description=f"The text file `{name}`.", short=f"the text file {name}", heldout=heldout,
            dataset_type="text", dataset_name=name,
        )

    root = str(source_dir) if source_dir is not None else stdlib_dir()
    paths = list_source_files(root, "*.py", exclude_dirs=STDLIB_EXCLUDED_DIRS)
    train_paths, eval_paths = split_by_file(paths, validation_fraction)
    max_bytes = max_file_bytes or None
    train_texts, train_used = read_text_files(root, train_paths, max_train_files, max_bytes)
    eval_texts, eval_used = read_text_files(root, eval_paths, max_eval_files, max_bytes)
    is_stdlib = source_dir is None
    name = f"Python {sys.version_info.major}.{sys.version_info.minor} standard library" if is_stdlib else Path(root).name
    description = (
        f"Source code of the {name} (`*.py` files under `{root}`"
        + (", site-packages and the codec tables in `encodings/` excluded" if is_stdlib else "")
        + f"). Of its {len(paths)} files, {len(eval_paths)} ({validation_fraction:.0%}, chosen by a hash of "
        f"the relative path) are held out. Files over {max_file_bytes} bytes are skipped and the first "
        f"{max_train_files} training / {max_eval_files} held-out files in hash order are used."
    )
    return TextCorpus(
        train_texts=train_texts, eval_texts=eval_texts, train_files=train_used, eval_files=eval_used,
        description=description, short=f"{name} source code", heldout=(
            "No held-out file is in the training split, and the tokenizer never saw them."),
        dataset_type="python-source", dataset_name=f"{name} (*.py, split by file)",
    )


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

    `heldout_file` wins; otherwise the held-out files a main-job run (`scripts/train.py`) recorded in
    `model_dir/results.json` (`data.eval_files`, relative to the standard library); otherwise, for a main-job folder
    that recorded none (trained on a text file), the held-out split of the main job's default corpus
    (`load_corpus()`); otherwise standard-library files picked by a hash of their path (which may overlap the training
    data of a model trained on the standard library).
    """
    import json

    if heldout_file is not None:
        return [Path(heldout_file).read_text(encoding="utf-8")], f"the text file {heldout_file}"
    root = Path(stdlib_dir())
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
        corpus = load_corpus(max_eval_files=max_files)
        if corpus.eval_texts:
            return corpus.eval_texts, f"the main job's default held-out split ({corpus.heldout})"
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
