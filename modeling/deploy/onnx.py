"""ONNX export of one decoding step with an explicit KV cache, dynamic int8 quantization (routers stay float), an
ONNX Runtime generation loop, and the checks against torch (logits, greedy agreement, perplexity)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn


ONNX_METADATA = "onnx_decoder.json"


ONNX_MODEL_TYPES = ("lightarch_sparse_moe", "lightarch_adaptive")


def check_onnx_exportable(config) -> None:
    """Raise ValueError naming the option when the ONNX decoder step cannot represent this model.

    The adaptive-depth model exports its full-depth path (`exit_policy="full"`): the graph is one fixed-depth step,
    while the estimator and confidence policies choose a depth per input / token at run time. NoPE layers
    (`no_rope_layers`) and Llama 4 temperature tuning export as they run in torch: the step calls each layer's
    `Attention.project_qkv`, with positions from the attention mask as in `generate`.
    """
    if getattr(config, "model_type", None) not in ONNX_MODEL_TYPES:
        raise ValueError(f"ONNX export supports lightarch decoders ({', '.join(ONNX_MODEL_TYPES)}), not model_type "
                         f"{config.model_type!r}.")
    policy = getattr(config, "exit_policy", "full")
    if policy != "full":
        raise ValueError(
            f"exit_policy={policy!r}: the ONNX export is a fixed-depth decoding step and cannot pick a depth at run "
            "time. Export the full-depth model (save it with config.exit_policy = 'full'); exits and the estimator "
            "stay in torch."
        )
    if getattr(config, "num_sink_tokens", 0):
        raise ValueError(
            f"num_sink_tokens={config.num_sink_tokens}: attention sinks (streaming preset) are not supported by the "
            "ONNX export; export a model without sinks."
        )
    implementation = getattr(config, "sliding_window_implementation", "windowed")
    if implementation != "windowed":
        raise ValueError(
            f"sliding_window_implementation={implementation!r} is not supported by the ONNX export (only 'windowed')."
        )
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"rope_type={rope_type!r}: the ONNX export bakes position handling for 'default' and 'linear' rotary "
            "embeddings only (dynamic / yarn / longrope rescale at run time)."
        )


class OnnxDecoderStep(nn.Module):
    """One decoding step of a lightarch SparseMoe (or the full-depth path of an adaptive-depth model), written for
    ONNX export with an explicit KV cache.

    `forward(input_ids (B, T), attention_mask (B, P + T), past_key_0, past_value_0, ...)` returns
    `(logits (B, T, V), present_key_0, present_value_0, ...)` with `past_*` of shape `(B, kv_heads, P, head_dim)` and
    `present_*` of shape `(B, kv_heads, P + T, head_dim)`. Prefill passes `P = 0`. Positions come from the mask's
    cumulative sum, so left padding works as in `generate`. Sliding-window layers keep every key and apply the window
    in the mask (the same attention as the torch model's trimmed cache).

    The routed experts run as a static loop over experts, each gathering the tokens routed to it (a data-dependent
    `NonZero`), with its own 2D weight constants: ONNX Runtime's dynamic quantization then turns every expert matmul
    into an int8 one. The router stays a float matmul.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = model.config
        check_onnx_exportable(config)
        self.model = model
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.expert_weights = nn.ModuleDict()
        for i, layer in enumerate(model.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                self.expert_weights[str(i)] = nn.ParameterList(
                    [nn.Parameter(experts.gate_up_proj[e].detach().clone(), requires_grad=False)
                     for e in range(experts.num_experts)]
                    + [nn.Parameter(experts.down_proj[e].detach().clone(), requires_grad=False)
                       for e in range(experts.num_experts)]
                )

    def _attention(self, attn, hidden, position_embeddings, positions, past_key, past_value, mask):
        from ..layers import repeat_kv

        batch, length, _ = hidden.shape
        # the layer's own projection: q / k norms, RoPE on rotary layers only, temperature tuning on NoPE layers
        query, key, value = attn.project_qkv(hidden, position_embeddings, positions)  # (B, H|Hkv, T, D)
        key = torch.cat([past_key, key], dim=2)
        value = torch.cat([past_value, value], dim=2)
        scores = torch.matmul(query, repeat_kv(key, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling
        probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(probs, repeat_kv(value, attn.num_key_value_groups)).transpose(1, 2)
        return attn.o_proj(output.reshape(batch, length, -1)), key, value  # key, value: (B, Hkv, P + T, D)

    def _moe(self, layer_idx, block, hidden):
        import torch.nn.functional as F

        batch, length, dim = hidden.shape
        flat = hidden.reshape(-1, dim)
        _, routing_weights, selected = block.gate(flat)
        weights = self.expert_weights[str(layer_idx)]
        num_experts = block.num_experts
        output = torch.zeros_like(flat)
        for e in range(num_experts):
            hit = selected == e  # (tokens, slots): at most one slot per token picks expert e
            token_weight = (routing_weights * hit.to(routing_weights.dtype)).sum(dim=-1)
            token_idx = torch.nonzero(hit.any(dim=-1)).squeeze(-1)
            gate, up = F.linear(flat[token_idx], weights[e]).chunk(2, dim=-1)
            expert_out = F.linear(block.experts.act_fn(gate) * up, weights[num_experts + e])
            output = output.index_add(0, token_idx, expert_out * token_weight[token_idx].unsqueeze(-1))
        if block.shared_experts is not None:
            output = output + block.shared_experts(flat)
        return output.reshape(batch, length, dim)

    def forward(self, input_ids, attention_mask, *past):
        decoder = self.model.model
        config = self.config
        past_length = past[0].shape[2]
        length = input_ids.shape[1]
        hidden = decoder.embed_tokens(input_ids)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0).narrow(1, past_length, length)  # (B, T)
        position_embeddings = decoder.rotary_emb(hidden, positions)  # cos, sin: (B, T, D)

        query_index = torch.arange(length, device=input_ids.device) + past_length
        key_index = torch.arange(past_length + length, device=input_ids.device)
        distance = query_index[:, None] - key_index[None, :]  # (T, P + T)
        allowed = (distance >= 0)[None, None] & attention_mask.bool()[:, None, None, :]
        minimum = torch.finfo(hidden.dtype).min
        masks = {"full_attention": torch.where(allowed, 0.0, minimum).to(hidden.dtype)}
        if config.sliding_window is not None:
            windowed = allowed & (distance < config.sliding_window)[None, None]
            masks["sliding_attention"] = torch.where(windowed, 0.0, minimum).to(hidden.dtype)

        presents = []
        for i, layer in enumerate(decoder.layers[: self.num_layers]):
            residual = hidden
            attn_out, key, value = self._attention(
                layer.self_attn, layer.input_layernorm(hidden), position_embeddings, positions, past[2 * i],
                past[2 * i + 1], masks[config.layer_types[i]],
            )
            presents += [key, value]
            hidden = residual + attn_out
            residual = hidden
            normed = layer.post_attention_layernorm(hidden)
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts"):
                hidden = residual + self._moe(i, layer.mlp, normed)
            else:
                hidden = residual + layer.mlp(normed)
        logits = self.model.lm_head(decoder.norm(hidden))
        return (logits, *presents)


def onnx_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_{i}", f"past_value_{i}"]
        outputs += [f"present_key_{i}", f"present_value_{i}"]
    return inputs, outputs


def export_onnx_decoder(model: nn.Module, path, opset: int = 18) -> dict:
    """Export `OnnxDecoderStep(model)` to `path` (one .onnx file) with dynamic batch, length and cache length.

    Writes `onnx_decoder.json` (I/O names, cache shapes, special tokens) next to it and returns that metadata.
    """
    import json
    import os
    import warnings

    config = model.config
    step = OnnxDecoderStep(model.eval()).eval()
    head_dim = config.head_dim
    kv_heads = config.num_key_value_heads
    batch, length, past_length = 2, 3, 4  # >= 2 so that torch.export keeps every axis symbolic
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, past_length + length, dtype=torch.long)
    past = [torch.zeros(batch, kv_heads, past_length, head_dim) for _ in range(2 * config.num_hidden_layers)]
    input_names, output_names = onnx_io_names(config.num_hidden_layers)
    auto = torch.export.Dim.AUTO  # torch.export infers the relations (mask length = past + new tokens)
    dynamic_shapes = {
        "input_ids": {0: auto, 1: auto},
        "attention_mask": {0: auto, 1: auto},
        "past": tuple({0: auto, 2: auto} for _ in past),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            step,
            (input_ids, attention_mask, *past),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    metadata = {
        "num_layers": config.num_hidden_layers,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "input_names": input_names,
        "output_names": output_names,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), ONNX_METADATA), "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata


INT8_METADATA_KEY = "lightarch.int8"  # metadata_props entry of model_int8.onnx (json, see quantize_onnx_int8)


def quantize_onnx_int8(fp32_path, int8_path, keep_float: Sequence[str] = ("router",),
                       per_channel: bool = True) -> list[str]:
    """Dynamic int8 quantization (uint8 weights, uint8 activations quantized at run time) with ONNX Runtime.

    Weights are stored as uint8 ("U8U8", ONNX Runtime's `weight_type=QuantType.QUInt8`), not int8: ONNX Runtime's
    x86 kernels for uint8 activations x int8 weights add each pair of neighbouring products with `vpmaddubsw`, which
    saturates at int16 (255 * 127 * 2 = 64,770 > 32,767) on every x86 CPU without VNNI (AVX2-only, and AVX-512
    without VNNI); only VNNI / AMX kernels accumulate in int32. The same int8 file therefore gave 95.1% greedy
    agreement with torch on an AVX-512 VNNI CPU and 79.7% on an AVX2 one (the realtime model; the tiny test model's
    mean KL to torch went from 0.0009 to 0.0146). uint8 weights take the U8U8 kernels, which widen both operands to
    int16 and accumulate with `vpmaddwd` in int32: no saturation on any CPU, so the exported file gives the same
    logits wherever it runs. (`reduce_range=True` also avoids the saturation, with 7-bit weights: measured 1.5x the
    KL of U8U8 and 92.7% greedy agreement instead of 96.9% on the realtime model.)

    `keep_float` names node groups left in float: `"router"` (the MoE gates: a rounding error there changes which
    experts run) and/or `"lm_head"`. `per_channel` gives every output channel its own weight scale and zero point
    (measured on the realtime model: 96.9% greedy agreement with torch fp32 instead of 86.7% per tensor). The
    setting is recorded in the int8 model's metadata (`metadata_props["lightarch.int8"]`, json) and in
    `onnx_decoder.json` (`"int8"`). Returns the names of the nodes kept in float.
    """
    import json
    import logging
    import os

    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    unknown = [k for k in keep_float if k not in ("router", "lm_head")]
    if unknown:
        raise ValueError(f"keep_float entries {unknown} are unknown; use 'router' and/or 'lm_head'.")
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    patterns = []
    if "router" in keep_float:
        patterns.append(re.compile(r"layers\.\d+\.mlp\.gate\.weight$"))
    if "lm_head" in keep_float:
        patterns.append(re.compile(r"lm_head\.weight$"))
    initializers = {init.name for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}

    def source_initializer(name: str) -> str | None:
        """The initializer a tensor comes from through Transpose / Identity / Cast nodes, if any."""
        for _ in range(8):
            if name in initializers:
                return name
            node = producers.get(name)
            if node is None or node.op_type not in ("Transpose", "Identity", "Cast") or not node.input:
                return None
            name = node.input[0]
        return None

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    keep = set()
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = source_initializer(node.input[1])
        if weight is None:
            continue  # activations times activations (attention): never quantized
        if any(p.search(weight) for p in patterns):
            keep.add(node.name)
        # Weights renamed by constant folding: a router is the weight matmul feeding a Softmax, lm_head makes logits.
        elif "router" in keep_float and "Softmax" in consumers.get(node.output[0], []):
            keep.add(node.name)
        elif "lm_head" in keep_float and node.output[0] == "logits":
            keep.add(node.name)

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(max(level, logging.WARNING))  # the quantizer logs one INFO line per activation tensor
    try:
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            weight_type=QuantType.QUInt8,  # U8U8: never saturates (see the docstring); QInt8 does on non-VNNI x86
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=sorted(keep),
            per_channel=per_channel,
            reduce_range=False,  # 8-bit weights: reduce_range only exists to dodge the U8S8 saturation
        )
    finally:
        root_logger.setLevel(level)

    setting = {"format": "dynamic (MatMulInteger)", "weights": "uint8", "activations": "uint8",
               "per_channel": per_channel, "reduce_range": False, "keep_float": list(keep_float),
               "float_nodes": sorted(keep), "onnxruntime": onnxruntime.__version__}
    model = onnx.load(str(int8_path), load_external_data=False)
    weights = int8_weight_types(model)
    if weights != {"uint8"}:  # a quantizer change that brings int8 weights back would bring the saturation back
        raise RuntimeError(f"The int8 model has {sorted(weights)} matmul weights; expected only uint8.")
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        INT8_METADATA_KEY: json.dumps(setting)})
    onnx.save(model, str(int8_path))
    metadata_path = os.path.join(os.path.dirname(os.path.abspath(int8_path)), ONNX_METADATA)
    if os.path.isfile(metadata_path):  # written by export_onnx_decoder next to the fp32 model
        with open(metadata_path) as f:
            metadata = json.load(f)
        metadata["int8"] = {"file": os.path.basename(str(int8_path)), **setting}
        with open(metadata_path, "w") as f:
            json.dump(metadata, f, indent=2)
    return sorted(keep)


