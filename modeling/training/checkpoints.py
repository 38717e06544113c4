"""Checkpoints and atomic output: the last complete Trainer checkpoint, files and model folders written so that a
crash never leaves a half-written result."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


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


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """`--resume_from_checkpoint`: None / 'false' -> None; 'true' / 'latest' -> the last complete checkpoint in
    `output_dir`; otherwise a checkpoint folder, which must be complete. Raises ValueError naming the option."""
    if value is None or value.strip().lower() in ("", "false", "no", "0", "none"):
        return None
    if value.strip().lower() in ("true", "yes", "1", "latest", "last"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in --output_dir {output_dir}. "
                "Pass a checkpoint path, or drop the option to start from scratch."
            )
        return checkpoint
    if not (Path(value) / "trainer_state.json").is_file():
        raise ValueError(
            f"--resume_from_checkpoint {value}: not a complete Trainer checkpoint (no trainer_state.json). "
            "Pass a checkpoint-<step> folder, or True for the last one in --output_dir."
        )
    return value


def resume_or_start_fresh(value: str | bool | None, output_dir: str | os.PathLike, remove_stale: bool = True
                          ) -> str | None:
    """`--resume_from_checkpoint` for a Trainer that writes its checkpoints into `output_dir`: the checkpoint folder to
    resume from (`resolve_resume`: True / 'latest' -> the last complete one in
    `output_dir`, else a complete checkpoint folder; a ValueError names the option otherwise), or None to start from
    scratch, after removing (with `remove_stale`; without, this only checks the option) an earlier run's
    `checkpoint-*` folders there: they would mix with this run's, and a later `--resume_from_checkpoint True` would
    pick them."""
    checkpoint = resolve_resume(None if value is None else str(value), output_dir)
    if not remove_stale:
        return checkpoint
    stale = sorted(Path(output_dir).glob("checkpoint-*")) if checkpoint is None else []
    if stale:
        logger.warning("Starting from scratch: removing %d checkpoint(s) of an earlier run in %s (to continue that "
                       "run instead, pass --resume_from_checkpoint True).", len(stale), output_dir)
        for folder in stale:
            shutil.rmtree(folder)
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)
    return checkpoint


RUNTIME_CONFIG_KEYS = {"use_cache", "dtype", "auto_map", "architectures", "transformers_version", "_name_or_path"}


def check_resume_config(config, checkpoint: str | os.PathLike) -> None:
    """A ValueError naming `--resume_from_checkpoint` when the model `config` of this run differs from the one the
    `checkpoint` was trained with (settings such as `use_cache`, that Trainer changes, aside)."""
    saved = type(config).from_pretrained(checkpoint).to_dict()
    given = config.to_dict()
    different = sorted(k for k in (saved.keys() | given.keys()) - RUNTIME_CONFIG_KEYS if saved.get(k) != given.get(k))
    if different:
        shown = ", ".join(f"{k}={given.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in different[:3])
        raise ValueError(f"--resume_from_checkpoint {checkpoint} was trained with other model options: {shown}"
                         f"{'...' if len(different) > 3 else ''}. Pass that run's --preset / --config_overrides, or "
                         "start from scratch.")


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


def write_result_files(folder: str | os.PathLike, results: dict, markdown: str,
                       images: Mapping[str, bytes] | None = None) -> None:
    """A measurement's results.json, results.md and its PNGs (file name -> bytes) into `folder`, each atomically."""
    folder = Path(folder)
    write_atomically(folder / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(folder / "results.md", markdown)
    for name, png in (images or {}).items():
        write_atomically(folder / name, png)


OUTPUT_MARKER = "lightarch_output.json"  # names the script whose output a folder is (`check_output_dir`)
DEFAULT_KEEP = ("checkpoint-*", "runs")  # Trainer's checkpoints and logs, carried over when a folder is saved again


def output_marker(folder: str | os.PathLike) -> dict | None:
    """The marker a lightarch script left in `folder` ({"script": ..., "keep": [...]}), or None."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("script"), str) else None


def _marker_text(script: str, keep: Sequence[str] = ()) -> str:
    return json.dumps({"script": script, "keep": list(keep)}, indent=2) + "\n"


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    path: str | os.PathLike,
    script: str,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    option: str = "--output_dir",
) -> Path:
    """The one rule for every script's output folder; returns it (absolute). A ValueError names the folder and the fix.

    `path` may be written by `script` if it does not exist, is an empty folder, or holds a previous run of the same
    `script` (its `OUTPUT_MARKER`, written by `prepare_output_dir` / `atomic_save_pretrained`). It may never be, or
    contain, one of `inputs` (option name -> the folder or file the script reads, e.g. {"--model_dir": ...}):
    replacing it would delete the input.
    """
    folder = Path(path).absolute()
    for name, source in (inputs or {}).items():
        if source is not None and _contains(folder, Path(source).absolute()):
            what = "is" if folder == Path(source).absolute() else "contains"
            raise ValueError(f"{option} {path} {what} the input {name} {source}: writing there would replace it. "
                             f"Choose another {option}.")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder. Choose another {option}.")
    if folder.is_dir() and any(entry.name != OUTPUT_MARKER for entry in folder.iterdir()):
        marker = output_marker(folder)
        if marker is None:
            raise ValueError(f"{option} {path} is not empty and holds no output of {script} (no {OUTPUT_MARKER}): "
                             f"its contents would be replaced. Choose another {option}, or empty it.")
        if marker["script"] != script:
            raise ValueError(f"{option} {path} holds the output of {marker['script']}, not of {script}: it would be "
                             f"replaced. Choose another {option}.")
    return folder


def prepare_output_dir(
    path: str | os.PathLike,
    script: str,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    option: str = "--output_dir",
    keep: Sequence[str] = ("checkpoint-*", "runs"),
) -> Path:
    """`check_output_dir`, after recovering a save that a crash interrupted (`recover_interrupted_save`), then create
    the folder and mark it as `script`'s, so that what the run writes there before its final save (Trainer
    checkpoints) is recognised as this script's on the next start. Returns the folder (absolute)."""
    recover_interrupted_save(path)
    folder = check_output_dir(path, script, inputs, option)
    folder.mkdir(parents=True, exist_ok=True)
    if (output_marker(folder) or {}).get("script") != script:  # new, empty, or only another script's marker
        write_atomically(folder / OUTPUT_MARKER, _marker_text(script, keep))
    return folder


