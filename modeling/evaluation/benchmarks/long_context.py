"""Long-context prefill measurements: lightarch's block-local windowed attention against mask-only sliding windows
and Mistral (`scripts/bench_long_context.py`; `long_context_report` renders the results).

For each prompt length n it measures the wall time, process CPU time and peak memory of one prefill
(`torch.no_grad()`, batch 1, random token ids, `use_cache=True`, `logits_to_keep=1`). With `isolation="subprocess"`
every (variant, n) measurement runs in a fresh Python process (`python -m lightarch.evaluation.benchmarks.long_context
SPEC`), so its peak RSS belongs to that measurement alone, and the process is killed at the time or memory limit.

Model families and variants (the same weights within a family, from one seed):

- `hybrid` = `SparseMoeConfig.from_preset("hybrid-long")` (5 sliding : 1 global layer, MoE): `windowed` (lightarch
  block-local sliding windows, chunked prefill), `mask` (`sliding_window_implementation="mask"`, a full n x n sliding
  mask as transformers does, no chunked prefill), `full` (every layer `"full_attention"`, chunked prefill);
- `dense` = the same sizes with dense MLPs and a sliding window on *every* layer, the only layout transformers'
  Mistral can express: `windowed`, `mask`, and `mistral` (`MistralForCausalLM` from `to_transformers` of the
  `windowed` model, identical weights, sdpa);
- `streaming` = `from_preset("streaming")` (all sliding + attention sinks): peak memory and KV-cache size by n.

The end-to-end run prefills a long prompt on `hybrid-long` and greedily generates with `model.generate`: total
seconds, time to first token, decoding tokens/s and peak RSS.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging

from ...configuration import SparseMoeConfig
from ...interop import to_transformers
from ...modeling_sparse_moe import SparseMoeForCausalLM
from ...training.cli import available_cpus, known_config_fields, other_running_processes, parse_config_overrides
from .long_context_report import cell_text, load_end_to_end, targets
from .machine import machine_info

logger = logging.get_logger(__name__)

FAMILIES = {
    "hybrid": ("windowed", "mask", "full"),
    "dense": ("windowed", "mask", "mistral"),
    "streaming": ("windowed",),
}
FAMILY_DESCRIPTIONS = {
    "hybrid": "hybrid-long preset: 5 sliding : 1 global layer, MoE feed-forward",
    "dense": "dense MLPs, sliding window on every layer (the layout Mistral can express)",
    "streaming": "streaming preset: all sliding + attention sinks",
}
VARIANT_DESCRIPTIONS = {
    "windowed": "lightarch block-local windowed sliding attention + chunked prefill",
    "mask": "mask-only sliding window (n x n mask, as transformers), no chunked prefill",
    "full": "every layer full attention (chunked prefill)",
    "mistral": "transformers MistralForCausalLM, converted weights (to_transformers)",
}
MB = 1024 * 1024


def family_config(family: str, variant: str, overrides: dict) -> SparseMoeConfig:
    """The config of one family / variant (`mistral` returns the lightarch config it is converted from)."""
    overrides = dict(overrides)
    preset = "streaming" if family == "streaming" else "hybrid-long"
    values = {**SparseMoeConfig.presets()[preset], **overrides}
    layers = values["num_hidden_layers"]
    if "layer_types" not in overrides:
        if family == "hybrid":
            values["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
        else:
            values["layer_types"] = ["sliding_attention"] * layers
    if family == "dense":
        values["first_k_dense_layers"] = layers
    if family != "streaming":
        values["max_position_embeddings"] = max(values.get("max_position_embeddings", 0), 262_144)
    if variant == "mask":
        values.update(sliding_window_implementation="mask", prefill_chunk_size=None)
    elif variant == "full":
        values["layer_types"] = ["full_attention"] * layers
    return SparseMoeConfig(**values)


def build_model(family: str, variant: str, overrides: dict, seed: int) -> torch.nn.Module:
    """The model of one family / variant, in eval mode, its weights drawn from `seed` (the same within a family)."""
    torch.manual_seed(seed)
    config = family_config(family, variant, overrides)
    model = SparseMoeForCausalLM(config)
    if variant == "mistral":
        model = to_transformers(model, "mistral")
    return model.eval()


def parse_overrides(text: str) -> dict:
    """`--config_overrides` (applied to every family's config) -> dict, with an error naming the option."""
    try:
        overrides = parse_config_overrides(text)
    except ValueError as error:
        raise ValueError(f"--config_overrides: {error}") from None
    unknown = sorted(set(overrides) - known_config_fields(SparseMoeConfig))
    if unknown:
        raise ValueError(f"--config_overrides: SparseMoeConfig has no field {', '.join(map(repr, unknown))}.")
    return overrides


def variant_names(families: Sequence[str], variants: Sequence[str] = ()) -> list[str]:
    """'family/variant' names to run: every variant of `families`, or only `variants` among them."""
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"--families: unknown {family!r}; choose from {list(FAMILIES)}")
    names = [f"{family}/{variant}" for family in families for variant in FAMILIES[family]]
    unknown = [name for name in variants if name not in names]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; available: {names}")
    return [name for name in names if name in variants] if variants else names


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / MB
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss()` (Linux VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0), so the peak of a measurement excludes
    model construction and imports. Returns False where this is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cached_tokens(cache) -> int | None:
    """Tokens held by the KV cache, summed over layers (sinks + window for streaming layers)."""
    if cache is None or not hasattr(cache, "layers"):
        return None
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "cached_tokens"):
            total += layer.cached_tokens()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.shape[-2]
    return total


class _Timestamps(StoppingCriteria):
    """Records the time at which each generated token is produced (never stops generation)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def measure(spec: dict) -> dict:
    """One measurement (call it in a fresh process for a meaningful peak RSS). `spec` keys: family, variant, n,
    kind ('prefill' | 'generate'), overrides, seed, num_threads, new_tokens."""
    torch.set_num_threads(spec["num_threads"])
    model = build_model(spec["family"], spec["variant"], spec["overrides"], spec["seed"])
    vocab_size = model.config.vocab_size
    generator = torch.Generator().manual_seed(spec["seed"] + spec["n"])
    with torch.no_grad():  # warm-up: kernels, allocator, lazy imports
        model(torch.randint(0, vocab_size, (1, min(spec["n"], 64)), generator=generator), use_cache=True,
              logits_to_keep=1)
    input_ids = torch.randint(0, vocab_size, (1, spec["n"]), generator=generator)
    if spec.get("isolated", True):  # in a big shared process (tests) a full collection costs seconds
        gc.collect()
    baseline_rss = current_rss_mb()
    result = {"baseline_rss_mb": baseline_rss, "peak_rss_before_mb": peak_rss_mb(),
              # without a reset the peak may be the one of model construction (then it over-states this run)
              "peak_reset": spec.get("isolated", True) and reset_peak_rss()}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start, start = usage.ru_utime + usage.ru_stime, time.perf_counter()
    with torch.no_grad():
        if spec["kind"] == "generate":
            stamps = _Timestamps()
            output = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=spec["new_tokens"],
                min_new_tokens=spec["new_tokens"], do_sample=False, stopping_criteria=StoppingCriteriaList([stamps]),
                return_dict_in_generate=True, pad_token_id=0,
            )
            seconds = time.perf_counter() - start
            generated = output.sequences.shape[1] - spec["n"]
            first, last = stamps.times[0], stamps.times[-1]
            result.update(
                generated_tokens=generated,
                time_to_first_token_s=first - start,
                decode_tokens_per_s=(len(stamps.times) - 1) / (last - first) if len(stamps.times) > 1 else None,
                cached_tokens=cached_tokens(getattr(output, "cache", None)),
            )
        else:
            output = model(input_ids, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - start
            assert output.logits.shape[1] == 1 and torch.isfinite(output.logits).all()
            result["cached_tokens"] = cached_tokens(getattr(output, "cache", None))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = peak_rss_mb()
    result.update(
        status="ok",
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime - cpu_start,
        peak_rss_mb=peak,
        rss_increase_mb=max(0.0, peak - baseline_rss),
        tokens_per_s=spec["n"] / seconds,
    )
    return result


def _memory_error(text: str) -> bool:
    return any(marker in text for marker in ("can't allocate memory", "MemoryError", "out of memory",
                                             "not enough memory", "std::bad_alloc"))


def run_in_subprocess(spec: dict, max_seconds: float, max_memory_mb: float) -> dict:
    """Run `measure(spec)` in a fresh interpreter (this module run with `-m`); kill it at the time or memory
    limit ("timeout", "OOM")."""
    import psutil

    command = [sys.executable, "-m", __name__, json.dumps(spec)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    load = os.getloadavg()[0]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        start = time.perf_counter()
        handle = psutil.Process(process.pid)
        killed, max_seen = None, 0.0
        while process.poll() is None:
            try:
                rss = handle.memory_info().rss / MB
            except psutil.Error:
                rss = 0.0
            max_seen = max(max_seen, rss)
            elapsed = time.perf_counter() - start
            if elapsed > max_seconds:
                killed = "timeout"
            elif rss > max_memory_mb:
                killed = "OOM"
            if killed:
                process.kill()
                break
            time.sleep(0.2)
        stdout, stderr = process.communicate()
    elapsed = time.perf_counter() - start
    if killed == "timeout":
        return {"status": "timeout", "detail": f"killed after {elapsed:.0f} s (> {max_seconds:.0f} s)",
                "load_average": load}
    if killed == "OOM":
        return {"status": "OOM", "detail": f"RSS reached {max_seen:.0f} MB (> {max_memory_mb:.0f} MB), killed",
                "load_average": load}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["load_average"] = load
            return result
    tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
    if _memory_error(stderr) or process.returncode in (-9, 137):
        return {"status": "OOM", "detail": tail[-300:], "load_average": load}
    return {"status": "error", "detail": f"exit code {process.returncode}: {tail[-300:]}", "load_average": load}


def run_in_process(spec: dict) -> dict:
    """`measure(spec)` in this process (fast, for tests): the peak RSS is not the measurement's own, no limits."""
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    try:
        result = measure(dict(spec, isolated=False))
    except (MemoryError, RuntimeError) as error:
        if not _memory_error(str(error)) and not isinstance(error, MemoryError):
            raise
        result = {"status": "OOM", "detail": str(error)[:300]}
    finally:
        torch.set_num_threads(threads)
    result["load_average"] = load
    result["isolated"] = False
    return result


def _power_law_exponent(points: list[tuple[int, float]], default: float) -> float:
    """Exponent of value ~ n^p from the last two points, clamped to [1, 2]; `default` without two points."""
    if len(points) < 2 or points[-2][1] <= 0 or points[-1][1] <= 0:
        return default
    (n0, v0), (n1, v1) = points[-2], points[-1]
    return min(2.0, max(1.0, math.log(v1 / v0) / math.log(n1 / n0)))


def skip_reason(history: list[tuple[int, dict]], n: int, max_seconds: float, max_memory_mb: float,
                predictive: bool = True) -> str | None:
    """Why a variant should not run at length n given its results at smaller lengths (None: run it): it failed
    before, or (`predictive`) its time or memory extrapolated from the two previous lengths passes a limit."""
    for previous_n, result in history:
        if result["status"] != "ok":
            return f"skipped ({result['status']} at n={previous_n})"
    if not predictive or not history:
        return None
    times = [(m, r["seconds"]) for m, r in history]
    memory = [(m, r["rss_increase_mb"]) for m, r in history]
    last_n = history[-1][0]
    predicted_seconds = times[-1][1] * (n / last_n) ** _power_law_exponent(times, 1.0)
    if predicted_seconds > max_seconds:
        return f"skipped (predicted {predicted_seconds:.0f} s > {max_seconds:.0f} s, from n={last_n})"
    base = history[-1][1]["baseline_rss_mb"]
    predicted_peak = base + memory[-1][1] * (n / last_n) ** _power_law_exponent(memory, 1.0)
    if predicted_peak > max_memory_mb:
        return f"skipped (predicted {predicted_peak:.0f} MB > {max_memory_mb:.0f} MB, from n={last_n})"
    return None


def summarise(runs: list[dict]) -> dict:
    """Median over the repeats of one (variant, n): the time is the median, the memory the maximum."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return dict(runs[-1], repeats=len(runs))
    summary = dict(ok[0])
    summary["seconds"] = statistics.median(r["seconds"] for r in ok)
    summary["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in ok)
    summary["tokens_per_s"] = summary["n"] / summary["seconds"] if "n" in summary else ok[0]["tokens_per_s"]
    summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    summary["rss_increase_mb"] = max(r["rss_increase_mb"] for r in ok)
    summary["all_seconds"] = [r["seconds"] for r in ok]
    summary["load_average"] = statistics.median(r["load_average"] for r in ok)
    summary["repeats"] = len(ok)
    return summary


def check_equivalence(overrides: dict, seed: int) -> dict:
    """Max |logit difference| of each variant against its family's `windowed` model on a prompt of 3 windows
    (the benchmark compares implementations of the same function, so they must agree first)."""
    differences = {}
    for family, variants in (("hybrid", ("mask",)), ("dense", ("mask", "mistral"))):
        reference_model = build_model(family, "windowed", overrides, seed)
        config = reference_model.config
        length = min(3 * config.sliding_window + 5, 2048)
        input_ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            reference = reference_model(input_ids, use_cache=True).logits
            for variant in variants:
                logits = build_model(family, variant, overrides, seed)(input_ids, use_cache=True).logits
                difference = (logits - reference).abs().max().item()
                if not difference < 1e-3:
                    raise AssertionError(f"{family}/{variant} logits differ from {family}/windowed by {difference:.3g}")
                differences[f"{family}/{variant}"] = difference
    return differences


def default_memory_limit_mb() -> float:
    """60% of the memory available now, at most 12 GB: the RSS at which a measurement is killed by default."""
    import psutil

    return min(12_000.0, 0.6 * psutil.virtual_memory().available / MB)


def run_benchmark(
    lengths: Sequence[int],
    names: Sequence[str],
    overrides: dict | None = None,
    *,
    seed: int = 0,
    num_threads: int = 0,
    repeats: int = 3,
    repeat_up_to: int = 8192,
    max_seconds_per_run: float = 600.0,
    max_memory_mb: float = 0.0,
    predictive_skip: bool = True,
    isolation: str = "subprocess",
    end_to_end_length: int = 200_000,
    end_to_end_new_tokens: int = 32,
    end_to_end_max_seconds: float = 3600.0,
    output_dir: str | Path | None = None,
    on_progress: Callable[[dict], object] | None = None,
) -> dict:
    """Prefill of every variant in `names` ('family/variant', see `variant_names`) at every length, then the
    end-to-end generate run on hybrid-long (skipped when `end_to_end_length` is 0 or hybrid is not measured); the
    results dict that `long_context_report.write_results` renders.

    Lengths up to `repeat_up_to` are measured `repeats` times (separate processes, variants interleaved; the median
    time is kept). `num_threads` 0 = the available CPUs minus the other running processes; `max_memory_mb` 0 =
    `default_memory_limit_mb()`. `on_progress(partial_results)` is called after each length. Without an end-to-end
    run here, the end_to_end.json of a separate `run_end_to_end` in `output_dir` is included, if there is one.
    """
    if isolation not in ("subprocess", "inprocess"):
        raise ValueError(f"--isolation must be 'subprocess' or 'inprocess', got {isolation!r}")
    overrides = dict(overrides or {})
    lengths, names = sorted(set(lengths)), list(names)
    families = list(dict.fromkeys(name.split("/")[0] for name in names))
    repeats = max(1, repeats)
    others_at_start = other_running_processes()
    num_threads = num_threads or max(1, available_cpus() - others_at_start)
    max_memory_mb = max_memory_mb if max_memory_mb > 0 else default_memory_limit_mb()
    arguments = {"seed": seed, "repeats": repeats, "repeat_up_to": repeat_up_to,
                 "max_seconds_per_run": max_seconds_per_run, "predictive_skip": predictive_skip,
                 "end_to_end_length": end_to_end_length, "end_to_end_new_tokens": end_to_end_new_tokens,
                 "config_overrides": overrides}

    equivalence = check_equivalence(overrides, seed) if {"hybrid", "dense"} & set(families) else {}
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * available_cpus():
        logger.warning(f"Load average {load_before[0]:.1f} on {available_cpus()} CPUs: other processes compete for "
                       "the CPU, so wall times are inflated and noisy (cpu_seconds are reported too).")

    def execute(spec: dict) -> dict:
        if isolation == "inprocess":
            return run_in_process(spec)
        return run_in_subprocess(spec, max_seconds_per_run, max_memory_mb)

    configs = {family: family_config(family, "windowed", overrides).to_diff_dict() for family in families}

    def report(end_to_end: dict | None, complete: bool) -> dict:
        env = machine_info(num_threads)
        env.update(load_average_before=list(load_before), load_average_after=list(os.getloadavg()),
                   max_memory_mb=max_memory_mb, isolation=isolation,
                   other_running_processes_at_start=others_at_start)
        return {
            "complete": complete,
            "arguments": arguments,
            "lengths": lengths,
            "environment": env,
            "families": {family: FAMILY_DESCRIPTIONS[family] for family in families},
            "variants": {name: VARIANT_DESCRIPTIONS[name.split("/")[1]] for name in names},
            "configs": configs,
            "equivalence_max_abs_logit_diff": equivalence,
            "prefill": results,
            "end_to_end_generate": end_to_end,
            "targets": targets(results, lengths, end_to_end, configs),
        }

    base_spec = {"overrides": overrides, "seed": seed, "num_threads": num_threads, "new_tokens": 0,
                 "kind": "prefill"}
    results: dict[str, dict[str, dict]] = {name: {} for name in names}
    history: dict[str, list[tuple[int, dict]]] = {name: [] for name in names}
    total = sum((repeats if n <= repeat_up_to else 1) * len(names) for n in lengths)
    with tqdm(total=total, desc="bench_long_context", unit="run", file=sys.stderr) as progress:
        for n in lengths:
            reps = repeats if n <= repeat_up_to else 1
            todo = {}
            for name in names:
                reason = skip_reason(history[name], n, max_seconds_per_run, max_memory_mb, predictive_skip)
                if reason:
                    results[name][str(n)] = {"status": "skipped", "detail": reason}
                    progress.update(reps)
                else:
                    todo[name] = []
            for rep in range(reps):
                # no point repeating a failure; rotate the order so no variant always runs first
                order = [name for name, runs in todo.items() if all(r["status"] == "ok" for r in runs)]
                shift = rep % max(1, len(order))
                for name in order[shift:] + order[:shift]:
                    family, variant = name.split("/")
                    progress.set_postfix_str(f"{name} n={n}")
                    result = execute(dict(base_spec, family=family, variant=variant, n=n))
                    result["n"] = n
                    todo[name].append(result)
                    progress.update(1 if result["status"] == "ok" else reps - rep)
            for name, runs in todo.items():
                summary = summarise(runs)
                results[name][str(n)] = summary
                history[name].append((n, summary))
            logger.info(f"n={n}: " + ", ".join(f"{name} {cell_text(results[name][str(n)])}" for name in names))
            if on_progress is not None:  # partial results, so a long run that dies still leaves its numbers
                on_progress(report(None, complete=False))

    if end_to_end_length > 0 and "hybrid" in families:
        end_to_end = run_end_to_end(overrides, end_to_end_length, end_to_end_new_tokens, seed=seed,
                                    num_threads=num_threads, max_seconds=end_to_end_max_seconds,
                                    max_memory_mb=max_memory_mb, isolation=isolation)
    else:  # measured by a separate `run_end_to_end` into the same folder, if any
        end_to_end = load_end_to_end(output_dir) if output_dir else None
    return report(end_to_end, complete=True)


def run_end_to_end(overrides: dict, n: int, new_tokens: int, *, seed: int = 0, num_threads: int = 0,
                   max_seconds: float = 3600.0, max_memory_mb: float = 0.0, isolation: str = "subprocess") -> dict:
    """hybrid-long: prefill of `n` random tokens + greedy `generate` of `new_tokens`: total seconds, time to first
    token, decoding tokens/s, peak RSS, KV-cache tokens."""
    num_threads = num_threads or max(1, available_cpus() - other_running_processes())
    spec = {"overrides": overrides, "seed": seed, "num_threads": num_threads, "family": "hybrid",
            "variant": "windowed", "n": n, "kind": "generate", "new_tokens": new_tokens}
    logger.info(f"End-to-end: hybrid-long prefill of {n} tokens + {new_tokens} generated tokens")
    if isolation == "inprocess":
        result = run_in_process(spec)
    else:
        result = run_in_subprocess(spec, max_seconds, max_memory_mb if max_memory_mb > 0 else default_memory_limit_mb())
    result.update(n=n, new_tokens=new_tokens, torch_num_threads=num_threads)
    return result


if __name__ == "__main__":  # one isolated measurement: `python -m lightarch.evaluation.benchmarks.long_context SPEC`
    print("RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
