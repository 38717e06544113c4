"""Checkpoints and atomic output: the last complete Trainer checkpoint, files and model folders written so that a
crash never leaves a half-written result."""

from __future__ import annotations

import contextlib
import logging

import fnmatch
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path



def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-<step>` folder with the highest step whose save finished (it has `trainer_state.json`).

    Unlike `transformers.trainer_utils.get_last_checkpoint`, a checkpoint cut short by a crash is skipped.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for child in output_dir.iterdir():
        name = child.name
        if child.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            if (child / "trainer_state.json").is_file():
                steps.append((int(name[len("checkpoint-"):]), child))
    return str(max(steps)[1]) if steps else None


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file through a temporary sibling and `os.replace`: readers never see half a file."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_pretrained(
    folder: str | os.PathLike,
    *objects,
    extra_files: dict[str, bytes | str] | None = None,
    keep: Sequence[str] = ("checkpoint-*", "runs"),
) -> Path:
    """Save `objects` (anything with `save_pretrained`) and `extra_files` (name -> content) as `folder`, atomically.

    Everything is written into a temporary sibling folder (`.<name>.tmp-*`) and flushed to disk; only then is the
    previous `folder` moved aside and the new one renamed into place. If saving fails or the process dies,
    `folder` is untouched: it still holds the previous complete save, or does not exist. (A crash between the
    two renames leaves `folder` missing and the new save complete in the temporary sibling.)

    `keep`: glob patterns of entries of the previous `folder` to carry over into the new one (default: Trainer's
    `checkpoint-*` folders and `runs` logs, so a run saved into its own output_dir can still be resumed); every
    other previous entry is deleted. Pass `keep=()` to replace the folder entirely.
    """
    folder = Path(folder).absolute()
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{folder.name}.tmp-*"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old = None
    if folder.exists():
        old = parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(parent)
    if old is not None:
        for entry in sorted(old.iterdir()):
            if any(fnmatch.fnmatch(entry.name, pattern) for pattern in keep) and not (folder / entry.name).exists():
                os.replace(entry, folder / entry.name)
        shutil.rmtree(old, ignore_errors=True)
    return folder


logger = logging.getLogger(__name__)


@contextlib.contextmanager
def writing_beside_saved_model(folder: str | os.PathLike, what: str):
    """Write extras (card, plots) into a folder whose model is already saved: a failure is logged with the folder
    (the model in it is complete) and re-raised, so it never costs the trained model."""
    try:
        yield
    except Exception:
        logger.error("Writing %s failed; the trained model is saved, complete, in %s", what, folder)
        raise
