"""The decoding path does no work nobody asked for (issue 13): no router statistics at inference without labels /
`output_router_logits` / training, and no per-token read-back of input values by the input checks; its outputs stay
bit-identical to the full path's, and training losses and router-bias updates are unchanged."""

import pytest
import torch

import lightarch.modeling_adaptive_depth as adaptive_module
import lightarch.modeling_sparse_moe as sparse_module
from conftest import tiny_sparse_moe_config
from lightarch import SparseMoeForCausalLM
from lightarch.layers import update_router_biases
from test_adaptive_depth import confident_model
from transformers import DynamicCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def build(kind: str):
    """A tiny eval-mode model of each decoding flavour; the adaptive one's LM head is scaled so exits differ."""
    if kind == "top_k":
        return SparseMoeForCausalLM(tiny_sparse_moe_config()).eval()
    if kind == "top_p_balanced":
        return SparseMoeForCausalLM(tiny_sparse_moe_config(router_mode="top_p", router_top_p=0.6,
                                                           router_bias_update_rate=0.01,
                                                           first_k_dense_layers=1)).eval()
    return confident_model(exit_policy=kind.split("_", 1)[1])


def prompt_batch():
    input_ids = torch.randint(3, 97, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding
    return input_ids, attention_mask


@pytest.fixture
def stats_calls(monkeypatch):
    """Counts `router_statistics` calls of both causal LMs."""
    calls = []
    original = sparse_module.router_statistics

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sparse_module, "router_statistics", counting)
    monkeypatch.setattr(adaptive_module, "router_statistics", counting)
    return calls


KINDS = ["top_k", "top_p_balanced", "adaptive_confidence", "adaptive_estimator"]


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_computes_no_router_statistics(kind, stats_calls):
    model = build(kind)
    input_ids, attention_mask = prompt_batch()
    with torch.no_grad():
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
        assert len(stats_calls) == 0  # neither the prompt nor any decoded token
        plain = model(input_ids, attention_mask=attention_mask)
        assert plain.aux_loss is None and plain.experts_per_token is None and plain.router_logits is None
        asked = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
        assert len(stats_calls) == 1 and asked.aux_loss is not None and asked.router_logits is not None
        labelled = model(input_ids, attention_mask=attention_mask, labels=input_ids)
        assert len(stats_calls) == 2 and labelled.aux_loss is not None
    if isinstance(model, SparseMoeForCausalLM):  # training without labels: a custom loop may add aux_loss itself
        model.train()
        assert model(input_ids, attention_mask=attention_mask).aux_loss is not None and len(stats_calls) == 3


def count_reads(monkeypatch) -> dict:
    """Counts the two value reads of the input checks: `torch.aminmax` (token ids) and `int(tensor)` (positions)."""
    counts = {"aminmax": 0, "int": 0}
    aminmax, to_int = torch.aminmax, torch.Tensor.__int__

    def counting_aminmax(*args, **kwargs):
        counts["aminmax"] += 1
        return aminmax(*args, **kwargs)

    def counting_int(self):
        counts["int"] += 1
        return to_int(self)

    monkeypatch.setattr(torch, "aminmax", counting_aminmax)
    monkeypatch.setattr(torch.Tensor, "__int__", counting_int)
    return counts


@pytest.mark.parametrize("kind", ["top_k", "adaptive_confidence"])
def test_input_checks_read_values_once_per_generate_not_per_token(kind, monkeypatch):
    model = build(kind)
    input_ids, attention_mask = prompt_batch()
    reads = []
    for new_tokens in (2, 10):
        counts = count_reads(monkeypatch)
        with torch.no_grad():
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
        reads.append(dict(counts))
        monkeypatch.undo()
    assert reads[0] == reads[1], reads  # 8 more decoded tokens, not one more read
    assert reads[0]["aminmax"] >= 1  # the prompt is still checked
    assert not sparse_module.is_decoding_own_tokens(model.model)  # nothing left behind


@pytest.mark.parametrize("kind", KINDS)
def test_generate_equals_a_manual_greedy_loop_on_the_full_path(kind):
    """Bit-identical: `generate` (no router records, no value checks per token) against a hand-written cached loop in
    which every forward runs the checks and records and reduces the router statistics (`output_router_logits`)."""
    model = build(kind)
    input_ids, attention_mask = prompt_batch()
    steps = 6
    with torch.no_grad():
        generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                                   min_new_tokens=steps, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        cache, tokens, mask, logits = DynamicCache(config=model.config), input_ids, attention_mask, []
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, extra = input_ids, {}
        for _ in range(steps):
            out = model(step_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                        output_router_logits=True, logits_to_keep=1, **extra)
            assert out.aux_loss is not None
            if getattr(out, "exit_route", None) is not None:
                extra = {"exit_route": out.exit_route}  # the prompt's route holds, as in generate
            logits.append(out.logits[:, -1])
            scores = out.logits[:, -1].clone()
            scores[:, model.config.eos_token_id] = -float("inf")  # min_new_tokens: no end of sequence
            step_ids = scores.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            position_ids = position_ids[:, -1:] + 1
    assert torch.equal(generated.sequences, tokens)
    for expected, got in zip(logits, generated.logits):
        assert torch.equal(expected, got)


