"""ONNX export with KV cache, ONNX Runtime generation, int8 quantization and its accuracy, bad export requests."""

import json
import subprocess

import numpy as np
import pytest
import torch
from deploy_helpers import save_tiny_model, tiny_byte_config
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from lightarch.deploy.onnx import OrtDecoder, int8_weight_types  # noqa: E402
from lightarch.data.tokenizers import byte_level_tokenizer  # noqa: E402
from conftest import run_script  # noqa: E402
from lightarch.data.corpus import ENGLISH_SAMPLE_TEXT, text_blocks  # noqa: E402

# the README's `-n 2 --dist loadgroup` runs this module on one xdist worker, so its module-scoped export runs once
pytestmark = pytest.mark.xdist_group("test_deploy_onnx")

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
    """Train a tiny model, then run scripts/export_onnx.py once, as a user runs it (fp32 + int8 + report), for every
    test here."""
    root = tmp_path_factory.mktemp("onnx")
    paragraphs = ENGLISH_SAMPLE_TEXT.split("\n")
    train_text = "\n".join(paragraphs[:-3]) * 3
    heldout = root / "heldout.txt"
    heldout.write_text("\n".join(paragraphs[-3:]) * 2)
    final_loss = _train_tiny_model(root / "model", train_text)
    result = run_export_script("--model_dir", str(root / "model"), "--output_dir", str(root / "onnx"),
                               "--heldout_file", str(heldout), "--num_prompts", "6", "--prompt_tokens", "24",
                               "--new_tokens", "8", "--perplexity_blocks", "6", "--block_size", "64", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "onnx" / "report.json").read_text())
    return root, report, final_loss


def run_export_script(*args: str, cwd) -> subprocess.CompletedProcess:
    return run_script("export_onnx", *args, cwd=cwd)


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


# The int8 checks below compare ONNX Runtime int8 with torch fp32 where the comparison is decided by the model, not by
# rounding: a near-tied top-1 flips under any quantization, and free-running greedy text diverges from the first flip
# on. Measured on this tiny model trained from 9 seeds, on an AVX-512 VNNI CPU and on an AVX2-only one (qemu -cpu
# Haswell): with uint8 weights the mean KL was 0.0001-0.0012 and no token flipped where torch's top-1 led by >= 0.25;
# with the former int8 (u8s8) weights the AVX2 CPU gave KL 0.0051-0.0191 and free-running greedy agreement of 35%-100%
# (7 of 9 seeds below 95%); uint8 weights gave 83%-100% (2 of 9 below, near-ties, the same on both CPUs).
CLEAR_MARGIN = 0.5  # logits between torch's top-1 and runner-up for a position to count as decided
MAX_MEAN_KL = 0.005  # an AVX2-only AMD EPYC gave 0.0036 (1 flip of 222 clear tokens); u8s8 on AVX2 0.0051+


def _heldout(root, tokenizer, num_prompts: int = 12, prompt_tokens: int = 24, num_blocks: int = 6,
             block_size: int = 64):
    """Held-out prompts and perplexity-style blocks (the fixture's held-out file), as torch int64 tensors."""
    from lightarch.data.corpus import heldout_token_stream

    stream = heldout_token_stream(tokenizer, [(root / "heldout.txt").read_text()])
    stride = (len(stream) - prompt_tokens) // num_prompts
    prompts = torch.tensor([stream[i * stride : i * stride + prompt_tokens] for i in range(num_prompts)])
    blocks = torch.tensor(stream[: num_blocks * block_size]).view(num_blocks, block_size)
    return prompts, blocks


def test_int8_model_is_quantized_with_weights_that_cannot_saturate(exported):
    """uint8 weights (U8U8): ONNX Runtime's x86 int8 x uint8 kernels saturate pair sums at int16 without VNNI."""
    import onnx

    root, report, final_loss = exported
    path = root / "onnx" / "model_int8.onnx"
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert int8_weight_types(onnx.load(path)) == {"uint8"}
    metadata = json.loads((root / "onnx" / "onnx_decoder.json").read_text())
    assert metadata["int8"]["file"] == "model_int8.onnx"
    assert metadata["int8"]["weights"] == "uint8" and metadata["int8"]["per_channel"] is True
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(props["lightarch.int8"])["weights"] == "uint8"
    assert report["int8_bytes"] < 0.7 * report["fp32_bytes"]  # embeddings (a Gather) stay float
    assert len(report["int8_float_nodes"]) == 2  # the router of each of the two MoE layers stays float


