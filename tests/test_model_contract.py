"""transformers' model contract: what any PreTrainedModel user may call works on lightarch's models too."""

import json

import pytest
import torch
from conftest import run_without_lightarch, tiny_sparse_moe_config
from test_adaptive_depth import tiny_config as tiny_adaptive_config
from test_multimodal import tiny_config as tiny_multimodal_config

from lightarch import AdaptiveDepthForCausalLM, MultiModalForConditionalGeneration, SparseMoeForCausalLM


# -- resize_token_embeddings --
@pytest.mark.parametrize("model_class, make_config", [(SparseMoeForCausalLM, tiny_sparse_moe_config),
                                                       (AdaptiveDepthForCausalLM, tiny_adaptive_config)])
def test_resize_token_embeddings_then_forward_with_a_new_token(model_class, make_config):
    model = model_class(make_config()).eval()
    old_vocab = model.config.vocab_size
    model.resize_token_embeddings(old_vocab + 3, mean_resizing=False)
    ids = torch.tensor([[5, old_vocab, old_vocab + 2]])
    out = model(ids, labels=ids)
    assert out.logits.shape == (1, 3, old_vocab + 3) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=rf"token id {old_vocab + 3}, outside the vocabulary \[0, {old_vocab + 2}\]"):
        model(torch.tensor([[5, old_vocab + 3]]))


def test_multimodal_output_embeddings_delegate_to_the_decoder_and_resize():
    model = MultiModalForConditionalGeneration(tiny_multimodal_config()).eval()
    decoder = model.model.decoder
    assert model.get_output_embeddings() is decoder.get_output_embeddings()
    head = torch.nn.Linear(decoder.config.hidden_size, decoder.config.vocab_size, bias=False)
    model.set_output_embeddings(head)
    assert decoder.get_output_embeddings() is head
    old_vocab = decoder.config.vocab_size
    model.resize_token_embeddings(old_vocab + 2, mean_resizing=False)
    assert model.get_output_embeddings().weight.shape[0] == model.get_input_embeddings().weight.shape[0] == old_vocab + 2
    ids = torch.tensor([[5, old_vocab + 1]])
    assert model(input_ids=ids).logits.shape == (1, 2, old_vocab + 2)


# -- RoPE scaling extends the usable length --
@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_scaled_rope_accepts_factor_times_max_position_embeddings(rope_type):
    config = tiny_sparse_moe_config(max_position_embeddings=16,
                                    rope_parameters={"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0})
    model = SparseMoeForCausalLM(config).eval()
    logits = model(torch.randint(3, 97, (1, 32))).logits  # twice the pretraining length
    assert logits.shape == (1, 32, 97) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match=rf"max_position_embeddings is 16 and its {rope_type} RoPE scaling "
                                         r"\(factor 2.0\) covers 32"):
        model(torch.randint(3, 97, (1, 33)))


def test_unscaled_rope_still_refuses_past_max_position_embeddings():
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match=r"reaches 17 tokens .* config.max_position_embeddings is 16\. Truncate"):
        model(torch.randint(3, 97, (1, 17)))


# -- parallel plans match the parameters --
def _plan_entries_matching_nothing(model, plan):
    """transformers' test_tp_plan_matches_params: each entry names a parameter / buffer, or the module holding one."""
    from transformers.distributed.parallel_utils import _get_parameter_plan

    params = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    modules = {n for n, _ in model.named_modules()}
    return {pattern for pattern in plan
            if not any(_get_parameter_plan(p, {pattern: ""}) is not None for p in params)
            and not any(_get_parameter_plan(m, {pattern: ""}, is_weight=False) is not None for m in modules)}


@pytest.mark.parametrize("overrides", [dict(), dict(first_k_dense_layers=1, num_shared_experts=1, use_qk_norm=True),
                                       dict(num_shared_experts=2, use_qk_norm=False)])
@pytest.mark.parametrize("model_class", [SparseMoeForCausalLM, AdaptiveDepthForCausalLM])
def test_parallel_plans_match_the_parameters(model_class, overrides):
    config = (tiny_sparse_moe_config if model_class is SparseMoeForCausalLM else tiny_adaptive_config)(**overrides)
    model = model_class(config)
    assert model.tp_plan and model.ep_plan
    assert _plan_entries_matching_nothing(model, model.tp_plan) == set()
    assert _plan_entries_matching_nothing(model, model.ep_plan) == set()
    from transformers.distributed.parallel_utils import _get_parameter_plan

    layer_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert layer_linears and all(_get_parameter_plan(f"{n}.weight", model.tp_plan) is not None for n in layer_linears)
    assert _get_parameter_plan("lm_head.weight", model.tp_plan) == "colwise_gather_output"
    for parameter in ("gate_up_proj", "down_proj"):  # the experts are sharded whenever the config has them
        assert _get_parameter_plan(f"model.layers.1.mlp.experts.{parameter}", model.ep_plan) == "grouped_gemm"


# -- every registered Auto class loads a saved folder as remote code --
@pytest.mark.parametrize("model_class, make_config, prefix", [
    (SparseMoeForCausalLM, tiny_sparse_moe_config, "modeling_sparse_moe.SparseMoe"),
    (AdaptiveDepthForCausalLM, tiny_adaptive_config, "modeling_adaptive_depth.AdaptiveDepth")])
def test_saved_folder_maps_every_auto_class_to_its_remote_code(tmp_path, model_class, make_config, prefix):
    folder = tmp_path / "saved"
    model_class(make_config()).save_pretrained(folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert {k: v for k, v in auto_map.items() if k != "AutoConfig"} == {
        "AutoModel": f"{prefix}Model", "AutoModelForCausalLM": f"{prefix}ForCausalLM",
        "AutoModelForSequenceClassification": f"{prefix}ForSequenceClassification"}
    run_without_lightarch(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
        ids = torch.tensor([[5, 6, 7]])
        for auto_class, output in ((AutoModel, "last_hidden_state"), (AutoModelForCausalLM, "logits"),
                                   (AutoModelForSequenceClassification, "logits")):
            model = auto_class.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            assert type(model).__name__ == {prefix.split(".")[1]!r} + {{"AutoModel": "Model"}}.get(
                auto_class.__name__, auto_class.__name__[len("AutoModel"):]), type(model).__name__
            with torch.no_grad():
                assert torch.isfinite(getattr(model(ids), output)).all()
        print("REMOTE-CODE-OK")
        """,
        tmp_path,
    )


# -- the main job's tokenizer chats --
def test_main_job_tokenizer_has_a_chat_template_and_the_server_accepts_its_folder(tmp_path):
    from lightarch.data.corpus import TextCorpus
    from lightarch.deploy.serving import check_servable_folder
    from lightarch.training.sparse_moe import prepare_data

    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(40)]
    corpus = TextCorpus(train_texts=texts, eval_texts=texts[:4], train_files=["a.py"], eval_files=["b.py"],
                        description="", short="", heldout="", dataset_type="text", dataset_name="toy")
    tokenizer = prepare_data(corpus, vocab_size=300, block_size=16).tokenizer  # trains the byte-level BPE
    messages = [{"role": "user", "content": "def f(x):"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>def f(x):\n<|assistant|>"
    config = tiny_sparse_moe_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    SparseMoeForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, served_tokenizer = check_servable_folder(str(tmp_path))  # what `serve.py --model_dir` checks first
    assert served_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
