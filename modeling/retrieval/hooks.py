"""Where a kNN-LM key comes from: one decoder layer's hidden states, captured by a forward hook, so that any
transformers causal LM (Llama, Mistral, GPT-2, ...) and lightarch's SparseMoe give keys without a change to their
forward.

Sites (Khandelwal et al. 2020, kNN-LM, table 5: the input of the final layer's feed-forward, after its layer norm,
retrieved best):
    "ffn_input"     the input of `layers[layer]`'s feed-forward block (a pre-hook on its `mlp`), the default;
    "layer_output"  the output of `layers[layer]` (the residual stream after the layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

KEY_SITES = ("ffn_input", "layer_output")
_LAYER_LISTS = ("layers", "h", "decoder.layers", "blocks")  # Llama / SparseMoe, GPT-2, OPT-style, others
_FFN_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")


def _attribute(module: nn.Module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (through `get_decoder()` when it has one); ValueError if none is found."""
    candidates = []
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except (AttributeError, NotImplementedError):
            pass
    candidates += [model, getattr(model, "model", None), getattr(model, "transformer", None)]
    for base in filter(None, candidates):
        for path in _LAYER_LISTS:
            layers = _attribute(base, path)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise ValueError(f"{type(model).__name__}: no decoder layer list found (looked for {', '.join(_LAYER_LISTS)} "
                     "under get_decoder(), .model and .transformer); pass a causal LM with a standard layout.")


def key_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    """The module whose input (`ffn_input`) or output (`layer_output`) is the key; errors name `layer` / `site`."""
    if site not in KEY_SITES:
        raise ValueError(f"site must be one of {KEY_SITES}, got {site!r}.")
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range for a model with {len(layers)} decoder layers "
                         f"(use 0..{len(layers) - 1} or -1 for the last).")
    block = layers[layer]
    if site == "layer_output":
        return block
    for name in _FFN_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise ValueError(f"site 'ffn_input': decoder layer {layer} ({type(block).__name__}) has no feed-forward module "
                     f"named {' / '.join(_FFN_NAMES)}; use site='layer_output'.")


@contextlib.contextmanager
def capture_keys(model: nn.Module, callback: Callable[[torch.Tensor], None], layer: int = -1,
                 site: str = "ffn_input") -> Iterator[None]:
    """Within the block, every forward of `model` calls `callback(hidden)` with the chosen hidden states,
    `(batch, seq, hidden)`, detached; the hook is removed on exit (also on an error)."""
    module = key_module(model, layer, site)

    if site == "ffn_input":
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            callback(hidden.detach())

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            callback(hidden.detach())

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
