"""Whole-model speed of lightarch's SparseMoe against transformers' own MoE models with the same weights
(`scripts/bench_moe.py`).

For each architecture (`qwen3_moe`: `Qwen3MoeForCausalLM`, `mixtral`: `MixtralForCausalLM`), a transformers model is
built from a small config with random weights and converted with `lightarch.interop.from_transformers` (same
weights, same routing). Before anything is timed, the two models' logits must agree (`check_same_model`). Then, per
measurement, the two models run alternately (`rounds` rounds, the order swapped every round) after `warmup` untimed
runs each, and tokens/s comes from the median run time, so the ratio (lightarch over transformers, > 1: lightarch is
faster) is measured in one run under the same machine load:

- `decode_b{B}`: greedy `generate` of `new_tokens` tokens (min = max) after a `prompt_length`-token prompt, batch B;
  tokens/s counts the new tokens (the short prompt's prefill is included in the time);
- `prefill_{L}`: one forward over an L-token prompt with a cache and `logits_to_keep=1`, as `generate`'s first step;
- `train_step`: forward + backward with labels on `train_batch_size x train_seq_len` tokens (transformers' model with
  `output_router_logits=True`, so both add their router balance loss, as MoE training does).

Results: a dict (`run_moe_benchmark`) written as results.json, results.md (`markdown_table`) and results.png
(`plot_ratios`) by `write_moe_results`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.utils import logging

from ...interop import from_transformers
from ...training.cli import available_cpus, other_running_processes
from .machine import machine_info

logger = logging.get_logger(__name__)

ARCHITECTURES = {"qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM), "mixtral": (MixtralConfig, MixtralForCausalLM)}
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm")
# The issue-13 targets (lightarch tokens/s over transformers'); prefill has none (it must only not get slower).
TARGETS = {"decode_b1": 1.2, "decode_b8": 1.0, "train_step": 1.0}
BENCH_SCRIPT = "bench_moe.py"  # the writer named in the output folder's marker (`check_output_dir`)


def reference_config(architecture: str, hidden_size: int = 256, num_hidden_layers: int = 4, num_experts: int = 8,
                     top_k: int = 2, moe_intermediate_size: int = 512, vocab_size: int = 4096,
                     num_attention_heads: int = 4, num_key_value_heads: int = 2, max_position_embeddings: int = 8192,
                     experts_implementation: str = "grouped_mm"):
    """The transformers config of one benchmarked model: every layer a sparse MoE layer, full attention, fp32."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"--architectures: unknown architecture {architecture!r}; use {sorted(ARCHITECTURES)}")
    config_class, _ = ARCHITECTURES[architecture]
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                  head_dim=hidden_size // num_attention_heads, max_position_embeddings=max_position_embeddings,
                  num_experts_per_tok=top_k, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if architecture == "qwen3_moe":
        config = config_class(**common, num_experts=num_experts, moe_intermediate_size=moe_intermediate_size,
                              intermediate_size=2 * moe_intermediate_size, norm_topk_prob=True)
    else:  # Mixtral's experts are sized by intermediate_size
        config = config_class(**common, num_local_experts=num_experts, intermediate_size=moe_intermediate_size,
                              sliding_window=None)
    config._experts_implementation = experts_implementation
    return config


def build_pair(architecture: str, seed: int = 0, **sizes) -> tuple[PreTrainedModel, PreTrainedModel]:
    """(transformers model, lightarch model with the same weights), both in eval mode, sdpa attention."""
    torch.manual_seed(seed)
    config = reference_config(architecture, **sizes)
    config._attn_implementation = "sdpa"
    reference = ARCHITECTURES[architecture][1](config).eval()
    converted = from_transformers(reference).eval()
    converted.config._attn_implementation = "sdpa"
    for model in (reference, converted):
        model.generation_config.pad_token_id = config.pad_token_id
    return reference, converted


