"""A script that re-declares a library dataclass's defaults (so that `--help` answers without importing torch) must
state the same values: `--help` is compared with the dataclass, field by field."""

import os
import re
import subprocess
import sys
from dataclasses import MISSING, fields

import pytest
from conftest import PROJECT_ROOT
from lightarch.data.arithmetic import SuiteSizes
from lightarch.training.adaptive_depth import AdaptiveSchedule


def help_defaults(script: str) -> dict[str, str]:
    """option name -> the default `--help` shows, from one unwrapped help text."""
    env = {**os.environ, "COLUMNS": "10000", "HF_HUB_OFFLINE": "1"}
    text = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / f"{script}.py"), "--help"], env=env,
                          capture_output=True, text=True, timeout=120, check=True).stdout
    return dict(re.findall(r"^\s+--(\w+) [A-Z_]+, --[\w-]+ [A-Z_]+\s+.*\(default: ([^)]*)\)\s*$", text, re.M))


@pytest.mark.parametrize(("script", "dataclasses"), [("train_adaptive", (SuiteSizes, AdaptiveSchedule))])
def test_script_defaults_equal_the_library_dataclasses(script, dataclasses):
    shown = help_defaults(script)
    for cls in dataclasses:
        for f in fields(cls):
            assert f.default is not MISSING, f"{cls.__name__}.{f.name} has no plain default to compare"
            assert f.name in shown, f"scripts/{script}.py --help shows no --{f.name}"
            assert type(f.default)(shown[f.name]) == f.default, (
                f"scripts/{script}.py --{f.name} defaults to {shown[f.name]}, {cls.__name__}.{f.name} to {f.default}")
