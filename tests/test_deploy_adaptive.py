"""Deploying the adaptive-depth model: bitsandbytes 8/4-bit, PEFT LoRA + merge, ONNX export of the full-depth path."""

import numpy as np
import pytest
import torch
from deploy_helpers import save_tiny_adaptive_model, tiny_adaptive_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lightarch import AdaptiveDepthForCausalLM
from lightarch.deploy.bitsandbytes import bnb_quantization_config, load_quantized, quantizable_linears
from lightarch.deploy.peft import check_lora_targets, lora_config

POLICIES = ("full", "estimator", "confidence")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_adaptive_model(tmp_path_factory.mktemp("adaptive") / "fp32")


def _logits(model, input_ids, policy):
    with torch.no_grad():
        return model(input_ids, exit_policy=policy).logits


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantizes_the_linears_and_keeps_the_estimator_in_full_precision(folder, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    config = tiny_adaptive_config()
    fp32 = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(fp32, AdaptiveDepthForCausalLM)
    model = load_quantized(folder, bnb_quantization_config(config, bits=bits)).eval()
    quantized_class = {8: "Linear8bitLt", 4: "Linear4bit"}[bits]
    assert {n for n, m in model.named_modules() if type(m).__name__ == quantized_class} == set(quantizable_linears(config))
    for name in ("token_proj", "hidden", "out"):  # the estimator decides the depth: full precision, like the router
        layer = getattr(model.model.estimator, name)
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
        assert torch.equal(layer.weight, getattr(fp32.model.estimator, name).weight)

    input_ids = torch.randint(3, 259, (2, 10))
    if bits == 4:  # oracle: the float model with every quantized weight replaced by its dequantized value
        from bitsandbytes.functional import dequantize_4bit

        with torch.no_grad():
            for name in quantizable_linears(config):
                weight = model.get_submodule(name).weight
                fp32.get_submodule(name).weight.copy_(dequantize_4bit(weight.data, weight.quant_state))
    for policy in POLICIES:
        expected, actual = _logits(fp32, input_ids, policy), _logits(model, input_ids, policy)
        if bits == 4:
            torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        else:  # LLM.int8 also rounds activations
            assert ((actual - expected).abs().max() / expected.abs().max()).item() < 0.05, policy
        generated = model.generate(input_ids, max_new_tokens=4, do_sample=False, exit_policy=policy)
        assert generated.shape == (2, 14) and torch.equal(generated[:, 10], actual[:, -1].argmax(-1))

    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    for policy in POLICIES:
        torch.testing.assert_close(_logits(reloaded, input_ids, policy), _logits(model, input_ids, policy),
                                   atol=1e-6, rtol=1e-6)


def test_plain_bitsandbytes_4bit_loads_and_generates(folder):
    """The transformers spelling (no lightarch helper) also works; it quantizes the estimator too."""
    pytest.importorskip("bitsandbytes")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert type(model.model.estimator.token_proj).__name__ == "Linear4bit"
    out = model.generate(torch.randint(3, 259, (1, 6)), max_new_tokens=3, do_sample=False, exit_policy="estimator")
    assert out.shape == (1, 9)


def test_bad_bitsandbytes_request_for_the_adaptive_model():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="leaves no nn.Linear layer to quantize"):
        bnb_quantization_config(tiny_adaptive_config(), bits=4, skip_modules=["model.layers"])


def test_lora_adapts_the_decoder_not_the_estimator_and_merging_changes_nothing():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = AdaptiveDepthForCausalLM(tiny_adaptive_config()).eval()
    input_ids = torch.randint(3, 259, (2, 10))
    base = {policy: _logits(model, input_ids, policy) for policy in POLICIES}
    peft_model = peft.get_peft_model(model, lora_config(r=2, init_lora_weights=False)).eval()
    adapted = {n for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert adapted and not any("estimator" in n or "mlp.gate." in n for n in adapted)
    assert any("mlp.experts" in n for n in adapted) and any("self_attn.q_proj" in n for n in adapted)
    check_lora_targets(peft_model)
    unmerged = {policy: _logits(peft_model, input_ids, policy) for policy in POLICIES}
    assert not torch.allclose(unmerged["full"], base["full"], atol=1e-3)  # the adapter does something
    merged = peft_model.merge_and_unload()
    assert type(merged) is AdaptiveDepthForCausalLM
    for policy in POLICIES:
        torch.testing.assert_close(_logits(merged, input_ids, policy), unmerged[policy], atol=1e-5, rtol=1e-5)


def test_onnx_export_of_the_full_depth_path_matches_torch(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from lightarch.deploy.onnx import OrtDecoder, export_onnx_decoder

    torch.manual_seed(0)
    # Two layers (a dense sliding one, an MoE full one) keep the export short; every block kind is still there.
    config = tiny_adaptive_config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                  exit_layers=[1, 2])
    model = AdaptiveDepthForCausalLM(config).eval()
    export_onnx_decoder(model, tmp_path / "model.onnx")
    decoder = OrtDecoder(tmp_path / "model.onnx", num_threads=1)
    input_ids = torch.randint(3, 259, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask, exit_policy="full").logits
    actual = decoder.logits(input_ids.numpy(), attention_mask.numpy())
    np.testing.assert_allclose(actual[attention_mask.bool().numpy()], expected[attention_mask.bool()].numpy(),
                               atol=1e-4)
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                               exit_policy="full")
    np.testing.assert_array_equal(
        decoder.generate(input_ids.numpy(), attention_mask.numpy(), max_new_tokens=6), generated.numpy())


def test_onnx_export_refuses_run_time_exit_policies(tmp_path):
    from lightarch.deploy.onnx import export_onnx_folder  # what scripts/export_onnx.py runs

    folder = save_tiny_adaptive_model(tmp_path / "model", exit_policy="estimator")
    with pytest.raises(ValueError, match="exit_policy='estimator': the ONNX export is a fixed-depth decoding step"):
        export_onnx_folder(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