@torch.no_grad()
def check_same_model(reference: PreTrainedModel, converted: PreTrainedModel, vocab_size: int, seed: int = 0,
                     atol: float = 1e-4) -> float:
    """Both models must give the same logits on a random batch (else the comparison would time different models);
    returns the max abs difference, raises AssertionError naming it otherwise."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 24), generator=generator)
    expected, got = reference(input_ids).logits, converted(input_ids).logits
    diff = (expected - got).abs().max().item()
    if not diff <= atol:
        raise AssertionError(f"{type(converted).__name__} differs from {type(reference).__name__}: max abs logit "
                             f"difference {diff:.3g} > {atol} (the conversion did not keep the weights)")
    return diff


def measurements(decode_batch_sizes: Sequence[int], prefill_lengths: Sequence[int]) -> list[str]:
    """Measurement names in table order."""
    return ([f"decode_b{b}" for b in decode_batch_sizes] + [f"prefill_{n}" for n in prefill_lengths]
            + ["train_step"])


def make_run(model: PreTrainedModel, name: str, vocab_size: int, *, new_tokens: int, prompt_length: int,
             train_batch_size: int, train_seq_len: int, seed: int = 0) -> tuple[Callable[[], object], int]:
    """(a callable doing one timed unit of measurement `name` on `model`, the tokens it counts), with `model` put
    in the mode the measurement needs (train for `train_step`, else eval). Inputs are drawn from `seed` so both models
    get the same ones; the runs of one measurement must not interleave with another measurement of the same model."""
    generator = torch.Generator().manual_seed(seed)
    model.train(name == "train_step")  # once here: switching walks every module, which is not what is timed

    def ids(batch: int, length: int) -> torch.Tensor:
        return torch.randint(3, vocab_size, (batch, length), generator=generator)

    if name.startswith("decode_b"):
        prompt = ids(int(name.removeprefix("decode_b")), prompt_length)

        @torch.no_grad()
        def decode():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)

        return decode, prompt.shape[0] * new_tokens
    if name.startswith("prefill_"):
        prompt = ids(1, int(name.removeprefix("prefill_")))

        @torch.no_grad()
        def prefill():
            return model(prompt, use_cache=True, logits_to_keep=1).logits

        return prefill, prompt.numel()
    batch = ids(train_batch_size, train_seq_len)

    def train_step():
        model.zero_grad(set_to_none=True)
        output = model(batch, labels=batch, use_cache=False, output_router_logits=True)  # both add the aux loss
        output.loss.backward()
        return output.loss.detach()

    return train_step, batch.numel()


def check_moe_options(**options) -> None:
    """Raise ValueError naming the option (`--name`) for a count below 1 or an unknown experts implementation."""
    implementation = options.pop("experts_implementation", "grouped_mm")
    if implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"--experts_implementation must be one of {list(EXPERTS_IMPLEMENTATIONS)}, got "
                         f"{implementation!r}")
    for name, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or any(v < (0 if name == "warmup" else 1) for v in values):
            raise ValueError(f"--{name} must be {'>= 0' if name == 'warmup' else '>= 1'}, got {value}")


def run_moe_benchmark(
    architectures: Sequence[str] = ("qwen3_moe", "mixtral"),
    *,
    sizes: dict | None = None,
    decode_batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 64,
    prompt_length: int = 16,
    prefill_lengths: Sequence[int] = (512, 4096),
    train_batch_size: int = 4,
    train_seq_len: int = 256,
    warmup: int = 1,
    rounds: int = 5,
    num_threads: int = 0,
    seed: int = 0,
) -> dict:
    """Time every measurement on both models of every architecture (see the module docstring) and return
    {"config", "environment", "results": {architecture: {measurement: row}}}. `sizes` are `reference_config`'s
    keyword arguments. `num_threads` 0 = the CPUs this process may use minus the other processes running at start
    (at least 1)."""
    sizes = dict(sizes or {})
    for architecture in architectures:
        reference_config(architecture, **sizes)  # names a bad architecture / size before any model is built
    check_moe_options(decode_batch_sizes=list(decode_batch_sizes), new_tokens=new_tokens,
                      prompt_length=prompt_length, prefill_lengths=list(prefill_lengths),
                      train_batch_size=train_batch_size, train_seq_len=train_seq_len, warmup=warmup, rounds=rounds,
                      experts_implementation=sizes.get("experts_implementation", "grouped_mm"))
    load_before = os.getloadavg()
    others_at_start = other_running_processes()
    num_threads = num_threads or max(1, available_cpus() - others_at_start)
    torch.set_num_threads(num_threads)
    if load_before[0] > 0.5:
        logger.warning(f"Load average is {load_before[0]:.2f}: other processes compete for the CPU, so timings are "
                       "noisy. The ratios compare the two models within this run only.")
    names = measurements(decode_batch_sizes, prefill_lengths)
    vocab_size = sizes.get("vocab_size", 4096)
    run_options = dict(new_tokens=new_tokens, prompt_length=prompt_length, train_batch_size=train_batch_size,
                       train_seq_len=train_seq_len, seed=seed)
    results: dict[str, dict] = {}
    progress = tqdm(total=len(architectures) * len(names) * 2 * (warmup + rounds), desc="bench_moe", unit="run",
                    file=sys.stderr)
    for architecture in architectures:
        reference, converted = build_pair(architecture, seed=seed, **sizes)
        max_diff = check_same_model(reference, converted, vocab_size, seed)
        rows = {}
        for name in names:
            runs = {"transformers": make_run(reference, name, vocab_size, **run_options),
                    "lightarch": make_run(converted, name, vocab_size, **run_options)}
            seconds: dict[str, list[float]] = {side: [] for side in runs}
            outputs = {}
            for side, (run, _) in runs.items():
                for _ in range(warmup):
                    outputs[side] = run()
                    progress.update()
            for round_index in range(rounds):
                order = list(runs) if round_index % 2 == 0 else list(runs)[::-1]  # alternate who runs first
                for side in order:
                    start = time.perf_counter()
                    outputs[side] = runs[side][0]()
                    seconds[side].append(time.perf_counter() - start)
                    progress.update()
            tokens = runs["lightarch"][1]
            row = {side: {"tokens_per_s": tokens / statistics.median(s), "seconds": s} for side, s in seconds.items()}
            row["tokens"] = tokens
            row["ratio"] = row["lightarch"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
            row["target"] = TARGETS.get(name)
            if name.startswith("decode_b"):
                row["same_greedy_tokens"] = bool(torch.equal(outputs["transformers"], outputs["lightarch"]))
            rows[name] = row
        results[architecture] = {"max_abs_logit_diff": max_diff, "measurements": rows,
                                 "attn_implementation": converted.config._attn_implementation,
                                 "experts_implementation": converted.config._experts_implementation,
                                 "parameters": sum(p.numel() for p in converted.parameters())}
        del reference, converted
    progress.close()
    env = machine_info(num_threads)
    env["load_average_before"], env["load_average_after"] = list(load_before), list(os.getloadavg())
    env["other_running_processes_at_start"] = others_at_start
    settings = {"architectures": list(architectures), **reference_config_defaults(sizes),
                "decode_batch_sizes": list(decode_batch_sizes), "new_tokens": new_tokens,
                "prompt_length": prompt_length, "prefill_lengths": list(prefill_lengths),
                "train_batch_size": train_batch_size, "train_seq_len": train_seq_len, "warmup": warmup,
                "rounds": rounds, "num_threads": num_threads, "seed": seed}
    return {"config": settings, "environment": env, "results": results}


def reference_config_defaults(sizes: dict) -> dict:
    """`sizes` completed with `reference_config`'s defaults (what the run used)."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(reference_config).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **sizes}


