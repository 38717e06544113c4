"""The auxiliary-loss-free bias update is registered by the training loop: Trainer callback, optimizer hook, neither."""

import logging

import torch
from conftest import tiny_sparse_moe_config
from transformers import Trainer, TrainingArguments

import lightarch.layers
import lightarch.training.router_bias
from lightarch import SparseMoeForCausalLM
from lightarch.data.corpus import BlockDataset
from lightarch.layers import SparseMoeBlock, update_router_biases
from lightarch.training import RouterBiasUpdateCallback, register_router_bias_hook


def _balanced_block(rate: float = 0.1) -> SparseMoeBlock:
    return SparseMoeBlock(tiny_sparse_moe_config(router_bias_update_rate=rate)).train()


def _forward_backward(block: SparseMoeBlock) -> None:
    block(torch.randn(2, 5, 32)).sum().backward()  # 10 tokens x 2 experts counted


def _routers(model):
    return [layer.mlp.gate for layer in model.model.layers]


def _train(model, callbacks, steps: int = 2, accumulation: int = 1) -> None:
    blocks = torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=2, max_steps=steps,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=BlockDataset(blocks), callbacks=callbacks).train()


def test_trainer_callback_updates_every_balanced_router(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def counting_update(model):
        calls.append([router.tokens_per_expert.sum().item() for router in _routers(model)])
        return update_router_biases(model)

    monkeypatch.setattr(lightarch.training.router_bias, "update_router_biases", counting_update)
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(router_bias_update_rate=0.1))
    _train(model, [RouterBiasUpdateCallback()], steps=1, accumulation=2)
    # Once per optimizer step, with the load of both micro-batches (2 x 2 blocks x 16 tokens x 2 experts).
    assert calls == [[2 * 2 * 16 * 2] * 3]
    for router in _routers(model):
        assert router.e_score_correction_bias.abs().sum() > 0
        assert router.tokens_per_expert.sum() == 0


def test_without_callback_or_hook_no_update_happens(tmp_path, monkeypatch):
    """Documented: the bias moves only when the training loop registers the update."""
    monkeypatch.chdir(tmp_path)
    model = SparseMoeForCausalLM(tiny_sparse_moe_config(router_bias_update_rate=0.1))
    _train(model, [])
    for router in _routers(model):
        assert router.e_score_correction_bias.abs().sum() == 0
        assert router.tokens_per_expert.sum() > 0  # the load was counted, never consumed

    block = _balanced_block()
    _forward_backward(block)
    torch.optim.SGD(block.parameters(), lr=0.1).step()  # an optimizer over the router's own weight: still nothing
    assert block.gate.e_score_correction_bias.abs().sum() == 0
    assert block.gate.tokens_per_expert.sum() == 2 * 5 * 2


def test_hook_updates_with_an_optimizer_whose_parameters_are_not_the_models():
    """Engines such as FSDP / DeepSpeed / Opacus step flattened or re-created parameters: the hook must not care."""
    block = _balanced_block()
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in block.parameters()]))  # a flat-param copy
    optimizer = torch.optim.SGD([flat], lr=0.1)
    handle = register_router_bias_hook(optimizer, torch.nn.ModuleDict({"wrapped": block}))  # a wrapped model

    _forward_backward(block)
    flat.grad = torch.ones_like(flat)
    optimizer.step()
    bias_after_one_step = block.gate.e_score_correction_bias.clone()
    assert bias_after_one_step.abs().sum() > 0
    assert block.gate.tokens_per_expert.sum() == 0

    handle.remove()  # the handle stops the updates
    _forward_backward(block)
    optimizer.step()
    torch.testing.assert_close(block.gate.e_score_correction_bias, bias_after_one_step)
    assert block.gate.tokens_per_expert.sum() == 2 * 5 * 2


def test_update_moves_each_bias_towards_equal_load():
    block = _balanced_block(rate=0.25)
    block.gate.tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    assert update_router_biases(block) == 1
    torch.testing.assert_close(block.gate.e_score_correction_bias, torch.tensor([-0.25, 0.25, 0.25, 0.25]))
    assert update_router_biases(block) == 0  # nothing counted since: no change
    torch.testing.assert_close(block.gate.e_score_correction_bias, torch.tensor([-0.25, 0.25, 0.25, 0.25]))
    assert update_router_biases(SparseMoeBlock(tiny_sparse_moe_config())) == 0  # no balanced router


def test_a_trained_router_that_is_never_updated_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(lightarch.layers, "_FORWARDS_BEFORE_MISSING_UPDATE_WARNING", 3)
    logging.Logger.warning_once.cache_clear()
    message = "without a bias update"

    block = _balanced_block()
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    register_router_bias_hook(optimizer, block)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):  # updated after every forward: silent
            _forward_backward(block)
            optimizer.step()
        block.gate.weight.requires_grad_(False)  # a frozen router (e.g. LoRA fine-tuning) is not "trained": silent
        unhooked = _balanced_block()
        unhooked.gate.weight.requires_grad_(False)
        for _ in range(5):
            unhooked(torch.randn(2, 5, 32))
        assert message not in caplog.text

        unhooked.gate.weight.requires_grad_(True)
        for _ in range(8):
            unhooked(torch.randn(2, 5, 32))
    assert caplog.text.count(message) == 1
    assert "RouterBiasUpdateCallback" in caplog.text
    logging.Logger.warning_once.cache_clear()
