"""ONNX export with KV cache, ONNX Runtime generation, int8 quantization and its accuracy, bad export requests."""

import json

import numpy as np
import pytest
import torch
from deploy_helpers import save_tiny_model, tiny_byte_config
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from lightarch.deploy.onnx import OrtDecoder  # noqa: E402
from lightarch.data.tokenizers import byte_level_tokenizer  # noqa: E402
from lightarch.data.corpus import text_blocks  # noqa: E402

# A dense sliding layer then two MoE layers (full, sliding): every kind of block the export handles.
OVERRIDES = dict(router_mode="top_p", router_top_p=0.7, num_shared_experts=1, first_k_dense_layers=1,
                 hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                 moe_intermediate_size=32)


def _train_tiny_model(folder, text: str, steps: int = 120):
    """A few seconds of Adam on byte-level text: peaked logits make the int8 checks meaningful.

    One thread, so the trained weights do not depend on the machine's core count. At 60 steps (loss 2.57) one of the
    six greedy int8 continuations still flipped a near-tie; at 100-150 steps all agree, on one or two threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(folder, text, steps)
    finally:
        torch.set_num_threads(threads)


def _train(folder, text: str, steps: int) -> float:
    save_tiny_model(folder, **OVERRIDES)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = byte_level_tokenizer()
    blocks = text_blocks(tokenizer, text, 48)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (8,), generator=generator)]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    return loss.item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Train a tiny model, then run scripts/export_onnx.py once (fp32 + int8 + report) for every test here."""
    from scripts.finetune_lora import EMBEDDED_CORPUS

    from scripts.export_onnx import main

    root = tmp_path_factory.mktemp("onnx")
    paragraphs = EMBEDDED_CORPUS.split("\n")
    train_text = "\n".join(paragraphs[:-3]) * 3
    heldout = root / "heldout.txt"
    heldout.write_text("\n".join(paragraphs[-3:]) * 2)
    final_loss = _train_tiny_model(root / "model", train_text)
    report = main(["--model_dir", str(root / "model"), "--output_dir", str(root / "onnx"),
                   "--heldout_file", str(heldout), "--num_prompts", "6", "--prompt_tokens", "24",
                   "--new_tokens", "8", "--perplexity_blocks", "6", "--block_size", "64"])
    return root, report, final_loss


def test_fp32_onnx_logits_match_torch_with_cache_and_padding(exported):
    root, report, _ = exported
    assert report["fp32_max_abs_logit_diff"] <= 1e-4
    assert json.loads((root / "onnx" / "report.json").read_text())["fp32_max_abs_logit_diff"] <= 1e-4
    assert "greedy token agreement" in (root / "onnx" / "report.md").read_text()


def test_onnx_runtime_greedy_generation_equals_torch_generate(exported):
    root, _, _ = exported
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "onnx")
    tokenizer.padding_side = "left"
    batch = tokenizer(["The lighthouse keeper", "A garden is"], return_tensors="pt", padding=True)
    expected = model.generate(**batch, max_new_tokens=10, do_sample=False)
    decoder = OrtDecoder(root / "onnx" / "model.onnx")
    actual = decoder.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), max_new_tokens=10)
    assert actual.shape == tuple(expected.shape)
    np.testing.assert_array_equal(actual, expected.numpy())


def test_int8_model_is_quantized_and_as_accurate_as_fp32(exported):
    import onnx

    root, report, final_loss = exported
    assert final_loss < 3.2, f"the tiny model did not learn (loss {final_loss:.2f}); the int8 checks would be vacuous"
    ops = {node.op_type for node in onnx.load(root / "onnx" / "model_int8.onnx").graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert report["int8_bytes"] < 0.7 * report["fp32_bytes"]  # embeddings (a Gather) stay float
    assert len(report["int8_float_nodes"]) == 2  # the router of each of the two MoE layers stays float
    assert report["greedy"]["onnx_fp32"]["token_agreement"] == 1.0
    assert report["greedy"]["onnx_int8"]["token_agreement"] >= 0.95, report["greedy"]
    assert abs(report["int8_perplexity_change"]) <= 0.02
    assert report["perplexity"]["onnx_fp32"] == pytest.approx(report["perplexity"]["torch_fp32"], rel=1e-5)


def test_export_refuses_options_the_model_does_not_support(tmp_path):
    from scripts.export_onnx import main

    sinks = save_tiny_model(tmp_path / "sinks", num_sink_tokens=2, layer_types=["sliding_attention"] * 3)
    with pytest.raises(ValueError, match="num_sink_tokens=2: attention sinks"):
        main(["--model_dir", str(sinks), "--output_dir", str(tmp_path / "out")])
    plain = save_tiny_model(tmp_path / "plain")
    with pytest.raises(ValueError, match="--opset 17 is not supported"):
        main(["--model_dir", str(plain), "--opset", "17"])
    with pytest.raises(ValueError, match="--keep_float 'embeddings'"):
        main(["--model_dir", str(plain), "--keep_float", "embeddings"])
    with pytest.raises(ValueError, match="has no config.json"):
        main(["--model_dir", str(tmp_path / "missing")])
    assert not (tmp_path / "out").exists()


def test_onnx_generation_refuses_more_tokens_than_positions(exported):
    root, _, _ = exported
    decoder = OrtDecoder(root / "onnx" / "model_int8.onnx")
    limit = tiny_byte_config(**OVERRIDES).max_position_embeddings
    with pytest.raises(ValueError, match=f"exceed max_position_embeddings \\({limit}\\)"):
        decoder.generate(np.full((1, limit - 4), 70), max_new_tokens=5)
