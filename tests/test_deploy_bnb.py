"""bitsandbytes 8-bit and 4-bit on lightarch: what is quantized, forward, generate, save / reload, memory, bad configs."""

import pytest
import torch
from deploy_helpers import save_tiny_model, tiny_byte_config

from lightarch.deploy.bitsandbytes import (
    bnb_quantization_config,
    check_quantization_config,
    load_quantized,
    memory_report,
    quantizable_linears,
)
from lightarch.checkpoint_checks import disable_bnb_cpu_packing

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

OVERRIDES = dict(router_mode="top_p", num_shared_experts=1, first_k_dense_layers=1)
QUANTIZED_CLASS = {8: "Linear8bitLt", 4: "Linear4bit"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("bnb") / "fp32", **OVERRIDES)


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("bits, quant_type", [(8, None), (4, "nf4"), (4, "fp4")])
def test_quantized_load_forward_generate_save_and_reload(folder, tmp_path, bits, quant_type):
    config = tiny_byte_config(**OVERRIDES)
    fp32 = AutoModelForCausalLM.from_pretrained(folder).eval()
    quantization_config = bnb_quantization_config(config, bits=bits, quant_type=quant_type or "nf4")
    model = load_quantized(folder, quantization_config).eval()

    # What is quantized: every nn.Linear but lm_head; experts, router, embeddings stay float32.
    linears = quantizable_linears(config)
    assert {n for n, m in model.named_modules() if type(m).__name__ == QUANTIZED_CLASS[bits]} == set(linears)
    assert len(linears) == 3 * 4 + 3 + 2 * 3  # attention x3 layers, dense MLP, shared experts x2 MoE layers
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    for layer in model.model.layers[1:]:
        assert layer.mlp.gate.weight.dtype == torch.float32  # router
        assert layer.mlp.experts.gate_up_proj.dtype == torch.float32
        assert torch.equal(layer.mlp.experts.down_proj, fp32.get_submodule(f"model.layers.{layer.self_attn.layer_idx}.mlp.experts").down_proj)

    input_ids = torch.randint(3, 259, (2, 12))
    with torch.no_grad():
        expected = fp32(input_ids).logits
        logits = model(input_ids).logits
    assert torch.isfinite(logits).all()
    assert _relative_error(logits, expected) < (0.05 if bits == 8 else 0.25)
    generated = model.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 17) and torch.equal(generated[:, :12], input_ids)
    assert torch.equal(generated[:, 12], logits[:, -1].argmax(-1))

    report = memory_report(model)
    assert report["total_bytes"] >= model.get_memory_footprint()  # also counts the 4-bit scales
    assert report["fp32_bytes"] == memory_report(fp32)["total_bytes"]
    fp32_linear = memory_report(fp32)["linear"]
    assert report["linear"] == 0 and report["quantized_linear"] < fp32_linear * (0.3 if bits == 8 else 0.2)
    assert report["experts"] == memory_report(fp32)["experts"]

    # Saved after inference, reloaded without a quantization config: the same weights and logits.
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    disable_bnb_cpu_packing(reloaded)
    assert {type(m).__name__ for m in reloaded.modules()} >= {QUANTIZED_CLASS[bits]}
    saved, restored = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k].cpu(), restored[k].cpu()) for k in saved)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, logits, atol=1e-6, rtol=1e-6)


def test_plain_from_pretrained_with_bitsandbytes_config(folder):
    """The issue's spelling, without lightarch helpers, quantizes the same layers."""
    for kwargs, cls in ((dict(load_in_8bit=True), "Linear8bitLt"),
                        (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "Linear4bit")):
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**kwargs))
        names = {n for n, m in model.named_modules() if type(m).__name__ == cls}
        assert names == set(quantizable_linears(model.config))
        out = model.generate(torch.randint(3, 259, (1, 6)), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 9)


def test_bad_quantization_configs_raise_clear_errors(folder):
    config = tiny_byte_config(**OVERRIDES)
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype=torch.int8 is not supported"):
        load_quantized(folder, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.int8))
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype=torch.float64 is not supported"):
        bnb_quantization_config(config, bits=4, compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="bnb_4bit_quant_type='int4' is not supported"):
        check_quantization_config(config, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4"))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        bnb_quantization_config(config, bits=2)
    # Skipping every linear layer leaves only experts and router, which bitsandbytes cannot quantize.
    with pytest.raises(ValueError, match="routed experts .* always stay in full precision"):
        bnb_quantization_config(config, bits=4, skip_modules=["model.layers"])
    with pytest.raises(ValueError, match="'o_prj' matches no module"):
        bnb_quantization_config(config, bits=8, skip_modules=["o_prj"])
    with pytest.raises(ValueError, match="quantizes nothing"):
        check_quantization_config(config, {"quant_method": "bitsandbytes"})


def _packed_kernel_enabled(model) -> list[bool]:
    return [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]


def test_from_pretrained_switches_off_the_packed_cpu_kernel(folder, tmp_path):
    """lightarch's from_pretrained turns off bitsandbytes' AVX512-BF16 repacking; this shows what it avoids."""
    from bitsandbytes.functional import has_avx512bf16

    quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_config).eval()
    flags = _packed_kernel_enabled(model)
    assert flags and not any(flags)
    with torch.no_grad():  # tiny dims (in_features 32) run on the generic path
        assert torch.isfinite(model(torch.randint(3, 259, (1, 4))).logits).all()
    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    # With bitsandbytes' default back on, the packed kernel fails inside bitsandbytes at the first inference forward.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        with torch.no_grad():
            model(torch.randint(3, 259, (1, 4)))
    # Packable dims: inference repacks the weights in place, after which it is too late to switch paths.
    packable = save_tiny_model(tmp_path / "packable", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=128, moe_intermediate_size=64)
    model = AutoModelForCausalLM.from_pretrained(packable, quantization_config=quantization_config).eval()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(torch.randint(3, 259, (1, 4)))
    with pytest.raises(RuntimeError, match="already ran inference with bitsandbytes' packed CPU kernel"):
        disable_bnb_cpu_packing(model)