def markdown_table(results: dict) -> str:
    """results.md: one row per architecture and measurement, with the sizes and the machine in a header line."""
    config, env = results["config"], results["environment"]
    lines = [
        f"Same weights, lightarch (`from_transformers`) vs transformers: hidden {config['hidden_size']}, "
        f"{config['num_hidden_layers']} layers, {config['num_experts']} experts x {config['moe_intermediate_size']}, "
        f"top-{config['top_k']}, vocab {config['vocab_size']}, experts {config['experts_implementation']}; decode: "
        f"{config['new_tokens']} greedy tokens after {config['prompt_length']}; train: "
        f"{config['train_batch_size']}x{config['train_seq_len']}; median of {config['rounds']} alternating runs, "
        f"{env['torch_num_threads']} threads, load average {env['load_average_before'][0]:.2f}; torch "
        f"{env['torch']}, transformers {env['transformers']}.",
        "",
        "| model | measurement | transformers tokens/s | lightarch tokens/s | ratio | target |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for architecture, entry in results["results"].items():
        model = ARCHITECTURES[architecture][1].__name__
        for name, row in entry["measurements"].items():
            target = f">= {row['target']}" if row["target"] is not None else "-"
            lines.append(f"| {model} | {name} | {row['transformers']['tokens_per_s']:.1f} | "
                         f"{row['lightarch']['tokens_per_s']:.1f} | {row['ratio']:.2f}x | {target} |")
    return "\n".join(lines) + "\n"


def plot_ratios(results: dict) -> bytes:
    """results.png: per measurement, the ratio of each architecture as a bar; 1.0 and the targets marked."""
    from ..plots import figure_to_png, pyplot

    plt = pyplot()
    architectures = list(results["results"])
    names = list(next(iter(results["results"].values()))["measurements"]) if architectures else []
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    width = 0.8 / max(1, len(architectures))
    for i, architecture in enumerate(architectures):
        rows = results["results"][architecture]["measurements"]
        ax.bar([j + (i - (len(architectures) - 1) / 2) * width for j in range(len(names))],
               [rows[name]["ratio"] for name in names], width, label=ARCHITECTURES[architecture][1].__name__)
    for j, name in enumerate(names):
        if TARGETS.get(name) is not None:
            ax.plot([j - 0.45, j + 0.45], [TARGETS[name]] * 2, "k--", lw=1)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("lightarch / transformers tokens/s")
    ax.set_title("Same weights: lightarch over transformers (dashed: targets)")
    ax.legend()
    return figure_to_png(fig)


def prepare_moe_output_dir(output_dir: str | os.PathLike):
    """The folder `write_moe_results` writes, created and marked: a new or empty folder, or an earlier output of
    this benchmark (a ValueError names it otherwise: `lightarch.training.checkpoints.check_output_dir`)."""
    from ...training.checkpoints import prepare_output_dir

    return prepare_output_dir(output_dir, BENCH_SCRIPT)


def write_moe_results(output_dir: str | os.PathLike, results: dict) -> str:
    """results.json, results.md (the table, returned) and results.png into `output_dir`, atomically."""
    from ...training.checkpoints import write_result_files

    table = markdown_table(results)
    write_result_files(prepare_moe_output_dir(output_dir), results, table, {"results.png": plot_ratios(results)})
    return table


__all__ = ["ARCHITECTURES", "TARGETS", "build_pair", "check_moe_options", "check_same_model", "make_run",
           "markdown_table", "measurements", "plot_ratios", "prepare_moe_output_dir", "reference_config",
           "run_moe_benchmark", "write_moe_results"]
