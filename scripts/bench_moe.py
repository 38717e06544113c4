"""Forward+backward throughput of lightarch's sparse MoE block against transformers' `Qwen3MoeSparseMoeBlock`.

Variants, all at the same config and (for the MoE ones) the same weights:

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

    python scripts/bench_moe.py                    # defaults: about a minute on 2 idle CPU cores
    python scripts/bench_moe.py --help
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import HfArgumentParser, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.utils import logging


from lightarch import SparseMoeConfig  # noqa: E402
from lightarch.layers import MLP, SparseMoeBlock  # noqa: E402
from lightarch.training.cli import available_cpus, other_running_processes  # noqa: E402
from lightarch.training.checkpoints import write_atomically  # noqa: E402

logger = logging.get_logger("bench_moe")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchArguments:
    hidden_size: int = field(default=256, metadata={"help": "Model width (input/output size of every block)."})
    moe_intermediate_size: int = field(default=512, metadata={"help": "Hidden units of each expert's SwiGLU MLP."})
    num_experts: int = field(default=8, metadata={"help": "Number of routed experts."})
    top_k: int = field(default=2, metadata={"help": "Experts per token in top-k mode (num_experts_per_tok)."})
    norm_topk_prob: bool = field(default=True, metadata={"help": "Renormalise the top-k routing weights."})
    router_top_p: float = field(
        default=0.5, metadata={"help": "top_p mode: take experts until their probability mass reaches this."}
    )
    max_experts_per_token: int = field(default=4, metadata={"help": "top_p mode: at most this many experts a token."})
    router_std: float = field(
        default=0.1,
        metadata={
            "help": "Std of the random router weights. Larger gives peakier (more trained-like) routing, hence fewer "
            "experts per token in top_p mode; near 0 every expert looks equally likely."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence (a step has batch_size * seq_len)."})
    dtype: str = field(default="float32", metadata={"help": f"Weights and activations dtype: {list(DTYPES)}."})
    warmup: int = field(default=2, metadata={"help": "Untimed forward+backward steps per variant before timing."})
    rounds: int = field(default=7, metadata={"help": "Timed rounds, every variant in each (interleaved)."})
    iters_per_round: int = field(
        default=4, metadata={"help": "Timed forward+backward steps per variant per round; tokens/s uses the median."}
    )
    num_threads: int = field(
        default=0,
        metadata={
            "help": "torch.set_num_threads value. 0 = auto: the CPUs this process may use minus the other processes "
            "running at start (at least 1), since OpenMP threads competing with other work for a core stall badly."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for weights and inputs."})
    output_dir: str = field(
        default="outputs/bench_moe", metadata={"help": "Where results.json and results.md are written."}
    )


def qwen_config(args: BenchArguments, experts_implementation: str) -> Qwen3MoeConfig:
    config = Qwen3MoeConfig(
        hidden_size=args.hidden_size,
        moe_intermediate_size=args.moe_intermediate_size,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=args.norm_topk_prob,
    )
    config._experts_implementation = experts_implementation
    return config


def lightarch_config(args: BenchArguments, experts_implementation: str, router_mode: str) -> SparseMoeConfig:
    config = SparseMoeConfig(
        hidden_size=args.hidden_size,
        num_attention_heads=1,  # attention is not benchmarked; this just keeps the config valid at any width
        moe_intermediate_size=args.moe_intermediate_size,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=args.norm_topk_prob,
        router_mode=router_mode,
        router_top_p=args.router_top_p,
        max_experts_per_token=args.max_experts_per_token,
    )
    config._experts_implementation = experts_implementation
    return config


def build_variants(args: BenchArguments, dtype: torch.dtype) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """name -> (module, baseline variant name). The Qwen block's weights are shared out by copy."""
    reference = Qwen3MoeSparseMoeBlock(qwen_config(args, "eager"))
    with torch.no_grad():
        torch.nn.init.normal_(reference.gate.weight, std=args.router_std)
        torch.nn.init.normal_(reference.experts.gate_up_proj, std=0.02)
        torch.nn.init.normal_(reference.experts.down_proj, std=0.02)
    state = reference.state_dict()

    variants: dict[str, tuple[torch.nn.Module, str | None]] = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        block = Qwen3MoeSparseMoeBlock(qwen_config(args, implementation))
        block.load_state_dict(state, strict=True)
        variants[f"transformers_{implementation}"] = (block, None)
    for router_mode in ("top_k", "top_p"):
        for implementation in EXPERTS_IMPLEMENTATIONS:
            block = SparseMoeBlock(lightarch_config(args, implementation, router_mode))
            block.load_state_dict(state, strict=True)  # same names: gate.weight, experts.{gate_up,down}_proj
            variants[f"lightarch_{router_mode}_{implementation}"] = (block, f"transformers_{implementation}")
    dense = MLP(lightarch_config(args, "eager", "top_k"), intermediate_size=args.top_k * args.moe_intermediate_size)
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


