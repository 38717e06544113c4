"""Forward+backward throughput of lightarch's sparse MoE block against transformers' `Qwen3MoeSparseMoeBlock`
(`scripts/bench_moe.py`).

Variants, all at the same sizes and (for the MoE ones) the same weights:

- `transformers_eager`, `transformers_grouped_mm`: `Qwen3MoeSparseMoeBlock`, experts implementation set through
  `config._experts_implementation` (dispatched by `transformers.integrations.moe.use_experts_implementation`).
- `lightarch_top_k_eager`, `lightarch_top_k_grouped_mm`: `lightarch.layers.SparseMoeBlock` in top-k mode with the Qwen
  block's weights; outputs and gradients are checked against the transformers block before anything is timed.
- `lightarch_top_p_eager`, `lightarch_top_p_grouped_mm`: the same weights with dynamic top-p routing (the mean number
  of experts per token is reported: its cost scales with it).
- `dense_mlp`: a SwiGLU `lightarch.layers.MLP` with `top_k * moe_intermediate_size` hidden units, i.e. the same
  active parameters per token as top-k routing, as a no-routing reference.

Each variant's ratio is its tokens/s over the transformers block with the same experts implementation (the dense
MLP is compared with `transformers_grouped_mm`, transformers' default). Timing: warm-up, then `rounds` rounds in
which every variant runs `iters_per_round` timed steps (variants interleaved, order rotated each round); tokens/s
comes from the median step time (robust to the stalls other processes on the machine cause). tokens per CPU-second
(this process's CPU time, all threads) is reported too: on a shared machine it is the steadier comparison.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.utils import logging

from ...configuration import SparseMoeConfig
from ...layers import MLP, SparseMoeBlock
from ...training.cli import available_cpus, other_running_processes
from .machine import machine_info

logger = logging.get_logger(__name__)
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def block_config(hidden_size: int = 256, moe_intermediate_size: int = 512, num_experts: int = 8, top_k: int = 2,
                 norm_topk_prob: bool = True, router_top_p: float = 0.5, max_experts_per_token: int = 4,
                 router_mode: str = "top_k", experts_implementation: str = "eager") -> SparseMoeConfig:
    """The SparseMoeConfig of the benchmarked block (attention is not benchmarked: one head keeps any width valid)."""
    config = SparseMoeConfig(
        hidden_size=hidden_size, num_attention_heads=1, moe_intermediate_size=moe_intermediate_size,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, router_mode=router_mode,
        router_top_p=router_top_p, max_experts_per_token=max_experts_per_token,
    )
    config._experts_implementation = experts_implementation
    return config


def qwen_config(config: SparseMoeConfig, experts_implementation: str) -> Qwen3MoeConfig:
    """transformers' Qwen3-MoE config with the block's sizes and top-k routing."""
    qwen = Qwen3MoeConfig(
        hidden_size=config.hidden_size,
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
    )
    qwen._experts_implementation = experts_implementation
    return qwen


def with_routing(config: SparseMoeConfig, experts_implementation: str, router_mode: str) -> SparseMoeConfig:
    """A copy of the block config with another experts implementation and router mode."""
    variant = copy.deepcopy(config)
    variant.router_mode = router_mode
    variant._experts_implementation = experts_implementation
    return variant


def build_variants(config: SparseMoeConfig, router_std: float, dtype: torch.dtype
                   ) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """name -> (module, baseline variant name). The Qwen block's weights (router weights of std `router_std`) are
    shared out by copy."""
    reference = Qwen3MoeSparseMoeBlock(qwen_config(config, "eager"))
    with torch.no_grad():
        torch.nn.init.normal_(reference.gate.weight, std=router_std)
        torch.nn.init.normal_(reference.experts.gate_up_proj, std=0.02)
        torch.nn.init.normal_(reference.experts.down_proj, std=0.02)
    state = reference.state_dict()

    variants: dict[str, tuple[torch.nn.Module, str | None]] = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        block = Qwen3MoeSparseMoeBlock(qwen_config(config, implementation))
        block.load_state_dict(state, strict=True)
        variants[f"transformers_{implementation}"] = (block, None)
    for router_mode in ("top_k", "top_p"):
        for implementation in EXPERTS_IMPLEMENTATIONS:
            block = SparseMoeBlock(with_routing(config, implementation, router_mode))
            block.load_state_dict(state, strict=True)  # same names: gate.weight, experts.{gate_up,down}_proj
            variants[f"lightarch_{router_mode}_{implementation}"] = (block, f"transformers_{implementation}")
    dense = MLP(with_routing(config, "eager", "top_k"),
                intermediate_size=config.num_experts_per_tok * config.moe_intermediate_size)
    with torch.no_grad():
        for linear in (dense.gate_proj, dense.up_proj, dense.down_proj):
            torch.nn.init.normal_(linear.weight, std=0.02)
    variants["dense_mlp"] = (dense, "transformers_grouped_mm")
    return {name: (module.to(dtype).train(), baseline) for name, (module, baseline) in variants.items()}


def step(module: torch.nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward+backward; returns the output, the input's gradient and each parameter's gradient by name."""
    module.zero_grad(set_to_none=True)
    inputs = inputs.detach().requires_grad_(True)
    output = module(inputs)
    output.backward(grad_output)
    grads = {f"{name} grad": param.grad for name, param in module.named_parameters()}
    return {"output": output.detach(), "input grad": inputs.grad, **grads}


