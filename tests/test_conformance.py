"""transformers' common model checks, run on every lightarch text model class.

What ModelTesterMixin / GenerationTesterMixin (transformers 5.24) check and a user relies on: save/load, tuple vs dict
outputs, attention and hidden-state outputs, eager == sdpa, left padding, resized embeddings, gradient checkpointing,
RoPE scaling, and generation (greedy, sampling, beam, assisted, cache continuation, inputs_embeds, static cache).
Each check runs on SparseMoe with top-k and top-p routing, on the `hybrid-long` preset's shape (5 sliding : 1 global
layers, chunked prefill), on the adaptive-depth model at full depth, and on its per-token early exit (CALM), where a
check that needs a head or is about depth is skipped with the reason.
"""

import copy

import pytest
import torch
from conftest import tiny_sparse_moe_config
from test_adaptive_depth import tiny_config as tiny_adaptive_config

from lightarch import (
    AdaptiveDepthForCausalLM,
    AdaptiveDepthForSequenceClassification,
    AdaptiveDepthModel,
    SparseMoeConfig,
    SparseMoeForCausalLM,
    SparseMoeForSequenceClassification,
    SparseMoeModel,
)

VOCAB = 97  # every config below keeps the conftest vocabulary; ids 0 / 1 / 2 are pad / bos / eos
PROMPT = 9  # generation prompts: longer than the sliding window (4) and the hybrid preset's prefill chunk (8)
ATOL = 1e-5  # transformers' fp32 CPU tolerances are 1e-6 / 1e-4 (eager vs sdpa); a few 1e-6 ulps add up over layers


def hybrid_long_shape(**overrides) -> SparseMoeConfig:
    """The `hybrid-long` preset at tiny width: 5 sliding : 1 global layers, top-p routing, chunked prefill (chunks of
    8, so the 12-token test inputs prefill in two chunks)."""
    tiny = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
                num_key_value_heads=2, num_experts=4, sliding_window=4, prefill_chunk_size=8, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    return SparseMoeConfig.from_preset("hybrid-long", **{**tiny, **overrides})


CONFIGS = {
    "moe-top-k": lambda **o: tiny_sparse_moe_config(**{"router_mode": "top_k", **o}),
    "moe-top-p": lambda **o: tiny_sparse_moe_config(**{"router_mode": "top_p", "router_top_p": 0.5, **o}),
    "moe-hybrid-long": hybrid_long_shape,
    "adaptive": lambda **o: tiny_adaptive_config(**{"exit_policy": "full", **o}),
    # per-token early exit (CALM) with a head sharp enough that tokens leave at every exit (see `make_model`)
    "adaptive-confidence": lambda **o: tiny_adaptive_config(**{"exit_policy": "confidence", "confidence_threshold": 0.2,
                                                               **o}),
}
CLASSES = {
    "moe": (SparseMoeModel, SparseMoeForCausalLM, SparseMoeForSequenceClassification),
    "adaptive": (AdaptiveDepthModel, AdaptiveDepthForCausalLM, AdaptiveDepthForSequenceClassification),
}


def _classes(name: str) -> tuple:
    return CLASSES["adaptive" if name.startswith("adaptive") else "moe"]


def skip_if_early_exits(name: str, model_class=None, reason: str | None = None) -> None:
    """Skip a check that does not apply under the per-token early-exit policy (it needs a head, or is about depth)."""
    if name != "adaptive-confidence":
        return
    if model_class is AdaptiveDepthModel:
        pytest.skip("the confidence policy measures each exit with a head (exit_head): the base model alone has none")
    if reason is not None:
        pytest.skip(reason)


ALL_CASES = [pytest.param(name, cls, id=f"{name}-{cls.__name__}") for name in CONFIGS for cls in _classes(name)]
CAUSAL_CASES = [pytest.param(name, id=name) for name in CONFIGS]


