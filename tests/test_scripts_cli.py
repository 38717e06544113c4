"""Every script answers --help without loading torch (so it answers at once), and the training scripts take --preset.

Scripts are run as a user runs them, in a fresh interpreter; nothing imports a script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT

# the README's `-n 2 --dist loadgroup` runs this module on one xdist worker, so its module-scoped probes run once
pytestmark = pytest.mark.xdist_group("test_scripts_cli")

SCRIPTS = sorted(p.stem for p in (PROJECT_ROOT / "scripts").glob("*.py"))
TRAINING_SCRIPTS = ("distill", "train", "train_adaptive", "train_multimodal", "train_passkey", "train_private",
                    "train_retrieval_qa")  # they build a config

# Runs a script's `--help` as `python scripts/X.py --help` would, then reports whether torch was imported on the way.
_PROBE = """
import runpy, sys
path, flag = sys.argv[1], sys.argv[2]
sys.argv = [path, flag]
code = 0
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as stop:
    code = stop.code or 0
print("TORCH-IMPORTED" if "torch" in sys.modules else "TORCH-NOT-IMPORTED")
sys.exit(code)
"""


def run_help(script: str, flag: str = "--help") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-c", _PROBE, str(PROJECT_ROOT / "scripts" / f"{script}.py"), flag],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


# Runs many scripts with one flag in ONE interpreter, each as `python scripts/X.py FLAG` would (runpy as __main__,
# its stdout / stderr captured, SystemExit read as the exit code): the scripts whose parser needs TrainingArguments
# import torch for a usage error or --help_all, and importing it once instead of once per script saves minutes.
_BATCH_PROBE = """
import contextlib, io, json, runpy, sys, traceback
flag, paths = sys.argv[1], sys.argv[2:]
results = {}
for path in paths:
    sys.argv = [path, flag]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                err.write(stop.code)
        except Exception:
            traceback.print_exc()
            code = 1
    results[path] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""


def run_many(scripts: list[str], flag: str) -> dict[str, subprocess.CompletedProcess]:
    """`python scripts/<s>.py FLAG` for every s, in one fresh interpreter (_BATCH_PROBE)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    paths = [str(PROJECT_ROOT / "scripts" / f"{script}.py") for script in scripts]
    probe = subprocess.run([sys.executable, "-c", _BATCH_PROBE, flag, *paths], cwd=PROJECT_ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    results = json.loads(probe.stdout.strip().splitlines()[-1])
    return {script: subprocess.CompletedProcess(path, results[path]["returncode"], results[path]["stdout"],
                                                results[path]["stderr"]) for script, path in zip(scripts, paths)}


def test_every_script_is_covered():
    assert set(TRAINING_SCRIPTS) <= set(SCRIPTS) and len(SCRIPTS) >= 13


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    result = run_help(script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert "TORCH-NOT-IMPORTED" in result.stdout, f"{script} --help imported torch (slow): move heavy imports into main()"


@pytest.fixture(scope="module")
def help_all() -> dict[str, subprocess.CompletedProcess]:
    return run_many(list(TRAINING_SCRIPTS), "--help_all")


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_training_scripts_take_a_preset_and_list_every_trainer_option_on_request(script, help_all):
    fast = run_help(script)
    assert "--preset" in fast.stdout and "--config_overrides" in fast.stdout
    assert "--help_all" in fast.stdout
    full = help_all[script]
    assert full.returncode == 0, full.stderr[-2000:]
    for option in ("--preset", "--learning_rate", "--per_device_train_batch_size", "--output_dir"):
        assert option in full.stdout, (script, option)


NON_TRAINING_SCRIPTS = [s for s in SCRIPTS if s not in TRAINING_SCRIPTS]


@pytest.fixture(scope="module")
def unknown_option() -> dict[str, subprocess.CompletedProcess]:
    return run_many(NON_TRAINING_SCRIPTS, "--no_such_option")


@pytest.mark.parametrize("script", NON_TRAINING_SCRIPTS)
def test_an_unknown_option_is_a_one_line_usage_error(script, unknown_option):
    """e.g. `finetune_lora.py --resume_from_checkpoint x`: argparse's usage error naming the option, exit 2."""
    result = unknown_option[script]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "unrecognized arguments: --no_such_option" in result.stderr
    assert "Traceback" not in result.stderr
