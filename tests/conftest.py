"""Shared fixtures: tiny configs so every test runs in seconds on 2 CPU cores, with no hub access."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on a shared CPU

import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # tests also run from a plain checkout, before `pip install -e .`
    sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightarch  # noqa: E402,F401  (registers the Auto classes)
from lightarch import SparseMoeConfig  # noqa: E402


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts folder is not a package every test can import from)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def tiny_sparse_moe_config(**overrides) -> SparseMoeConfig:
    """A 3-layer hybrid (sliding, full, sliding) SparseMoe with 4 experts; override any field."""
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_experts_per_token=3,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return SparseMoeConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_BLOCK_LIGHTARCH = """
import importlib.abc, sys
class BlockLightarch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("configuration", "modeling", "lightarch"):
            raise ImportError("lightarch is not installed here: " + name)
sys.meta_path.insert(0, BlockLightarch())
"""


def run_without_lightarch(script: str, tmp_path: Path) -> None:
    """Run `script` in a new interpreter outside the project, where `lightarch` (and the repository folders `configuration` / `modeling`) cannot be imported:
    a user loading a saved folder through remote code. The script must print REMOTE-CODE-OK at its end."""
    import subprocess
    import textwrap

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules_cache"), OMP_NUM_THREADS="1")
    source = _BLOCK_LIGHTARCH + textwrap.dedent(script)
    result = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-CODE-OK" in result.stdout