def make_model(name: str, model_class=None, attn_implementation: str | None = None, **overrides):
    """A seeded, eval-mode tiny model (the causal LM unless `model_class` is given)."""
    model_class = model_class or _classes(name)[1]
    torch.manual_seed(0)
    config = CONFIGS[name](**overrides)
    if attn_implementation is not None:
        model = model_class._from_config(config, attn_implementation=attn_implementation).eval()
    else:
        model = model_class(config).eval()
    if name == "adaptive-confidence":  # a random head is near-uniform: sharpen it so softmax margins spread over (0, 1)
        head = getattr(model, "lm_head", None) or getattr(model, "score", None)
        if head is not None:
            with torch.no_grad():
                head.weight.mul_(40)
    return model


def inputs(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """(batch, length) ids that avoid the special ids (so no token is padding or eos)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def main_output(model, output):
    """The tensor a user reads: `logits` of the heads, `last_hidden_state` of the base model."""
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def labels_for(model, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, (SparseMoeForSequenceClassification, AdaptiveDepthForSequenceClassification)):
        return torch.arange(ids.shape[0]) % model.config.num_labels
    return ids


def assert_same_tree(a, b, atol: float = 0.0, path: str = "output") -> None:
    """Tensors (in nested tuples / lists) equal within `atol`; None matches None."""
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{path}: {type(b)} of another length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, atol, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, f"{path}: shapes differ"
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{path}: {m}")
    elif hasattr(a, "layers") and hasattr(a, "get_seq_length"):  # a Cache: compare what it holds
        assert a.get_seq_length() == b.get_seq_length(), f"{path}: cache lengths differ"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# -- ModelTesterMixin --
@pytest.mark.parametrize("name, model_class", ALL_CASES)
def test_save_load_gives_the_same_outputs(tmp_path, name, model_class):
    """test_save_load: a fresh from_pretrained of a saved model gives its outputs exactly."""
    skip_if_early_exits(name, model_class)
    model = make_model(name, model_class)
    ids = inputs()
    with torch.no_grad():
        before = main_output(model, model(ids))
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is model_class
    with torch.no_grad():
        after = main_output(loaded, loaded(ids))
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize("name, model_class", ALL_CASES)
def test_tuple_and_dict_outputs_are_equivalent(name, model_class):
    """test_model_outputs_equivalence: return_dict=False gives dict.to_tuple(), with and without optional outputs."""
    skip_if_early_exits(name, model_class)
    model = make_model(name, model_class, attn_implementation="eager")
    ids = inputs()
    for extra in ({}, {"labels": labels_for(model, ids)}, {"output_hidden_states": True},
                  {"output_attentions": True, "output_hidden_states": True}):
        with torch.no_grad():
            as_dict = model(ids, **extra)
            as_tuple = model(ids, return_dict=False, **extra)
        assert isinstance(as_tuple, tuple)
        assert_same_tree(as_tuple, as_dict.to_tuple(), path=f"return_dict=False with {sorted(extra)}")


@pytest.mark.parametrize("name, model_class", ALL_CASES)
def test_attention_and_hidden_state_outputs(name, model_class):
    """test_attention_outputs / test_hidden_states_output: one attention map per layer (batch, heads, seq, seq) under
    eager attention (transformers' test forces eager: sdpa computes no weights), num_hidden_layers + 1 hidden states
    (batch, seq, hidden), asked per call or through the config; asking for them does not change the output."""
    skip_if_early_exits(name, model_class, "a token leaves at its exit and a layer no token runs records nothing: "
                                           "fewer maps and states than layers, by design (the 'adaptive' case checks "
                                           "them at full depth)")
    model = make_model(name, model_class, attn_implementation="eager")
    config = model.config
    ids = inputs()
    batch, length = ids.shape
    with torch.no_grad():
        plain = main_output(model, model(ids))
        out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.attentions) == config.num_hidden_layers
    for attention in out.attentions:
        assert attention.shape == (batch, config.num_attention_heads, length, length)
        torch.testing.assert_close(attention.sum(-1), torch.ones(batch, config.num_attention_heads, length))
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    for hidden in out.hidden_states:
        assert hidden.shape == (batch, length, config.hidden_size)
    torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(ids))
    torch.testing.assert_close(main_output(model, out), plain, atol=ATOL, rtol=0)
    # through the config (transformers' second half of test_attention_outputs)
    config_model = copy.deepcopy(model)
    config_model.config.output_attentions = True
    config_model.config.output_hidden_states = True
    with torch.no_grad():
        out = config_model(ids)
    assert len(out.attentions) == config.num_hidden_layers and len(out.hidden_states) == config.num_hidden_layers + 1
    # a sliding layer's map is zero beyond the window
    sliding = [i for i, t in enumerate(config.layer_types) if t == "sliding_attention"]
    if sliding:
        rows = torch.arange(length)[:, None]
        outside = (rows - torch.arange(length)[None] >= config.sliding_window) | (torch.arange(length)[None] > rows)
        assert torch.all(out.attentions[sliding[0]][..., outside] == 0)


@pytest.mark.parametrize("name, model_class", ALL_CASES)
def test_eager_matches_sdpa(name, model_class):
    """test_eager_matches_sdpa_inference (fp32, with a left-padding mask): the two backends agree on real tokens."""
    skip_if_early_exits(name, model_class)
    eager = make_model(name, model_class, attn_implementation="eager")
    sdpa = make_model(name, model_class, attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    sdpa.load_state_dict(eager.state_dict())
    ids = inputs()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        a = main_output(eager, eager(ids, attention_mask=mask))
        b = main_output(sdpa, sdpa(ids, attention_mask=mask))
    if a.dim() == 3:  # per-token outputs: padding rows are undefined
        a, b = a[mask.bool()], b[mask.bool()]
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention_mask, position_ids) of rows of different lengths, positions counted per row."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


@pytest.mark.parametrize("name, model_class", ALL_CASES)
def test_left_padding_gives_the_unpadded_last_token_output(name, model_class):
    """test_left_padding_compatibility: in a left-padded batch (positions from the mask, as generate computes them)
    each row's last-token output equals that row alone, unpadded."""
    skip_if_early_exits(name, model_class)
    model = make_model(name, model_class)
    full = inputs(batch=3, length=10)
    rows = [full[0], full[1, :6], full[2, :3]]
    ids, mask, position_ids = _left_pad(rows)
    with torch.no_grad():
        batched = main_output(model, model(ids, attention_mask=mask, position_ids=position_ids))
        for i, row in enumerate(rows):
            alone = main_output(model, model(row[None]))
            last_batched = batched[i, -1] if batched.dim() == 3 else batched[i]
            last_alone = alone[0, -1] if alone.dim() == 3 else alone[0]
            torch.testing.assert_close(last_batched, last_alone, atol=ATOL, rtol=0, msg=lambda m: f"row {i}: {m}")


@pytest.mark.parametrize("name, model_class", ALL_CASES)
def test_resize_token_embeddings_then_forward_and_generate(name, model_class):
    """test_resize_tokens_embeddings: old rows kept, config.vocab_size follows, a new id runs (and generates)."""
    skip_if_early_exits(name, model_class)
    model = make_model(name, model_class)
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    assert model.config.vocab_size == VOCAB + 5
    assert model.get_input_embeddings().weight.shape == (VOCAB + 5, model.config.hidden_size)
    torch.testing.assert_close(model.get_input_embeddings().weight[:VOCAB], old)
    ids = torch.tensor([[5, VOCAB, VOCAB + 4]])
    with torch.no_grad():
        out = main_output(model, model(ids))
    assert torch.isfinite(out).all()
    if model.get_output_embeddings() is not None:
        assert out.shape == (1, 3, VOCAB + 5)
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert generated.shape[0] == 1 and int(generated.max()) < VOCAB + 5
    model.resize_token_embeddings(VOCAB - 10)  # shrinking too
    with torch.no_grad():
        assert torch.isfinite(main_output(model, model(torch.tensor([[5, VOCAB - 11]])))).all()


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name, model_class", ALL_CASES)
def test_gradient_checkpointing_gives_the_same_gradients(name, model_class, use_reentrant):
    """test_training_gradient_checkpointing: gradient_checkpointing_enable() then backward gives the gradients of the
    run without it (every parameter that gets one)."""
    skip_if_early_exits(name, model_class, "training runs every exit (labels select the full depth): the 'adaptive' "
                                           "case is this check")
    model = make_model(name, model_class).train()
    ids = inputs()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels_for(model, ids)) if model_class is not _classes(name)[0] else model(ids)
        loss = out.loss if model_class is not _classes(name)[0] else out.last_hidden_state.pow(2).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert checkpointed.keys() == reference.keys() and len(reference) > 0
    for n in reference:
        torch.testing.assert_close(checkpointed[n], reference[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_rope_scaling_runs_past_max_position_embeddings(name, rope_type):
    """test_model_rope_scaling_from_config: a scaled model accepts 1.5 x max_position_embeddings; dynamic scaling leaves
    short inputs unchanged, linear / yarn change them; long inputs differ from unscaled RoPE."""
    skip_if_early_exits(name, AdaptiveDepthModel)
    base_class = _classes(name)[0]
    short, long = inputs(1, 10), inputs(1, 24)

    def last_hidden(rope, max_positions, ids):
        model = make_model(name, base_class, max_position_embeddings=max_positions,
                           rope_parameters={**rope, "rope_theta": 10000.0})
        with torch.no_grad():
            return model(ids).last_hidden_state

    default = {"rope_type": "default"}
    scaled = {"rope_type": rope_type, "factor": 2.0}
    scaled_short, scaled_long = last_hidden(scaled, 16, short), last_hidden(scaled, 16, long)
    assert torch.isfinite(scaled_long).all()
    if rope_type == "dynamic":
        torch.testing.assert_close(scaled_short, last_hidden(default, 16, short), atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(scaled_short, last_hidden(default, 16, short), atol=1e-5)
    # the unscaled model needs a longer max_position_embeddings to take the long input (it changes no weight)
    assert not torch.allclose(scaled_long, last_hidden(default, 24, long), atol=1e-5)


# -- GenerationTesterMixin (causal LMs) --
def prompt_kwargs(model, ids: torch.Tensor, prompt_length: int) -> dict:
    """An adaptive-depth forward over a prompt and what followed it must be told which tokens are the prompt (they
    decide together, as in generate's prefill); other models take no such argument."""
    if not hasattr(model.config, "exit_layers"):
        return {}
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[:, :prompt_length] = True
    return {"prompt_mask": prompt_mask}


def greedy_reference(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full forwards without a cache, stopping at eos (batch 1)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    prompt_length = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(ids, use_cache=False, **prompt_kwargs(model, ids, prompt_length)).logits[:, -1].argmax(
                -1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            if int(next_id) in eos:
                break
    return ids


@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_greedy_sampling_and_beam_search(name):
    """Greedy equals uncached argmax decoding; seeded sampling repeats, and with top_k=1 is greedy; beam search with a
    cache equals beam search without one (the cache reorders correctly)."""
    model = make_model(name)
    ids = inputs(1, PROMPT)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy, greedy_reference(model, ids, 6))

    def sample(seed, **kwargs):
        torch.manual_seed(seed)
        return model.generate(ids, max_new_tokens=6, do_sample=True, **kwargs)

    assert torch.equal(sample(3), sample(3))
    assert torch.equal(sample(4, top_k=1), greedy)
    beams = model.generate(ids, max_new_tokens=6, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2 and torch.equal(beams[:, :PROMPT], ids.expand(2, -1))
    uncached = model.generate(ids, max_new_tokens=6, num_beams=2, num_return_sequences=2, do_sample=False,
                              use_cache=False)
    assert torch.equal(beams, uncached)


@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_assisted_decoding_equals_greedy(name):
    """Assisted generation with a smaller model of the same vocabulary: the target verifies, so the output is greedy."""
    model = make_model(name)
    small = dict(num_hidden_layers=1, layer_types=["sliding_attention"], first_k_dense_layers=0)
    if name.startswith("adaptive"):
        small.update(exit_layers=[1], estimator_input_layer=1)
    if name == "moe-hybrid-long":
        small.update(prefill_chunk_size=None)
    torch.manual_seed(1)
    assistant = type(model)(CONFIGS[name](**small)).eval()
    ids = inputs(1, PROMPT)
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_cache_continuation_equals_one_pass(name):
    """Prefill k tokens, then decode one token at a time through the cache: each step's logits equal the one-pass
    forward's at that position; and generate continued from a returned cache equals one longer generate."""
    model = make_model(name)
    ids = inputs(2, 12)
    k = 9  # above the hybrid preset's prefill chunk of 8
    with torch.no_grad():
        one_pass_output = model(ids, use_cache=False, **prompt_kwargs(model, ids, k))  # the first k: a prompt
        one_pass = one_pass_output.logits  # (2, 12, vocab)
        if name == "adaptive-confidence":  # the check is about early exits: tokens must leave before the last layer
            assert (one_pass_output.exit_layer < model.config.num_hidden_layers).float().mean() > 0.3
        out = model(ids[:, :k], use_cache=True)
        torch.testing.assert_close(out.logits, one_pass[:, :k], atol=ATOL, rtol=0)
        cache = out.cache
        for t in range(k, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            torch.testing.assert_close(out.logits[:, 0], one_pass[:, t], atol=ATOL, rtol=0,
                                       msg=lambda m: f"decode step at position {t}: {m}")
    prompt = ids[:1, :PROMPT]
    greedy = dict(do_sample=False, eos_token_id=None, pad_token_id=0)  # no early stop: both runs take 6 tokens
    first = model.generate(prompt, max_new_tokens=3, return_dict_in_generate=True, **greedy)
    continued = model.generate(first.sequences, cache=first.cache, max_new_tokens=3, **greedy)
    assert torch.equal(continued, model.generate(prompt, max_new_tokens=6, **greedy))


@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_generate_from_inputs_embeds_equals_input_ids(name):
    """generate(inputs_embeds=...) returns the new tokens only, the same as generate(input_ids) gives."""
    model = make_model(name)
    ids = inputs(1, PROMPT)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    embeds = model.get_input_embeddings()(ids).detach()
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False), greedy[:, PROMPT:])
    both = model.generate(ids, inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert torch.equal(both, greedy)


@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_static_cache_generation_equals_dynamic(name):
    """cache_implementation="static" (fixed-size cache, the compile-friendly path) generates what the dynamic cache
    generates, batch 2 with left padding included."""
    model = make_model(name)
    ids = inputs(1, PROMPT)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    static = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, greedy)
    batch, mask, _ = _left_pad([inputs(1, PROMPT + 1, seed=2)[0], inputs(1, 3, seed=3)[0]])
    dynamic = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    static = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False,
                            cache_implementation="static")
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(name):
    """Batched generation of left-padded prompts (the tokenizer's padding_side="left") gives each prompt's own greedy
    continuation: padding changes neither positions nor attention."""
    model = make_model(name)
    rows = [inputs(1, PROMPT + 1, seed=2)[0], inputs(1, 3, seed=3)[0]]
    batch, mask, _ = _left_pad(rows)
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(batched[i, -5:], alone[0, -5:]), f"row {i}"
