"""The sha256 manifest of a saved retrieval folder (a kNN-LM datastore, a cross-modal index): written last by
`save_pretrained`, checked first by `from_pretrained`, so that a changed, truncated or missing file is refused, naming
it, before anything is parsed. It detects corruption and edits of single files; it is not a signature (whoever can
rewrite the folder can rewrite the manifest)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

MANIFEST_NAME = "manifest.json"


class FolderIntegrityError(ValueError):
    """A saved folder's file does not match its manifest (or is missing): the folder is refused, nothing is loaded."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (keys files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, files: Sequence[str], format: str, version: int = 1) -> None:
    """Write `folder/manifest.json` with the sha256 of each of `files` (call it after every other file is written)."""
    folder = Path(folder)
    manifest = {"format": format, "version": version, "files": {name: sha256_file(folder / name) for name in files}}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def verify_manifest(folder: str | Path, files: Sequence[str], format: str, *, what: str, writer: str,
                    error: type[FolderIntegrityError] = FolderIntegrityError, verify: bool = True) -> None:
    """Check `files` of `folder` against its manifest; raise `error` naming the first file that is unlisted, missing
    or (with `verify`) changed. `what` names the folder in messages ("the datastore"), `writer` the method that
    writes such folders ("Datastore.save_pretrained")."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = manifest["files"]
        assert manifest.get("format") == format and isinstance(listed, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as caught:
        raise error(f"{manifest_path}: missing or not a {format} manifest ({type(caught).__name__}); the folder was "
                    f"not written by {writer}, refusing to load it.") from None
    for name in files:
        path = folder / name
        if name not in listed:
            raise error(f"{path}: not listed in {MANIFEST_NAME}; refusing to load {what}.")
        if not path.is_file():
            raise error(f"{path}: missing (listed in {MANIFEST_NAME}); {what} is incomplete.")
        if verify and sha256_file(path) != listed[name]:
            raise error(f"{path}: sha256 does not match {MANIFEST_NAME} (the file was changed or is corrupt); "
                        f"refusing to load {what}. Rebuild it.")
