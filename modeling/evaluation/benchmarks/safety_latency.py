"""Per-prompt latency of the safety filter (issue 15's target: p95 <= 10 ms on 1 CPU core for rules + classifier).

Protocol (`run_safety_latency`, run by scripts/bench_safety.py):
- Prompts: `num_prompts` texts of the filter folder's test split (never used for training or threshold choice),
  taken at evenly spaced ranks of the split sorted by length, so short and long prompts both count.
- Variants, each timed on one prompt per call (what a server does per request): the rules engine alone; the
  classifier alone in torch (the baseline, measured in the same run), ONNX Runtime fp32 and int8; and the whole
  filter (`SafetyFilter.check`: rules + classifier) with each classifier. Tokenization is inside every classifier
  timing.
- Each variant in its own block (`warmup` untimed calls, then `rounds` passes over the prompts), torch and ONNX
  Runtime on `num_threads` threads (1 for the target): ONNX Runtime's and torch's pools spin after a run, so
  interleaving them makes each pay for the other's idle threads (see `inference.measure_latency`).
- With `deobfuscate`, one more variant: `DeobfuscatingFilter.check` over the whole filter with the export's ONNX
  variant (`filter_onnx_<default>_deobfuscating`: what serve.py screens with by default; a text whose views are
  all allowed costs one filter check per view).
- p50 / p95 / p99 / mean / max per variant, the speedup of each classifier over torch at p50 and p95, and the
  target checked on the whole filter with the ONNX variant the folder's export chose.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

BENCH_SCRIPT = "bench_safety.py"  # the writer named in the output folder's marker (`check_output_dir`)
TARGET_P95_MS = 10.0
CLASSIFIERS = ("torch", "onnx_fp32", "onnx_int8")


def held_out_prompts(model_dir: str | os.PathLike, num_prompts: int, split: str = "test") -> list[str]:
    """`num_prompts` distinct texts of the folder's saved `split`, at evenly spaced ranks by length."""
    from ...safety.recipe import load_splits

    splits = load_splits(model_dir)
    if split not in splits:
        raise ValueError(f"--split {split!r}: {Path(model_dir) / 'splits.json'} has {', '.join(splits)}")
    texts = sorted({e.text for e in splits[split]}, key=lambda t: (len(t), t))
    if num_prompts < 1 or num_prompts > len(texts):
        raise ValueError(f"--num_prompts {num_prompts}: the {split} split has {len(texts)} distinct prompts; use 1 to "
                         f"{len(texts)}")
    ranks = np.linspace(0, len(texts) - 1, num_prompts).round().astype(int)
    return [texts[i] for i in ranks]


def safety_runners(model_dir: str | os.PathLike, num_threads: int = 1, deobfuscate: bool = False
                   ) -> tuple[dict[str, Callable[[str], object]], dict]:
    """(variant name -> callable(prompt), info) for the filter in `model_dir`: rules, classifier_<backend>,
    filter_<backend> for each backend of CLASSIFIERS, and with `deobfuscate` filter_onnx_<default>_deobfuscating;
    info names the export's default variant."""
    from ...safety.filter import SafetyFilter
    from ...safety.normalize import DeobfuscatingFilter
    from ...safety.onnx_classifier import has_onnx_export, read_onnx_config

    safety = SafetyFilter.from_pretrained(model_dir, classifier_backend="torch")
    if safety.classifier is None:
        raise ValueError(f"--model_dir {model_dir} holds a rules-only filter: train one with a classifier "
                         "(scripts/train_safety.py)")
    classifier_dir = Path(model_dir) / "classifier"
    if not has_onnx_export(classifier_dir):
        raise ValueError(f"--model_dir {model_dir}: its classifier has no ONNX export; run "
                         f"scripts/export_safety_onnx.py --model_dir {model_dir}")
    export = read_onnx_config(classifier_dir)
    runners: dict[str, Callable[[str], object]] = {"rules": lambda text: safety.check(text, use_classifier=False)}
    filters = {}
    for backend in CLASSIFIERS:
        if backend == "onnx_int8" and "int8" not in export["files"]:
            continue
        filters[backend] = SafetyFilter.from_pretrained(model_dir, classifier_backend=backend,
                                                        num_threads=num_threads)
    for backend, loaded in filters.items():
        runners[f"classifier_{backend}"] = (lambda c: lambda text: c.predict([text]))(loaded.classifier)
    for backend, loaded in filters.items():
        runners[f"filter_{backend}"] = (lambda f: lambda text: f.check(text))(loaded)
    default = f"onnx_{export['default']}"
    if deobfuscate:
        runners[f"filter_{default}_deobfuscating"] = DeobfuscatingFilter(filters[default]).check
    return runners, {"onnx_default": default, "max_length": export["max_length"],
                     "onnx_agreement_with_torch": export["agreement_with_torch"]}