def test_int8_model_is_as_accurate_as_fp32_on_any_cpu(exported):
    root, report, final_loss = exported
    assert final_loss < 3.2, f"the tiny model did not learn (loss {final_loss:.2f}); the int8 checks would be vacuous"
    assert report["greedy"]["onnx_fp32"]["token_agreement"] == 1.0
    assert report["perplexity"]["onnx_fp32"] == pytest.approx(report["perplexity"]["torch_fp32"], rel=1e-5)
    # not more than 2% worse than fp32; lower is quantization noise on this tiny model (an Intel Xeon measured -2.04%),
    # bounded too, and the KL / clear-token checks below keep the int8 model close to torch everywhere
    assert -0.05 <= report["int8_perplexity_change"] <= 0.02, report["perplexity"]

    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "onnx")
    decoder = OrtDecoder(root / "onnx" / "model_int8.onnx")
    prompts, blocks = _heldout(root, tokenizer)

    # Teacher-forced next-token distributions on held-out text: the int8 model must stay close everywhere (KL) and
    # pick torch's token wherever torch's choice is clear.
    with torch.no_grad():
        expected = torch.log_softmax(model(blocks).logits.double(), dim=-1)
    actual = torch.log_softmax(torch.from_numpy(decoder.logits(blocks.numpy())).double(), dim=-1)
    mean_kl = float((expected.exp() * (expected - actual)).sum(-1).mean())
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) >= CLEAR_MARGIN
    flips = int((expected.argmax(-1) != actual.argmax(-1))[clear].sum())
    assert clear.float().mean() >= 0.5, f"only {clear.float().mean():.0%} of positions have a clear top-1"
    assert mean_kl <= MAX_MEAN_KL, f"mean KL(torch || int8) {mean_kl:.4f} (uint8 weights measured 0.0001-0.0036)"
    assert flips <= 0.01 * int(clear.sum()), f"{flips} of {int(clear.sum())} clear top-1 tokens flipped"

    # Greedy decisions: at every step of torch's greedy continuation where torch's top-1 is clear, int8 given the
    # same context must choose the same token (a free-running comparison would also count every token after a
    # legitimate near-tie flip).
    with torch.no_grad():
        generated = model.generate(prompts, max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0,
                                   output_logits=True, return_dict_in_generate=True)
    continuation = generated.sequences[:, prompts.shape[1] :]
    step_logits = torch.stack(generated.logits, dim=1).double()  # (prompts, steps, vocab)
    top2 = step_logits.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) >= CLEAR_MARGIN
    int8_logits = decoder.logits(generated.sequences.numpy())[:, prompts.shape[1] - 1 : -1]
    agree = torch.from_numpy(int8_logits.argmax(-1)) == continuation
    assert decided.float().mean() >= 1 / 3, f"only {decided.float().mean():.0%} of greedy steps are clear"
    agreement = float(agree[decided].float().mean())
    assert agreement >= 0.95, (f"int8 greedy decisions agree with torch on {agreement:.1%} of clear steps "
                               f"(free-running agreement {report['greedy']['onnx_int8']['token_agreement']:.1%})")


def test_export_refuses_options_the_model_does_not_support(tmp_path):
    from lightarch.deploy.onnx import check_export_options, export_onnx_folder

    sinks = save_tiny_model(tmp_path / "sinks", num_sink_tokens=2, layer_types=["sliding_attention"] * 3)
    result = run_export_script("--model_dir", str(sinks), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "num_sink_tokens=2: attention sinks" in errors[0]
    plain = save_tiny_model(tmp_path / "plain")
    with pytest.raises(ValueError, match="--opset 17 is not supported"):
        check_export_options(plain, opset=17)
    with pytest.raises(ValueError, match="--keep_float 'embeddings'"):
        check_export_options(plain, keep_float=["embeddings"])
    with pytest.raises(ValueError, match="--block_size 4096 exceeds max_position_embeddings"):
        check_export_options(plain, block_size=4096)
    with pytest.raises(ValueError, match="has no config.json"):
        export_onnx_folder(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_onnx_generation_refuses_more_tokens_than_positions(exported):
    root, _, _ = exported
    decoder = OrtDecoder(root / "onnx" / "model_int8.onnx")
    limit = tiny_byte_config(**OVERRIDES).max_position_embeddings
    with pytest.raises(ValueError, match=f"exceed max_position_embeddings \\({limit}\\)"):
        decoder.generate(np.full((1, limit - 4), 70), max_new_tokens=5)


@pytest.mark.parametrize("overrides", [
    dict(no_rope_layers=[1, 0]),  # iRoPE: rotary sliding layer, NoPE global layer
    dict(no_rope_layers=[1, 0], attn_temperature_tuning=True, floor_scale=2, attn_scale=0.5),  # + Llama 4 tuning
], ids=["nope", "temperature_tuning"])
def test_fp32_onnx_logits_match_torch_on_nope_layers(tmp_path, overrides):
    """The ONNX step runs each layer's own projection: no rotation on NoPE layers, their queries tuned by position."""
    from lightarch import SparseMoeForCausalLM
    from lightarch.deploy.onnx import export_onnx_decoder

    torch.manual_seed(0)
    # Two layers keep the export short; a larger init makes a wrong position encoding change the logits by ~1.
    config = tiny_byte_config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                              initializer_range=0.2, **overrides)
    model = SparseMoeForCausalLM(config).eval()
    export_onnx_decoder(model, tmp_path / "model.onnx")
    decoder = OrtDecoder(tmp_path / "model.onnx", num_threads=1)
    input_ids = torch.randint(3, 259, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding: positions count real tokens, as in generate
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits, past = decoder.step(input_ids.numpy(), attention_mask.numpy(), decoder.empty_cache(2))
    real = attention_mask.bool()
    np.testing.assert_allclose(logits[real.numpy()], expected[real].numpy(), atol=1e-4)
    # two cached decoding steps against a full torch forward
    ids, mask = input_ids, attention_mask
    for _ in range(2):
        next_ids = torch.randint(3, 259, (2, 1))
        ids, mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        logits, past = decoder.step(next_ids.numpy(), mask.numpy(), past)
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        np.testing.assert_allclose(logits, expected[:, -1:].numpy(), atol=1e-4)
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    np.testing.assert_array_equal(
        decoder.generate(input_ids.numpy(), attention_mask.numpy(), max_new_tokens=4), generated.numpy())