def environment(num_threads: int) -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "available_cpus": available_cpus(),
        "torch_num_threads": num_threads,
    }


def markdown_table(results: dict) -> str:
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


def run(args: BenchArguments) -> dict:
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {args.dtype!r}")
    for name in ("rounds", "iters_per_round", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()
    others_at_start = other_running_processes()
    num_threads = args.num_threads or max(1, available_cpus() - others_at_start)
    torch.set_num_threads(num_threads)
    torch.manual_seed(args.seed)

    variants = build_variants(args, dtype)
    inputs = torch.randn(args.batch_size, args.seq_len, args.hidden_size, dtype=dtype)
    grad_output = torch.randn_like(inputs)
    max_abs_diff = check_equivalence(variants, inputs, grad_output, dtype)

    names = list(variants)
    if load_before[0] > 0.5:
        logger.warning(
            f"Load average is {load_before[0]:.2f}: other processes compete for the CPU, so timings are noisy (and "
            "with several threads per process a step can stall many times over). Compare variants within one run only."
        )
    step_seconds: dict[str, list[float]] = {name: [] for name in names}
    step_cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
    total = len(names) * (args.warmup + args.rounds * args.iters_per_round)
    with tqdm(total=total, desc="bench_moe", unit="step", file=sys.stderr) as progress:
        for name in names:
            for _ in range(args.warmup):
                step(variants[name][0], inputs, grad_output)
                progress.update()
        for round_index in range(args.rounds):
            shift = round_index % len(names)  # rotate the order so no variant always runs first / after another
            for name in names[shift:] + names[:shift]:
                module = variants[name][0]
                for _ in range(args.iters_per_round):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    step(module, inputs, grad_output)
                    step_seconds[name].append(time.perf_counter() - start)
                    step_cpu_seconds[name].append(time.process_time() - cpu_start)
                    progress.update()

    tokens = args.batch_size * args.seq_len
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
                else float(args.top_k) if name.startswith("transformers") else None
            ),
            "max_abs_diff_vs_transformers_eager": max_abs_diff.get(name),
        }
    for row in rows.values():
        if row["baseline"] is not None:
            row["ratio"] = row["tokens_per_s"] / rows[row["baseline"]]["tokens_per_s"]
            row["ratio_cpu_time"] = row["tokens_per_cpu_s"] / rows[row["baseline"]]["tokens_per_cpu_s"]
    env = environment(num_threads)
    env["load_average_before"], env["load_average_after"] = list(load_before), list(os.getloadavg())
    env["other_running_processes_at_start"] = others_at_start
    return {"config": asdict(args), "environment": env, "variants": rows}


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), run the benchmark, write results.{json,md}, print the table."""
    parser = HfArgumentParser(BenchArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    results = run(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    write_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(output_dir / "results.md", table)
    print(table)
    return results


if __name__ == "__main__":
    main()