def latency_summary(times_ms: Sequence[float]) -> dict:
    """p50 / p95 / p99 / mean / max (ms) and the number of timed calls."""
    values = np.asarray(times_ms)
    return {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95)),
            "p99_ms": float(np.percentile(values, 99)), "mean_ms": statistics.fmean(values),
            "max_ms": float(values.max()), "runs": len(values)}


def time_runners(runners: dict[str, Callable[[str], object]], prompts: Sequence[str], rounds: int,
                 warmup: int) -> dict[str, list[float]]:
    """Per variant, the milliseconds of every timed call (each variant in its own block: module docstring)."""
    times = {}
    for name, run in runners.items():
        for i in range(warmup):
            run(prompts[i % len(prompts)])
        samples = []
        for _ in range(rounds):
            for prompt in prompts:
                start = time.perf_counter()
                run(prompt)
                samples.append(1000 * (time.perf_counter() - start))
        times[name] = samples
    return times


def run_safety_latency(model_dir: str | os.PathLike, num_prompts: int = 300, rounds: int = 3, warmup: int = 10,
                       num_threads: int = 1, split: str = "test", deobfuscate: bool = False
                       ) -> tuple[dict, dict[str, list[float]]]:
    """The benchmark in the module docstring; returns (results, the raw times per variant for the plot)."""
    import torch

    from ...safety.filter import SafetyFilter
    from .machine import machine_info

    if rounds < 1 or warmup < 0 or num_threads < 1:
        raise ValueError(f"--rounds {rounds} / --warmup {warmup} / --num_threads {num_threads}: use rounds >= 1, "
                         "warmup >= 0, num_threads >= 1")
    torch.set_num_threads(num_threads)
    prompts = held_out_prompts(model_dir, num_prompts, split)
    runners, info = safety_runners(model_dir, num_threads, deobfuscate)
    tokenizer = SafetyFilter.from_pretrained(model_dir, classifier_backend=info["onnx_default"]).classifier.tokenizer
    tokens = [len(ids) for ids in tokenizer(prompts, truncation=True, max_length=info["max_length"])["input_ids"]]
    times = time_runners(runners, prompts, rounds, warmup)
    latency = {name: latency_summary(samples) for name, samples in times.items()}
    for kind in ("classifier", "filter"):
        base = latency[f"{kind}_torch"]
        for backend in CLASSIFIERS[1:]:
            if f"{kind}_{backend}" in latency:
                entry = latency[f"{kind}_{backend}"]
                entry["speedup_vs_torch_p50"] = base["p50_ms"] / entry["p50_ms"]
                entry["speedup_vs_torch_p95"] = base["p95_ms"] / entry["p95_ms"]
    target_variant = f"filter_{info['onnx_default']}"
    chars = [len(p) for p in prompts]
    return {
        "kind": "safety_latency",
        "model_dir": str(model_dir),
        "split": split,
        "prompts": {"count": len(prompts), "chars_min": min(chars), "chars_median": float(np.median(chars)),
                    "chars_max": max(chars), "tokens_min": min(tokens), "tokens_median": float(np.median(tokens)),
                    "tokens_max": max(tokens), "max_length": info["max_length"]},
        "rounds": rounds, "warmup": warmup, "num_threads": num_threads,
        "latency": latency,
        "onnx_default": info["onnx_default"],
        "onnx_agreement_with_torch": info["onnx_agreement_with_torch"],
        "target": {"variant": target_variant, "p95_ms": latency[target_variant]["p95_ms"],
                   "target_p95_ms": TARGET_P95_MS, "met": latency[target_variant]["p95_ms"] <= TARGET_P95_MS},
        "machine": machine_info(num_threads),
    }, times