def test_out_of_vocabulary_ids_are_still_refused():
    model = build("top_k")
    input_ids, attention_mask = prompt_batch()
    bad = input_ids.clone()
    bad[1, 3] = 97
    with torch.no_grad(), pytest.raises(ValueError, match="input_ids contain token id 97"):
        model.generate(bad, attention_mask=attention_mask, max_new_tokens=2)
    assert not sparse_module.is_decoding_own_tokens(model.model)
    # One token after cached ones is trusted only inside generate, for tokens the model sampled itself.
    with torch.no_grad():
        cache = model(input_ids, use_cache=True).cache
        with pytest.raises(ValueError, match="input_ids contain token id 97"):
            model(torch.tensor([[97], [5]]), cache=cache, use_cache=True)
        cache = model(input_ids, use_cache=True).cache
        with pytest.raises(ValueError, match="input_ids contain token id 97"):
            model.generate(torch.tensor([[97], [5]]), cache=cache, max_new_tokens=2)


def test_training_losses_router_records_and_bias_updates_are_unchanged():
    """Training keeps every router statistic: the loss is the LM loss plus the auxiliary terms, router logits are
    returned on request, and the bias-balancing loads are counted in training forwards only (not while decoding)."""
    model = build("top_p_balanced").train()
    input_ids, attention_mask = prompt_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    stats = sparse_module.router_statistics(out.router_logits, out.router_indices, model.config.num_experts,
                                            attention_mask)
    lm_loss = model.loss_function(logits=out.logits, labels=labels, vocab_size=model.config.vocab_size)
    torch.testing.assert_close(out.aux_loss, sparse_module.router_aux_loss(model.config, stats), rtol=0, atol=0)
    torch.testing.assert_close(out.loss, lm_loss + out.aux_loss, rtol=0, atol=0)
    out.loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0

    routers = [layer.mlp.gate for layer in model.model.layers[1:]]
    loads = torch.stack([router.tokens_per_expert.clone() for router in routers])
    assert loads.sum() > 0  # counted in the training forward
    model.eval()
    with torch.no_grad():
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(torch.stack([router.tokens_per_expert for router in routers]), loads)  # not while decoding
    assert update_router_biases(model) == len(routers)
    assert all(router.e_score_correction_bias.abs().sum() > 0 for router in routers)


@pytest.mark.parametrize("hidden, intermediate, num_experts", [(32, 16, 4), (64, 96, 8)])
def test_few_pairs_experts_equal_grouped_mm_bit_for_bit(hidden, intermediate, num_experts):
    """The decoding shortcut of `Experts.run` computes only the hit experts, with the grouped kernel's bits."""
    from lightarch.layers import Experts

    config = tiny_sparse_moe_config(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=num_experts)
    config._experts_implementation = "grouped_mm"
    experts = Experts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    for tokens, slots in ((1, 1), (1, 2), (2, 2), (1, 4), (3, 1), (5, 3)):
        hidden_states = torch.randn(tokens, hidden)
        index = torch.stack([torch.randperm(num_experts)[:slots] for _ in range(tokens)])
        index[-1, 0] = index[0, 0]  # an expert shared by two tokens when there are two
        weights = torch.rand(tokens, slots)
        with torch.no_grad():
            assert torch.equal(experts.few_pairs_forward(hidden_states, index, weights),
                               experts(hidden_states, index, weights))


def test_batch_one_decoding_takes_the_few_pairs_path(monkeypatch):
    from lightarch.layers import Experts

    calls = []
    original = Experts.few_pairs_forward
    monkeypatch.setattr(Experts, "few_pairs_forward", lambda self, *args: calls.append(1) or original(self, *args))
    model = build("top_k")
    input_ids = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        model.generate(input_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(calls) == 3 * 3  # 3 MoE layers x 3 single-token steps (the 7-token prompt takes grouped_mm)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()  # training never takes it
    assert len(calls) == 9


def test_inference_rms_norm_gives_the_training_path_bits():
    """Under no_grad a float32 RMSNorm takes torch's one-call rms_norm: the same bits as the step-by-step path."""
    from lightarch.layers import RMSNorm

    norm = RMSNorm(48, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    for shape in ((1, 1, 48), (3, 5, 48), (2, 4, 1, 48)):
        hidden_states = torch.randn(shape) * 3
        expected = norm(hidden_states)  # grad enabled: the step-by-step float32 path
        with torch.no_grad():
            assert torch.equal(norm(hidden_states), expected)


def test_few_pairs_path_leaves_hooked_experts_to_their_module_call():
    """A hook on the experts (tensor parallelism registers one that all-reduces their output) must still run."""
    model = build("top_k")
    seen = []
    handle = model.model.layers[0].mlp.experts.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        model.generate(torch.randint(3, 97, (1, 5)), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    handle.remove()
    assert len(seen) == 3  # the prompt and both decoding steps