def int8_weight_types(model) -> set[str]:
    """Element types ('uint8' / 'int8') of the constant B inputs of a quantized model's integer matmuls."""
    import onnx

    dtypes = {init.name: init.data_type for init in model.graph.initializer}
    names = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}
    found = set()
    for node in model.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") and len(node.input) > 1:
            if node.input[1] in dtypes:
                found.add(names.get(dtypes[node.input[1]], str(dtypes[node.input[1]])))
    return found


class OrtDecoder:
    """Runs an ONNX decoder step exported by `export_onnx_decoder` in ONNX Runtime, with a greedy generation loop."""

    def __init__(self, path, num_threads: int = 0) -> None:
        import json
        import os

        import onnxruntime as ort

        metadata_path = os.path.join(os.path.dirname(os.path.abspath(path)), ONNX_METADATA)
        if not os.path.isfile(metadata_path):
            raise FileNotFoundError(f"{metadata_path} is missing; export with lightarch.deploy.export_onnx_decoder.")
        with open(metadata_path) as f:
            self.metadata = json.load(f)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # int8 (u8s8) files from older exports saturate on x86 without VNNI; this makes ONNX Runtime run them with its
        # exact u8u8 kernels. It changes nothing for the uint8 weights quantize_onnx_int8 writes now.
        options.add_session_config_entry("session.x64quantprecision", "1")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.num_layers = self.metadata["num_layers"]

    def empty_cache(self, batch_size: int) -> list:
        import numpy as np

        shape = (batch_size, self.metadata["num_key_value_heads"], 0, self.metadata["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers)]

    def _checked_inputs(self, input_ids, attention_mask, past_length: int, caller: str):
        """(ids, mask) as int64 arrays, with the torch model's checks: a one-line error naming the argument for a wrong
        rank, dtype, size, token id or length, before ONNX Runtime (or numpy) fails on it or silently wraps -1."""
        import numpy as np

        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"{caller}: input_ids must have shape (batch_size, sequence_length), got "
                             f"{input_ids.shape}.")
        if not (np.issubdtype(input_ids.dtype, np.integer) and input_ids.dtype != np.bool_):
            raise ValueError(f"{caller}: input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise ValueError(f"{caller}: input_ids is empty (batch_size, sequence_length) = {input_ids.shape}; give "
                             "at least one sequence of at least one token.")
        vocab_size = self.metadata["vocab_size"]
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{caller}: input_ids contain token id {low if low < 0 else high}, outside the vocabulary "
                             f"[0, {vocab_size - 1}].")
        total = past_length + length
        if attention_mask is None:
            attention_mask = np.ones((batch, total), dtype=np.int64)
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != (batch, total):
            raise ValueError(f"{caller}: attention_mask has shape {attention_mask.shape} but the input needs "
                             f"({batch}, {total}): batch size x (cached tokens {past_length} + new tokens {length}).")
        limit = self.metadata["max_position_embeddings"]
        if total > limit:
            raise ValueError(f"{caller}: the sequence reaches {total} tokens (cached {past_length} + new {length}) but "
                             f"max_position_embeddings is {limit}; truncate the input.")
        return (np.ascontiguousarray(input_ids, dtype=np.int64), np.ascontiguousarray(attention_mask, dtype=np.int64))

    def step(self, input_ids, attention_mask, past):
        """One forward: numpy int64 ids (B, T), mask (B, P + T), 2 * layers past arrays -> (logits, presents)."""
        if len(past) != 2 * self.num_layers:
            raise ValueError(f"step: past has {len(past)} arrays but the model needs 2 x {self.num_layers} layers "
                             "(use empty_cache(batch_size) for the first step).")
        input_ids, attention_mask = self._checked_inputs(input_ids, attention_mask, past[0].shape[2], "step")
        return self._run(input_ids, attention_mask, past)

    def _run(self, input_ids, attention_mask, past):
        """`step` without the checks, for inputs already checked (generate's own decoding steps)."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        for i in range(self.num_layers):
            feed[f"past_key_{i}"] = past[2 * i]
            feed[f"past_value_{i}"] = past[2 * i + 1]
        outputs = self.session.run(None, feed)
        return outputs[0], outputs[1:]

    def logits(self, input_ids, attention_mask=None):
        """Full-sequence logits (B, T, V) for numpy or torch inputs, like `model(input_ids).logits`."""
        input_ids, attention_mask = self._checked_inputs(input_ids, attention_mask, 0, "logits")
        logits, _ = self._run(input_ids, attention_mask, self.empty_cache(input_ids.shape[0]))
        return logits

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 16, eos_token_id=None):
        """Greedy generation with the KV cache; returns (B, T + new) int64, finished rows padded with pad_token_id.

        Stops early when every row has produced `eos_token_id` (default: the model's; pass -1 to never stop).
        """
        import numpy as np

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
        input_ids, attention_mask = self._checked_inputs(input_ids, attention_mask, 0, "generate")
        batch, length = input_ids.shape
        if length + max_new_tokens > self.metadata["max_position_embeddings"]:
            raise ValueError(
                f"{length} prompt tokens + {max_new_tokens} new tokens exceed max_position_embeddings "
                f"({self.metadata['max_position_embeddings']})."
            )
        eos = self.metadata["eos_token_id"] if eos_token_id is None else eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None, -1}
        pad = self.metadata["pad_token_id"] if self.metadata["pad_token_id"] is not None else 0
        logits, past = self._run(input_ids, attention_mask, self.empty_cache(batch))
        finished = np.zeros(batch, dtype=bool)
        tokens = []
        for step in range(max_new_tokens):
            next_tokens = logits[:, -1].argmax(-1).astype(np.int64)
            next_tokens = np.where(finished, pad, next_tokens)
            tokens.append(next_tokens)
            finished |= np.isin(next_tokens, list(eos)) if eos else False
            if finished.all() or step == max_new_tokens - 1:
                break
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), np.int64)], axis=1)
            logits, past = self._run(next_tokens[:, None], attention_mask, past)  # argmax ids: in the vocabulary
        return np.concatenate([input_ids, np.stack(tokens, axis=1)], axis=1)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, (B, T): what `generate` passes for a left-padded batch."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def compare_onnx_with_torch(model, decoder: OrtDecoder, vocab_size: int, seed: int = 0) -> float:
    """Max |logits| difference between ONNX Runtime and torch: a left-padded batch, then 3 cached decode steps."""
    import numpy as np

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    with torch.no_grad():
        # positions count real tokens only, as in `generate` and the exported step (left padding shifts nothing)
        expected = model(input_ids, attention_mask=attention_mask,
                         position_ids=_positions(attention_mask)).logits.numpy()
    logits, past = decoder.step(input_ids.numpy(), attention_mask.numpy(), decoder.empty_cache(2))
    real = attention_mask.numpy().astype(bool)
    worst = float(np.abs(logits - expected)[real].max())
    ids, mask = input_ids, attention_mask
    for _ in range(3):  # incremental steps through the exported cache against a full torch forward
        next_ids = torch.randint(3, vocab_size, (2, 1), generator=generator)
        ids = torch.cat([ids, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        logits, past = decoder.step(next_ids.numpy(), mask.numpy(), past)
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1:].numpy()
        worst = max(worst, float(np.abs(logits - expected).max()))
    return worst


def greedy_agreement(model, decoder: OrtDecoder, prompts: torch.Tensor, max_new_tokens: int) -> dict:
    """Fraction of greedy tokens (position by position) where ONNX Runtime agrees with torch, prompt by prompt."""
    import numpy as np

    agree = total = exact = 0
    for prompt in prompts:
        prompt = prompt[None]
        expected = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)[0, prompt.shape[1]:].numpy()  # -1: never stop early
        actual = decoder.generate(prompt.numpy(), max_new_tokens=max_new_tokens, eos_token_id=-1)[0, prompt.shape[1]:]
        agree += int((expected == actual).sum())
        total += len(expected)
        exact += int(np.array_equal(expected, actual))
    return {"token_agreement": agree / total, "identical_continuations": exact, "prompts": len(prompts),
            "tokens": total}


def onnx_perplexity(decoder: OrtDecoder, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Like `perplexity`, with the logits from ONNX Runtime."""
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        logits = torch.from_numpy(decoder.logits(batch.numpy())).float()
        total += nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    return math.exp(total / max(count, 1))


EXPORT_SCRIPT = "export_onnx.py"  # the writer named in the output folder's marker (`check_output_dir`)


def check_export_options(model_dir, opset: int = 18, keep_float: Sequence[str] = ("router",), num_prompts: int = 24,
                         prompt_tokens: int = 32, new_tokens: int = 16, perplexity_blocks: int = 32,
                         block_size: int = 128, output_dir=None):
    """The config of the model `export_onnx_folder` would export; ValueError naming the option when it cannot
    (no model, an opset or keep_float entry the export does not know, prompts or blocks longer than the model's
    positions, or a model the decoder step cannot represent: `check_onnx_exportable`; an `output_dir` that is not
    empty or an earlier export, or that is `model_dir`: `lightarch.training.checkpoints.check_output_dir`)."""
    import os

    from transformers import AutoConfig

    from ..training.checkpoints import check_output_dir

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model_dir {model_dir} has no config.json; train or save a model there first.")
    if output_dir is not None:
        check_output_dir(output_dir, EXPORT_SCRIPT, inputs={"--model_dir": model_dir})
    if opset < 18:
        raise ValueError(f"--opset {opset} is not supported: the exporter needs opset >= 18.")
    unknown = [k for k in keep_float if k not in ("router", "lm_head")]
    if unknown:
        raise ValueError(f"--keep_float {','.join(keep_float)!r}: use a comma-separated subset of 'router', "
                         "'lm_head'.")
    for name, value in (("num_prompts", num_prompts), ("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens),
                        ("perplexity_blocks", perplexity_blocks), ("block_size", block_size)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    config = AutoConfig.from_pretrained(model_dir)
    check_onnx_exportable(config)
    if prompt_tokens + new_tokens > config.max_position_embeddings:
        raise ValueError(f"--prompt_tokens + --new_tokens exceed the model's max_position_embeddings "
                         f"({config.max_position_embeddings}).")
    if block_size > config.max_position_embeddings:
        raise ValueError(f"--block_size {block_size} exceeds max_position_embeddings "
                         f"({config.max_position_embeddings}).")
    return config


def export_onnx_folder(
    model_dir,
    output_dir,
    opset: int = 18,
    int8: bool = True,
    keep_float: Sequence[str] = ("router",),
    per_channel: bool = True,
    heldout_file=None,
    num_prompts: int = 24,
    prompt_tokens: int = 32,
    new_tokens: int = 16,
    perplexity_blocks: int = 32,
    block_size: int = 128,
    fp32_tolerance: float = 1e-4,
    num_threads: int = 0,
    check: bool = True,
) -> dict:
    """Export the saved lightarch decoder in `model_dir` to `output_dir` (`scripts/export_onnx.py`), atomically.

    Writes model.onnx (`export_onnx_decoder`), with `int8` model_int8.onnx (`quantize_onnx_int8`, `keep_float` node
    groups left float), onnx_decoder.json, the tokenizer and config.json, and report.json / report.md. With `check`:
    the fp32 graph's max |logits - torch| (a RuntimeError above `fp32_tolerance`: the export is wrong for this
    model), greedy agreement with torch fp32 on `num_prompts` held-out prompts of `prompt_tokens` tokens
    (`new_tokens` generated), and held-out perplexity on `perplexity_blocks` blocks of `block_size` tokens; held-out
    text from `heldout_file`, else `lightarch.data.corpus.heldout_texts(model_dir)`. Returns the report.
    """
    arguments = dict(locals())  # recorded in report.json
    import os
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..training.checkpoints import replace_output_dir, staging_dir

    keep_float = list(keep_float)
    arguments = {k: str(v) if isinstance(v, os.PathLike) else v
                 for k, v in {**arguments, "keep_float": keep_float}.items()}
    check_export_options(model_dir, opset, keep_float, num_prompts, prompt_tokens, new_tokens, perplexity_blocks,
                         block_size, output_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    output_dir = Path(output_dir)
    staging = staging_dir(output_dir)
    try:
        report = _export_into(staging, model, tokenizer, model_dir, heldout_file, arguments, opset, int8, keep_float,
                              per_channel, num_prompts, prompt_tokens, new_tokens, perplexity_blocks, block_size,
                              fp32_tolerance, num_threads, check)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_output_dir(staging, output_dir, EXPORT_SCRIPT, keep=())
    return report


def _export_into(staging, model, tokenizer, model_dir, heldout_file, arguments, opset, int8, keep_float,
                 per_channel, num_prompts, prompt_tokens, new_tokens, perplexity_blocks, block_size, fp32_tolerance,
                 num_threads, check) -> dict:
    """The files and checks of `export_onnx_folder`, written into `staging`; returns the report."""
    import json
    import time

    from ..data.corpus import heldout_texts, heldout_token_stream
    from ..evaluation.perplexity import perplexity
    from ..training.checkpoints import write_atomically

    start = time.perf_counter()
    export_onnx_decoder(model, staging / "model.onnx", opset=opset)
    export_seconds = time.perf_counter() - start
    kept = (quantize_onnx_int8(staging / "model.onnx", staging / "model_int8.onnx", keep_float, per_channel)
            if int8 else [])
    tokenizer.save_pretrained(staging)
    model.config.save_pretrained(staging)

    report = {"args": arguments, "export_seconds": export_seconds, "int8_float_nodes": kept,
              "fp32_bytes": (staging / "model.onnx").stat().st_size}
    if int8:
        report["int8_bytes"] = (staging / "model_int8.onnx").stat().st_size
    if check:
        fp32 = OrtDecoder(staging / "model.onnx", num_threads)
        diff = compare_onnx_with_torch(model, fp32, model.config.vocab_size)
        report["fp32_max_abs_logit_diff"] = diff
        if diff > fp32_tolerance:
            raise RuntimeError(f"ONNX fp32 logits differ from torch by {diff:.3g} > --fp32_tolerance "
                               f"{fp32_tolerance}; the export is wrong for this model.")
        texts, source = heldout_texts(model_dir, heldout_file)
        stream = heldout_token_stream(tokenizer, texts)
        need = num_prompts * prompt_tokens
        if len(stream) < need:
            raise ValueError(f"The held-out text has {len(stream)} tokens; {need} are needed for the prompts "
                             "(--num_prompts x --prompt_tokens).")
        stride = max(prompt_tokens, (len(stream) - prompt_tokens) // num_prompts)
        prompts = torch.tensor([stream[i * stride : i * stride + prompt_tokens] for i in range(num_prompts)])
        num_blocks = min(perplexity_blocks, len(stream) // block_size)
        blocks = torch.tensor(stream[: num_blocks * block_size]).view(num_blocks, block_size)
        report["heldout"] = {"source": source, "tokens": len(stream), "prompts": num_prompts,
                             "perplexity_blocks": num_blocks, "block_size": block_size}
        report["perplexity"] = {"torch_fp32": perplexity(model, blocks), "onnx_fp32": onnx_perplexity(fp32, blocks)}
        report["greedy"] = {"onnx_fp32": greedy_agreement(model, fp32, prompts, new_tokens)}
        if int8:
            int8_decoder = OrtDecoder(staging / "model_int8.onnx", num_threads)
            report["perplexity"]["onnx_int8"] = onnx_perplexity(int8_decoder, blocks)
            report["greedy"]["onnx_int8"] = greedy_agreement(model, int8_decoder, prompts, new_tokens)
            report["int8_perplexity_change"] = report["perplexity"]["onnx_int8"] / report["perplexity"]["torch_fp32"] - 1
    write_atomically(staging / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomically(staging / "report.md", render_onnx_report(report))
    return report


def render_onnx_report(report: dict) -> str:
    """report.md of `export_onnx_folder`: sizes, fp32 logit difference, perplexities, greedy agreement."""
    lines = ["# ONNX export", "", "| check | value |", "|---|---|",
             f"| export time | {report['export_seconds']:.1f} s |",
             f"| model.onnx | {report['fp32_bytes'] / 2**20:.2f} MB |"]
    if "int8_bytes" in report:
        lines.append(f"| model_int8.onnx | {report['int8_bytes'] / 2**20:.2f} MB "
                     f"(float nodes kept: {len(report['int8_float_nodes'])}) |")
    if "fp32_max_abs_logit_diff" in report:
        lines.append(f"| fp32 max abs logit diff vs torch | {report['fp32_max_abs_logit_diff']:.2e} |")
        for name, ppl in report["perplexity"].items():
            lines.append(f"| held-out perplexity, {name} | {ppl:.4f} |")
        for name, g in report["greedy"].items():
            lines.append(f"| greedy token agreement with torch fp32, {name} | {g['token_agreement']:.1%} "
                         f"({g['identical_continuations']}/{g['prompts']} continuations identical) |")
        if "int8_perplexity_change" in report:
            lines.append(f"| int8 perplexity change vs torch fp32 | {report['int8_perplexity_change']:+.2%} |")
        lines += ["", f"Held-out data: {report['heldout']['source']}."]
    return "\n".join(lines) + "\n"