def markdown(results: dict) -> str:
    """results.md: the latency table, the prompts, the target."""
    prompts, target = results["prompts"], results["target"]
    lines = ["# Safety filter latency per prompt", "",
             f"{prompts['count']} held-out prompts ({results['split']} split) x {results['rounds']} rounds, "
             f"{results['num_threads']} thread(s); prompts of {prompts['chars_min']}-{prompts['chars_max']} "
             f"characters (median {prompts['chars_median']:.0f}), {prompts['tokens_min']}-{prompts['tokens_max']} "
             f"tokens (cut at {prompts['max_length']}). Baseline: torch in the same run.", "",
             "| variant | p50 ms | p95 ms | p99 ms | mean ms | speedup vs torch (p50 / p95) |",
             "|---|---|---|---|---|---|"]
    for name, entry in results["latency"].items():
        speedup = (f"{entry['speedup_vs_torch_p50']:.2f}x / {entry['speedup_vs_torch_p95']:.2f}x"
                   if "speedup_vs_torch_p50" in entry else "")
        lines.append(f"| {name} | {entry['p50_ms']:.2f} | {entry['p95_ms']:.2f} | {entry['p99_ms']:.2f} | "
                     f"{entry['mean_ms']:.2f} | {speedup} |")
    lines += ["", f"Target: p95 <= {target['target_p95_ms']:g} ms for rules + classifier ({target['variant']}, the "
                  f"ONNX variant the export chose): {target['p95_ms']:.2f} ms, "
                  f"{'met' if target['met'] else 'NOT met'}.", ""]
    for variant, entry in results["onnx_agreement_with_torch"].items():
        validation = entry["validation"]
        agreement = validation["decision_agreement"]
        lines.append(f"- onnx {variant}: max |p - p_torch| {entry['max_abs_probability_diff']:.2e}; validation "
                     f"decisions agreeing with torch {'n/a' if agreement is None else f'{agreement:.2%}'} of "
                     f"{validation['texts']} (measured at export, on that machine)")
    machine = results["machine"]
    lines += ["", f"Machine: {machine['processor']}, {machine['platform']}, torch {machine['torch']}."]
    return "\n".join(lines) + "\n"


def plot_latencies(times: dict[str, list[float]], target_ms: float = TARGET_P95_MS) -> bytes:
    """results.png: the per-prompt latency distribution of every variant (box plot, log scale), target line."""
    from ..plots import figure_to_png, pyplot

    plt = pyplot()
    names = list(times)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4.5))
    ax.boxplot([times[n] for n in names], whis=(5, 95), showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.axhline(target_ms, color="tab:red", linestyle="--", linewidth=1, label=f"target p95 {target_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylabel("ms per prompt (whiskers: p5-p95)")
    ax.set_title("Safety filter latency per prompt")
    ax.legend(loc="upper left")
    return figure_to_png(fig)


def prepare_safety_output_dir(output_dir: str | os.PathLike, model_dir: str | os.PathLike) -> Path:
    """The results folder: new, empty, or an earlier output of this benchmark, never the filter folder."""
    from ...training.checkpoints import prepare_output_dir

    return prepare_output_dir(output_dir, BENCH_SCRIPT, inputs={"--model_dir": model_dir})


def write_safety_latency(output_dir: str | os.PathLike, results: dict, times: dict[str, list[float]]) -> str:
    """results.json, results.md (returned) and results.png into `output_dir`, atomically."""
    from ...training.checkpoints import write_result_files

    table = markdown(results)
    write_result_files(output_dir, results, table, {"results.png": plot_latencies(times)})
    return table


__all__ = ["BENCH_SCRIPT", "CLASSIFIERS", "TARGET_P95_MS", "held_out_prompts", "latency_summary", "markdown",
           "plot_latencies", "prepare_safety_output_dir", "run_safety_latency", "safety_runners", "time_runners",
           "write_safety_latency"]
