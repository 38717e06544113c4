"""Saving and loading: Auto classes, remote code in a clean process, corrupt and incomplete folders."""

import json
import re
import shutil

import pytest
import torch
from conftest import run_without_lightarch, tiny_sparse_moe_config
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from lightarch import SparseMoeForCausalLM, SparseMoeForSequenceClassification, SparseMoeModel


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_sparse_moe_config(router_mode="top_p", num_shared_experts=1, first_k_dense_layers=1,
                                    router_bias_update_rate=0.01, use_qk_norm=True)
    model = SparseMoeForCausalLM(config).eval()
    with torch.no_grad():  # a non-zero balancing bias must survive the round trip
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    input_ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        logits = model(input_ids).logits
    return folder, model, input_ids, logits


def test_round_trip_through_auto_classes(saved_model):
    folder, model, input_ids, logits = saved_model
    assert (folder / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is SparseMoeForCausalLM
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, logits, atol=0, rtol=0)
    assert type(AutoModel.from_pretrained(folder)) is SparseMoeModel
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert type(classifier) is SparseMoeForSequenceClassification


def test_saved_folder_carries_self_contained_remote_code(saved_model):
    folder, *_ = saved_model
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_sparse_moe.SparseMoeForCausalLM"
    for name in ("configuration_sparse_moe.py", "modeling_sparse_moe.py", "layers.py", "checkpoint_checks.py"):
        source = (folder / name).read_text()
        assert not re.search(r"^\s*(from|import) (configuration|modeling|lightarch)\b", source, flags=re.MULTILINE), name
    assert "class SparseMoeConfig" in (folder / "configuration_sparse_moe.py").read_text()


def test_remote_code_loads_in_a_fresh_process_without_lightarch(saved_model, tmp_path):
    """A new interpreter, outside the project, with `configuration` / `modeling` made unimportable."""
    folder, _, input_ids, logits = saved_model
    torch.save({"input_ids": input_ids, "logits": logits}, tmp_path / "expected.pt")
    run_without_lightarch(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits
        # thread counts may differ from the parent process, so allow float summation-order noise
        torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=1e-5)
        generated = model.generate(expected["input_ids"], max_new_tokens=4, do_sample=False)
        assert generated.shape == (2, 13)
        print("REMOTE-CODE-OK")
        """,
        tmp_path,
    )


def _copy(folder, destination):
    shutil.copytree(folder, destination)
    return destination


def test_missing_weight_file_is_named(saved_model, tmp_path):
    broken = _copy(saved_model[0], tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_truncated_weight_file_is_named(saved_model, tmp_path):
    broken = _copy(saved_model[0], tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"model.safetensors is corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_missing_tensor_is_named_instead_of_silently_reinitialised(saved_model, tmp_path):
    broken = _copy(saved_model[0], tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.2.mlp.experts.down_proj"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"model\.layers\.2\.mlp\.experts\.down_proj"):
        AutoModelForCausalLM.from_pretrained(broken)
    model = SparseMoeForCausalLM.from_pretrained(broken, allow_missing_weights=True)
    assert model.model.layers[2].mlp.experts.down_proj.abs().sum() > 0


def test_missing_or_garbled_config_is_named(saved_model, tmp_path):
    broken = _copy(saved_model[0], tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(OSError, match="config.json"):
        SparseMoeForCausalLM.from_pretrained(broken)
    (broken / "config.json").write_text('{"model_type": "lightarch_sparse_moe", ')
    with pytest.raises(OSError, match="config.json is not valid JSON"):
        SparseMoeForCausalLM.from_pretrained(broken)