def _carry_over(old: Path, folder: Path, keep: Sequence[str]) -> None:
    for entry in sorted(old.iterdir()):
        if any(fnmatch.fnmatch(entry.name, pattern) for pattern in keep) and not (folder / entry.name).exists():
            os.replace(entry, folder / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def _modified(path: Path) -> float:
    return path.stat().st_mtime


def recover_interrupted_save(folder: str | os.PathLike) -> None:
    """Finish or undo an `atomic_save_pretrained` of `folder` that a crash interrupted between its renames.

    A complete new save (`.<name>.tmp-*`: the newest one when the previous run was already moved aside, or one
    holding the marker, which is written last) whose swap did not happen is renamed into place when `folder` is
    missing; otherwise the previous run moved aside (`.<name>.old-*`) is put back. With `folder` in place, the
    entries it keeps (its marker's `keep`, default: checkpoints and logs) are carried over from the moved-aside run,
    which is then deleted, and so are incomplete temporary folders.
    """
    folder = Path(folder).absolute()
    parent = folder.parent
    if not parent.is_dir():
        return
    temps = sorted(parent.glob(f".{glob.escape(folder.name)}.tmp-*"), key=_modified)
    olds = sorted(parent.glob(f".{glob.escape(folder.name)}.old-*"), key=_modified)
    # The previous run is moved aside only once the new save is complete (stale temporary folders are deleted
    # before a save starts), so with a moved-aside run the newest temporary folder is complete.
    complete = [t for t in temps if t.is_dir() and (output_marker(t) is not None or olds)][-1:]
    if not folder.exists() and (olds or complete):
        source = complete[-1] if complete else olds.pop()
        logger.warning("Recovering %s from %s (a save was interrupted)", folder, source.name)
        os.replace(source, folder)
        _fsync(parent)
    for stale in parent.glob(f".{glob.escape(folder.name)}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if folder.is_dir():
        keep = (output_marker(folder) or {}).get("keep", DEFAULT_KEEP)
        for old in olds:
            _carry_over(old, folder, keep)


def staging_dir(folder: str | os.PathLike) -> Path:
    """A new temporary sibling of `folder` (`.<name>.tmp-*`) to write its next version into, for
    `replace_output_dir`; an interrupted earlier save of `folder` is recovered first (`recover_interrupted_save`)."""
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(folder)  # also deletes the temporary folders of an earlier crash
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))


def replace_output_dir(staging: str | os.PathLike, folder: str | os.PathLike, script: str | None = None,
                       keep: Sequence[str] = ("checkpoint-*", "runs")) -> Path:
    """Make the complete `staging` folder (from `staging_dir(folder)`) the new `folder`, atomically.

    Its files are flushed to disk and `OUTPUT_MARKER` (naming `script`, and `keep`) written last; only then is the
    previous `folder` moved aside (`.<name>.old-*`) and `staging` renamed into place; the previous entries matching
    `keep` are carried over, the rest deleted. A crash between the two renames is repaired on the next start by
    `recover_interrupted_save`. `script` (default: the previous save's marker; none without one) names the writer
    for `check_output_dir`. On an error before the swap `staging` is deleted and `folder` untouched."""
    staging, folder = Path(staging), Path(folder).absolute()
    script = script or (output_marker(folder) or {}).get("script")
    try:
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync(path)
        if script:  # last: the save is complete
            write_atomically(staging / OUTPUT_MARKER, _marker_text(script, keep))
        _fsync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
    os.replace(staging, folder)
    _fsync(folder.parent)
    if old is not None:
        _carry_over(old, folder, keep)
    return folder


def atomic_save_pretrained(
    folder: str | os.PathLike,
    *objects,
    extra_files: dict[str, bytes | str] | None = None,
    keep: Sequence[str] = ("checkpoint-*", "runs"),
    script: str | None = None,
) -> Path:
    """Save `objects` (anything with `save_pretrained`) and `extra_files` (name -> content) as `folder`, atomically.

    Everything is written into a temporary sibling folder (`staging_dir`), then swapped into place by
    `replace_output_dir` (marker naming `script` written last). If saving fails or the process dies, `folder` still
    holds the previous complete save or does not exist; a crash between the two renames of the swap is repaired
    by `recover_interrupted_save`, which runs first.

    `keep`: glob patterns of entries of the previous `folder` to carry over into the new one (default: Trainer's
    `checkpoint-*` folders and `runs` logs, so a run saved into its own output_dir can still be resumed); every
    other previous entry is deleted. Pass `keep=()` to replace the folder entirely.
    """
    tmp = staging_dir(folder)
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_output_dir(tmp, folder, script, keep)


@contextlib.contextmanager
def writing_beside_saved_model(folder: str | os.PathLike, what: str):
    """Write extras (card, plots) into a folder whose model is already saved: a failure is logged with the folder
    (the model in it is complete) and re-raised, so it never costs the trained model."""
    try:
        yield
    except Exception:
        logger.error("Writing %s failed; the trained model is saved, complete, in %s", what, folder)
        raise