def check_equivalence(variants: dict, inputs: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype) -> dict:
    """Every transformers / lightarch top-k variant must give the eager transformers block's outputs and gradients."""
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    reference = step(variants["transformers_eager"][0], inputs, grad_output)
    max_abs_diff = {}
    for name in ("transformers_grouped_mm", "lightarch_top_k_eager", "lightarch_top_k_grouped_mm"):
        result = step(variants[name][0], inputs, grad_output)
        assert result.keys() == reference.keys(), (name, sorted(result), sorted(reference))
        for label, expected in reference.items():
            actual = result[label]
            if not torch.allclose(actual.float(), expected.float(), **tolerance):
                diff = (actual.float() - expected.float()).abs().max().item()
                raise AssertionError(f"{name}: {label} differs from transformers_eager (max abs diff {diff:.3g})")
        max_abs_diff[name] = (result["output"].float() - reference["output"].float()).abs().max().item()
    return max_abs_diff


@torch.no_grad()
def experts_per_token(block: SparseMoeBlock, inputs: torch.Tensor) -> float:
    _, _, selected = block.gate(inputs.reshape(-1, inputs.shape[-1]))
    return (selected < block.num_experts).sum(dim=-1).float().mean().item()


def markdown_table(results: dict) -> str:
    """results.md: one row per variant, with the sizes and the machine in a header line."""
    lines = [
        "| variant | tokens/s | ratio | tokens/CPU-s | ratio (CPU time) | baseline | experts/token |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, row in results["variants"].items():
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        ratio_cpu = f"{row['ratio_cpu_time']:.3f}" if row["ratio_cpu_time"] is not None else "-"
        experts = f"{row['experts_per_token']:.2f}" if row["experts_per_token"] is not None else "-"
        lines.append(
            f"| {name} | {row['tokens_per_s']:.0f} | {ratio} | {row['tokens_per_cpu_s']:.0f} | {ratio_cpu} "
            f"| {row['baseline'] or '-'} | {experts} |"
        )
    config, env = results["config"], results["environment"]
    header = (
        f"MoE forward+backward, hidden {config['hidden_size']}, {config['num_experts']} experts x "
        f"{config['moe_intermediate_size']}, top-{config['top_k']} / top-p {config['router_top_p']} "
        f"(max {config['max_experts_per_token']}), {config['batch_size']}x{config['seq_len']} tokens, "
        f"{config['dtype']}, {env['torch_num_threads']} threads, median of "
        f"{config['rounds']}x{config['iters_per_round']} interleaved steps, load average "
        f"{env['load_average_before'][0]:.2f}; torch {env['torch']}, transformers {env['transformers']}."
    )
    return header + "\n\n" + "\n".join(lines) + "\n"


def check_moe_options(dtype: str, batch_size: int, seq_len: int, rounds: int, iters_per_round: int) -> None:
    """Raise ValueError naming the option for a dtype the benchmark does not know or a count below 1."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    for name, value in (("rounds", rounds), ("iters_per_round", iters_per_round), ("batch_size", batch_size),
                        ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")


def run_moe_benchmark(
    config: SparseMoeConfig,
    *,
    router_std: float = 0.1,
    batch_size: int = 8,
    seq_len: int = 256,
    dtype: str = "float32",
    warmup: int = 2,
    rounds: int = 7,
    iters_per_round: int = 4,
    num_threads: int = 0,
    seed: int = 0,
) -> dict:
    """Time every variant's forward+backward on `batch_size x seq_len` tokens of the block `config` (see
    `block_config`) and return the results (`markdown_table` renders them). `num_threads` 0 = the CPUs this process
    may use minus the other processes running at start (at least 1): OpenMP threads competing with other work for a
    core stall badly. Raises ValueError naming the option for a bad dtype or count (`check_moe_options`)."""
    check_moe_options(dtype, batch_size, seq_len, rounds, iters_per_round)
    torch_dtype = DTYPES[dtype]
    load_before = os.getloadavg()
    others_at_start = other_running_processes()
    num_threads = num_threads or max(1, available_cpus() - others_at_start)
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)

    variants = build_variants(config, router_std, torch_dtype)
    inputs = torch.randn(batch_size, seq_len, config.hidden_size, dtype=torch_dtype)
    grad_output = torch.randn_like(inputs)
    max_abs_diff = check_equivalence(variants, inputs, grad_output, torch_dtype)

    names = list(variants)
    if load_before[0] > 0.5:
        logger.warning(
            f"Load average is {load_before[0]:.2f}: other processes compete for the CPU, so timings are noisy (and "
            "with several threads per process a step can stall many times over). Compare variants within one run only."
        )
    step_seconds: dict[str, list[float]] = {name: [] for name in names}
    step_cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
    total = len(names) * (warmup + rounds * iters_per_round)
    with tqdm(total=total, desc="bench_moe", unit="step", file=sys.stderr) as progress:
        for name in names:
            for _ in range(warmup):
                step(variants[name][0], inputs, grad_output)
                progress.update()
        for round_index in range(rounds):
            shift = round_index % len(names)  # rotate the order so no variant always runs first / after another
            for name in names[shift:] + names[:shift]:
                module = variants[name][0]
                for _ in range(iters_per_round):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    step(module, inputs, grad_output)
                    step_seconds[name].append(time.perf_counter() - start)
                    step_cpu_seconds[name].append(time.process_time() - cpu_start)
                    progress.update()

    tokens = batch_size * seq_len
    rows = {}
    for name in names:
        module, baseline = variants[name]
        rows[name] = {
            "tokens_per_s": tokens / statistics.median(step_seconds[name]),
            "tokens_per_s_best": tokens / min(step_seconds[name]),
            "step_seconds": step_seconds[name],
            # CPU time of this process (all threads): insensitive to being descheduled when the machine is shared.
            "tokens_per_cpu_s": tokens / statistics.median(step_cpu_seconds[name]),
            "baseline": baseline,
            "ratio": None,
            "ratio_cpu_time": None,
            "experts_per_token": (
                experts_per_token(module, inputs) if isinstance(module, SparseMoeBlock)
                else float(config.num_experts_per_tok) if name.startswith("transformers") else None
            ),
            "max_abs_diff_vs_transformers_eager": max_abs_diff.get(name),
        }
    for row in rows.values():
        if row["baseline"] is not None:
            row["ratio"] = row["tokens_per_s"] / rows[row["baseline"]]["tokens_per_s"]
            row["ratio_cpu_time"] = row["tokens_per_cpu_s"] / rows[row["baseline"]]["tokens_per_cpu_s"]
    env = machine_info(num_threads)
    env["load_average_before"], env["load_average_after"] = list(load_before), list(os.getloadavg())
    env["other_running_processes_at_start"] = others_at_start
    settings = {
        "hidden_size": config.hidden_size, "moe_intermediate_size": config.moe_intermediate_size,
        "num_experts": config.num_experts, "top_k": config.num_experts_per_tok,
        "norm_topk_prob": config.norm_topk_prob, "router_top_p": config.router_top_p,
        "max_experts_per_token": config.max_experts_per_token, "router_std": router_std, "batch_size": batch_size,
        "seq_len": seq_len, "dtype": dtype, "warmup": warmup, "rounds": rounds, "iters_per_round": iters_per_round,
        "num_threads": num_threads, "seed": seed,
    }
    return {"config": settings, "environment": env, "variants": rows}


BENCH_SCRIPT = "bench_moe.py"  # the writer named in the output folder's marker (`check_output_dir`)


def prepare_moe_output_dir(output_dir: str | os.PathLike):
    """The folder `write_moe_results` writes, created and marked: a new or empty folder, or an earlier output of
    this benchmark (a ValueError names it otherwise: `lightarch.training.checkpoints.check_output_dir`)."""
    from ...training.checkpoints import prepare_output_dir

    return prepare_output_dir(output_dir, BENCH_SCRIPT)


def write_moe_results(output_dir: str | os.PathLike, results: dict) -> str:
    """results.json and results.md (the table, returned) into `output_dir` (`prepare_moe_output_dir`), atomically."""
    import json

    from ...training.checkpoints import write_atomically

    folder = prepare_moe_output_dir(output_dir)
    table = markdown_table(results)
    write_atomically(folder / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(folder / "results.md", table)
    return table


__all__ = ["block_config", "build_variants", "check_equivalence", "check_moe_options", "markdown_table",
           "prepare_moe_output_dir", "run_moe_benchmark", "write_moe_results"]
