"""The package's shape: one import name, model files apart from the library, nothing below scripts/ imported.

- A saved model folder carries lightarch's flat model files (remote code). Each of them may import only its flat
  siblings and torch / transformers / safetensors (plus the standard library and what transformers itself needs);
  a model file importing a library sub-package (`.deploy`, `lightarch.training`, ...) would break loading where
  lightarch is not installed, or drag the library into every saved folder.
- The installed wheel has exactly one top-level import name, `lightarch`, and ships the model-card templates.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import lightarch
from conftest import PROJECT_ROOT, tiny_sparse_moe_config

PACKAGE_DIR = PROJECT_ROOT / "modeling"
CONFIGURATION_DIR = PROJECT_ROOT / "configuration"
# What a remote-code file may import besides its flat siblings: the standard library, torch, transformers and what
# transformers itself depends on (scipy: the processor's polyphase resampling, as transformers' audio utilities use it;
# transformers' remote-code loader names any of these that a user lacks).
ALLOWED_TOP_LEVEL = {"torch", "transformers", "safetensors", "numpy", "scipy", "tokenizers", "huggingface_hub"}
# The configuration shims in modeling/ re-export lightarch.configuration when installed; in a saved folder the real
# configuration file (from configuration/) replaces them, so they are never remote code themselves.
CONFIG_SHIMS = {"configuration_sparse_moe.py", "configuration_adaptive_depth.py", "configuration_multimodal.py"}


def remote_code_violations(source: str, siblings: set[str]) -> list[str]:
    """The imports in `source` that a file of a saved model folder may not have (empty list: the file is fine)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            target = (node.module or "").split(".")
            if node.level > 1 or len(target) != 1 or target[0] not in siblings:
                problems.append(f"from {'.' * node.level}{node.module or ''} import ... (not a flat sibling)")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ALLOWED_TOP_LEVEL:
                    problems.append(f"import {module} (not torch / transformers / safetensors / the standard library)")
    return problems


def test_the_checker_catches_a_model_file_importing_the_library():
    siblings = {"layers", "configuration_sparse_moe"}
    assert remote_code_violations("from .layers import Attention\nimport torch\nimport math\n", siblings) == []
    for bad in ("from .deploy import lora_config", "from .training.callbacks import MoeStatsCallback",
                "from ..layers import Attention", "from lightarch.data import corpus", "import configuration",
                "from modeling import layers", "import peft"):
        assert remote_code_violations(bad, siblings), bad


def _flat_model_files() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.glob("*.py") if p.name != "__init__.py" and p.name not in CONFIG_SHIMS)


def test_flat_files_in_modeling_are_model_files_that_import_only_siblings_and_torch_transformers():
    siblings = {p.stem for p in PACKAGE_DIR.glob("*.py")}
    for path in _flat_model_files() + sorted(CONFIGURATION_DIR.glob("configuration_*.py")):
        assert remote_code_violations(path.read_text(encoding="utf-8"), siblings) == [], path.name


def _saved_code_files(model, tmp_path: Path) -> dict[str, str]:
    model.save_pretrained(tmp_path)
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(tmp_path.glob("*.py"))}


def test_saved_folders_carry_only_model_files_that_import_only_each_other(tmp_path):
    from lightarch import AdaptiveDepthConfig, MultiModalConfig

    adaptive = AdaptiveDepthConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                   num_attention_heads=4, num_key_value_heads=2, num_experts=4, vocab_size=97,
                                   exit_layers=[2, 4])
    multimodal = MultiModalConfig.from_preset("tiny")
    models = {
        "sparse_moe": AutoModelForCausalLM.from_config(tiny_sparse_moe_config()),
        "adaptive": AutoModelForCausalLM.from_config(adaptive),
        "multimodal": AutoModelForImageTextToText.from_config(multimodal),
    }
    flat_files = {p.name for p in PACKAGE_DIR.glob("*.py")} - {"__init__.py"}
    for name, model in models.items():
        files = _saved_code_files(model, tmp_path / name)
        assert files, f"{name}: the saved folder has no code"
        for file_name, source in files.items():
            assert file_name in flat_files, f"{name}: {file_name} is not a flat model file of modeling/"
            assert remote_code_violations(source, {Path(f).stem for f in files}) == [], (name, file_name)


def test_no_library_module_imports_a_script_or_edits_sys_path():
    for path in sorted(PACKAGE_DIR.rglob("*.py")) + sorted(CONFIGURATION_DIR.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] != "scripts", path
            elif isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] != "scripts" for alias in node.names), path
        assert "sys.path.insert" not in source and "sys.path.append" not in source, path


def test_import_lightarch_registers_every_architecture():
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    for config_class in (lightarch.SparseMoeConfig, lightarch.AdaptiveDepthConfig, lightarch.MultiModalConfig):
        assert CONFIG_MAPPING[config_class.model_type] is config_class
        assert isinstance(AutoConfig.for_model(config_class.model_type), config_class)
    assert PROCESSOR_MAPPING[lightarch.MultiModalConfig] is lightarch.MultiModalProcessor
    assert AutoProcessor is not None
    for name in ("SparseMoeConfig", "SparseMoeForCausalLM", "AdaptiveDepthForCausalLM",
                 "MultiModalForConditionalGeneration", "MultiModalProcessor", "from_transformers"):
        assert name in lightarch.__all__ and getattr(lightarch, name) is not None


def test_wheel_has_one_top_level_name_and_ships_the_model_card_templates(tmp_path):
    """Built from a copy of the tracked files (`pip wheel . --no-deps`), as a release would be."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    source = tmp_path / "src"
    for name in filter(None, tracked.decode().split("\0")):
        if (PROJECT_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, source / name)
    for name in ("modeling", "configuration", "model_cards"):  # files created since the last commit, too
        for path in (PROJECT_ROOT / name).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                (source / path.relative_to(PROJECT_ROOT)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, source / path.relative_to(PROJECT_ROOT))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist")], cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lightarch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["lightarch"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"lightarch"}
    from lightarch.evaluation.model_cards import MODEL_CARD_TEMPLATES

    for template in MODEL_CARD_TEMPLATES:
        assert f"lightarch/model_cards/{template}.md" in names
    packaged = {n[len("lightarch/"):] for n in names if n.startswith("lightarch/") and n.endswith(".py")}
    on_disk = {p.relative_to(PACKAGE_DIR).as_posix() for p in PACKAGE_DIR.rglob("*.py")}
    on_disk |= {f"configuration/{p.name}" for p in CONFIGURATION_DIR.glob("*.py")}
    on_disk |= {"model_cards/__init__.py"}
    assert packaged == on_disk, "pyproject.toml's package list misses " + ", ".join(sorted(on_disk - packaged))


def test_model_card_templates_load_from_the_package():
    from lightarch.evaluation.model_cards import MODEL_CARD_TEMPLATES, model_card_template

    for name in MODEL_CARD_TEMPLATES:
        assert "${" in model_card_template(name)
    with pytest.raises(ValueError, match="ships"):
        model_card_template("nope")
