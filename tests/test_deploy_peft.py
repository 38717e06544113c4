"""PEFT on lightarch: documented LoRA targets (never the router), Trainer fine-tuning, merge equality, QLoRA, and
scripts/finetune_lora.py (lightarch.deploy.peft.finetune_lora) end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PROJECT_ROOT, tiny_sparse_moe_config
from deploy_helpers import save_tiny_model, tiny_byte_config

from lightarch import SparseMoeForCausalLM
from lightarch.data.corpus import BlockDataset
from lightarch.deploy.peft import (
    check_finetune_options,
    check_lora_targets,
    finetune_lora,
    lora_config,
    parse_lora_targets,
)

peft = pytest.importorskip("peft")


def _moe_model(**overrides):
    config = tiny_sparse_moe_config(router_mode="top_p", num_shared_experts=1, first_k_dense_layers=1, **overrides)
    return SparseMoeForCausalLM(config).eval()


def test_lora_config_adapts_attention_mlps_shared_and_routed_experts_never_the_router():
    model = peft.get_peft_model(_moe_model(), lora_config(r=2))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    adapted = {name.removeprefix("base_model.model.").replace(".base_layer", "") for name in adapted}
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected |= {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}  # the dense layer
    expected |= {f"model.layers.{i}.mlp.shared_experts.{p}" for i in (1, 2) for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {f"model.layers.{i}.mlp.experts" for i in (1, 2)}  # 3D expert weights via target_parameters
    assert adapted == expected
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name for name in trainable)
    router = model.base_model.model.model.layers[1].mlp.gate
    assert not router.weight.requires_grad and type(router).__name__ == "Router"
    check_lora_targets(model)  # passes


def test_routed_expert_lora_is_a_rank_r_update_per_expert():
    model = _moe_model()
    before = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    peft_model = peft.get_peft_model(model, lora_config(targets=("experts",), r=2, init_lora_weights=False))
    merged = peft_model.merge_and_unload()
    delta = merged.model.layers[1].mlp.experts.gate_up_proj.detach() - before
    assert delta.abs().max() > 0
    ranks = [torch.linalg.matrix_rank(delta[e]).item() for e in range(delta.shape[0])]
    assert all(rank <= 2 for rank in ranks) and max(ranks) == 2, ranks


def test_bad_lora_requests_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown LoRA target group"):
        lora_config(targets=("attention", "router"))
    with pytest.raises(ValueError, match="lora_dropout=0.1 cannot be used with the 'experts' target"):
        lora_config(targets=("experts",), lora_dropout=0.1)
    # A hand-made PEFT config that adapts the router's weight is refused.
    model = peft.get_peft_model(
        _moe_model(), peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.gate.weight"])
    )
    with pytest.raises(ValueError, match="LoRA adapts the router"):
        check_lora_targets(model)


def _train(model, steps: int = 3, seq: int = 16, vocab: int = 97):
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, vocab, (8, seq), generator=generator)
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-2,
                             save_strategy="no", report_to=[], use_cpu=True, label_names=["labels"],
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=BlockDataset(blocks)).train()


def test_trainer_lora_finetuning_then_merge_and_unload_gives_the_same_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _moe_model()
    base_state = {k: v.detach().clone() for k, v in model.named_parameters()}
    peft_model = peft.get_peft_model(model, lora_config(r=4))
    _train(peft_model)
    peft_model.eval()
    # Training changed only the adapter: base weights are untouched, every LoRA B moved away from its zero init.
    after = {k.replace("base_layer.", ""): v for k, v in peft_model.get_base_model().named_parameters()
             if "lora_" not in k}
    assert after.keys() == base_state.keys()
    assert all(torch.equal(base_state[k], v) for k, v in after.items())
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)

    input_ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        adapted = peft_model(input_ids).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            unadapted = peft_model(input_ids).logits
    assert (adapted - unadapted).abs().max() > 1e-3  # the adapter matters
    adapted_generation = peft_model.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False)
    merged = peft_model.merge_and_unload()
    assert type(merged) is SparseMoeForCausalLM and merged is base
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.generate(input_ids, max_new_tokens=6, do_sample=False), adapted_generation)


def test_qlora_4bit_base_trains_on_cpu(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from lightarch.deploy.bitsandbytes import bnb_quantization_config, load_quantized

    folder = save_tiny_model(tmp_path / "base", router_mode="top_p", num_shared_experts=1)
    config = tiny_byte_config(router_mode="top_p", num_shared_experts=1)
    model = load_quantized(folder, bnb_quantization_config(config, bits=4))
    quantized = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(quantized) == 3 * 4 + 3 * 3  # attention and shared experts of the 3 layers; lm_head stays fp32
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, lora_config(r=4))
    monkeypatch.chdir(tmp_path)
    _train(model, steps=3, vocab=259)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in lora_b)
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight
             for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert all(torch.equal(after[n], w) for n, w in quantized.items())  # the 4-bit base is frozen


def test_finetune_lora_script_saves_an_adapter_that_reloads(tmp_path):
    """scripts/finetune_lora.py end to end, as a user runs it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "base", router_mode="top_p", num_shared_experts=1)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "lora"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "finetune_lora.py"), "--model_dir", str(folder),
         "--text_file", str(text), "--output_dir", str(out), "--block_size", "32", "--batch_size", "4",
         "--max_steps", "5", "--r", "4", "--merge"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["trainable_parameters"] > 0 and results["args"]["max_steps"] == 5
    assert results["heldout_perplexity_after"] < results["heldout_perplexity_before"]
    assert results["targets"] == ["attention", "dense_mlp", "shared_experts", "experts"]
    assert "held-out perplexity after" in (out / "results.md").read_text()

    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.randint(3, 259, (1, 10))
    with torch.no_grad():
        base_logits = base(input_ids).logits
        adapted = PeftModel.from_pretrained(base, out).eval()
        adapter_logits = adapted(input_ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "merged")(input_ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-4
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)


def test_finetune_lora_rejects_bad_options(tmp_path):
    folder = save_tiny_model(tmp_path / "base")
    good = dict(model_dir=folder, text_file=None, merge=False, qlora=False, heldout_fraction=0.1, r=8, block_size=32,
                batch_size=4, max_steps=5)
    check_finetune_options(**good)
    with pytest.raises(ValueError, match="--targets 'attention,router'"):
        parse_lora_targets("attention,router")
    assert parse_lora_targets(" attention, experts") == ["attention", "experts"]
    with pytest.raises(ValueError, match="--merge cannot be used with --qlora"):
        check_finetune_options(**{**good, "qlora": True, "merge": True})
    with pytest.raises(ValueError, match="has no config.json"):
        check_finetune_options(**{**good, "model_dir": tmp_path / "missing"})
    with pytest.raises(ValueError, match="--heldout_fraction must be in"):
        check_finetune_options(**{**good, "heldout_fraction": 1.0})
    with pytest.raises(ValueError, match="--max_steps must be >= 1"):
        check_finetune_options(**{**good, "max_steps": 0})
    with pytest.raises(ValueError, match="has no config.json"):  # the library function checks its arguments too
        finetune_lora(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
