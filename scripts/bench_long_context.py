#!/usr/bin/env python
"""Long-context prefill: lightarch's block-local windowed attention against mask-only sliding windows and Mistral.

For each prompt length n (default 1K ... 200K tokens) it measures the wall time and peak memory of one prefill
(`torch.no_grad()`, batch 1, random token ids, `use_cache=True`, `logits_to_keep=1`). Every (variant, n)
measurement runs in a fresh Python process (this script re-invoked with `--single`), so the peak RSS (`ru_maxrss`)
belongs to that measurement alone; both the absolute peak and the increase over the RSS after model creation are
reported.

Model families and variants (the same weights within a family, from one seed):

- `hybrid` = `SparseMoeConfig.from_preset("hybrid-long")` (5 sliding : 1 global layer, MoE):
    - `windowed`:  lightarch block-local sliding windows, chunked prefill (`prefill_chunk_size` of the preset);
    - `mask`:      `sliding_window_implementation="mask"` (a full n x n sliding mask, what transformers does),
                   no chunked prefill;
    - `full`:      every layer `"full_attention"` (otherwise as `windowed`: chunked prefill, LSE merge).
- `dense` = the same sizes with dense MLPs and a sliding window on *every* layer: the only layout transformers'
  Mistral can express, so the Mistral comparison is apples to apples:
    - `windowed`, `mask` as above;
    - `mistral`:   `MistralForCausalLM` from `to_transformers` of the `windowed` model (identical weights), sdpa.
- `streaming` = `from_preset("streaming")` (all sliding + attention sinks): peak memory and KV-cache size (tokens
  held after prefill) by n.

Finally the 200K end-to-end run: the hybrid-long preset prefills a 200,000-token prompt and greedily generates 32
tokens with `model.generate`; total seconds, time to first token, decoding tokens/s and peak RSS are reported.

Limits: a run is killed after `--max_seconds_per_run` ("timeout") or when its RSS exceeds `--max_memory_mb`
("OOM"); a variant that failed at some n is not run at larger n, and (unless `--no_predictive_skip`) neither is
one whose time or memory extrapolated from the two previous lengths would exceed the limits ("skipped").

Outputs in --output_dir: results.json, results.md (tables, targets) and results.png (log-log time and memory).

    python scripts/bench_long_context.py --quick          # 1K..8K, ~a few minutes
    python scripts/bench_long_context.py                  # full size, about an hour or more on 2 CPU cores
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import HfArgumentParser, StoppingCriteria, StoppingCriteriaList  # noqa: E402
from transformers.utils import logging  # noqa: E402

import lightarch  # noqa: E402,F401  (registers the Auto classes)
from lightarch import SparseMoeConfig  # noqa: E402
from lightarch.configuration.configuration_sparse_moe import SPARSE_MOE_PRESETS  # noqa: E402
from lightarch import SparseMoeForCausalLM, to_transformers  # noqa: E402
from lightarch.training.cli import available_cpus, other_running_processes, parse_config_overrides
from lightarch.evaluation.plots import figure_to_png, pyplot
from lightarch.training.checkpoints import write_atomically

logger = logging.get_logger("bench_long_context")

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
DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768,65536,131072,200000"
QUICK_LENGTHS = "1024,2048,4096,8192"
MB = 1024 * 1024


@dataclass
class BenchArguments:
    lengths: str = field(
        default=DEFAULT_LENGTHS,
        metadata={"help": "Comma-separated prompt lengths in tokens; a 'K' suffix means x1024 (e.g. '1K,32K,200000')."},
    )
    quick: bool = field(
        default=False,
        metadata={"help": f"Short run: lengths {QUICK_LENGTHS} (unless --lengths is given), 1 repeat, and the "
                          "end-to-end generate run at 8192 tokens instead of 200,000."},
    )
    families: str = field(
        default="hybrid,dense,streaming",
        metadata={"help": f"Which model families to run, comma-separated, from {list(FAMILIES)}."},
    )
    variants: str = field(
        default="",
        metadata={"help": "Restrict to these family/variant names (comma-separated, e.g. 'dense/windowed,dense/mask'); "
                          "empty runs every variant of the chosen families."},
    )
    config_overrides: str = field(
        default="",
        metadata={"help": "Fields applied to every family's config, 'key=value,key=value' (JSON values), e.g. a tiny "
                          "model 'hidden_size=32,intermediate_size=64,moe_intermediate_size=16,num_attention_heads=2,"
                          "num_key_value_heads=1,vocab_size=128,sliding_window=64,prefill_chunk_size=128'. Changing "
                          "num_hidden_layers re-derives each family's layer_types."},
    )
    generate_length: int = field(
        default=200_000,
        metadata={"help": "Prompt tokens of the end-to-end `generate` run of the hybrid-long preset; 0 skips it."},
    )
    generate_new_tokens: int = field(default=32, metadata={"help": "Tokens generated (greedy) in the end-to-end run."})
    generate_max_seconds: float = field(
        default=3600.0, metadata={"help": "Time limit of the end-to-end run (it includes a 200K-token prefill)."}
    )
    max_seconds_per_run: float = field(
        default=600.0, metadata={"help": "A prefill measurement taking longer is killed and reported as 'timeout'."}
    )
    max_memory_mb: float = field(
        default=0.0,
        metadata={"help": "A measurement whose RSS exceeds this is killed and reported as 'OOM'. 0 = 60%% of the "
                          "memory available when the benchmark starts, at most 12000."},
    )
    no_predictive_skip: bool = field(
        default=False,
        metadata={"help": "Run every length until a real timeout / OOM, instead of skipping a length whose time or "
                          "memory, extrapolated from the two previous lengths (power law), exceeds the limits."},
    )
    repeats: int = field(
        default=3, metadata={"help": "Measurements (separate processes, variants interleaved) per short length; "
                                     "the median time is reported."}
    )
    repeat_up_to: int = field(
        default=8192, metadata={"help": "Lengths above this are measured once (a single run takes long enough)."}
    )
    num_threads: int = field(
        default=0,
        metadata={"help": "torch threads per measurement; 0 = the available CPUs minus the other processes running "
                          "at start (at least 1): on a busy machine, threads that wait for each other at every op "
                          "make small ops hundreds of times slower."},
    )
    isolation: str = field(
        default="subprocess",
        metadata={"help": "'subprocess': each measurement in a fresh process (true peak RSS, enforced limits); "
                          "'inprocess': all in this process (fast, for tests; peak RSS is then not per measurement "
                          "and limits are not enforced)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for weights and token ids."})
    output_dir: str = field(
        default="outputs/bench_long_context", metadata={"help": "Where results.json, results.md, results.png go."}
    )
    only_end_to_end: bool = field(
        default=False,
        metadata={"help": "Run only the end-to-end generate measurement and write end_to_end.json into --output_dir "
                          "(a sweep run with --generate_length 0 into the same folder, or --render_only, includes "
                          "it in results.md). Lets the long 200K run go in parallel with the sweep."},
    )
    render_only: bool = field(
        default=False,
        metadata={"help": "Measure nothing: re-render results.md / results.png from results.json (and "
                          "end_to_end.json) in --output_dir."},
    )
    single: str = field(
        default="",
        metadata={"help": "Internal: run one measurement described by this JSON and print its result (used by the "
                          "subprocess isolation)."},
    )


# ------------------------------------------------------------------------------------------------------- configs


def parse_lengths(text: str) -> list[int]:
    lengths = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        value = int(float(item[:-1]) * 1024) if item.endswith("K") else int(item)
        if value < 1:
            raise ValueError(f"--lengths: every length must be >= 1, got {item!r}")
        lengths.append(value)
    if not lengths:
        raise ValueError("--lengths is empty")
    return sorted(set(lengths))


def parse_overrides(text: str) -> dict:
    try:
        return parse_config_overrides(text)
    except ValueError as error:
        raise ValueError(f"--config_overrides: {error}") from None


def family_config(family: str, variant: str, overrides: dict) -> SparseMoeConfig:
    """The config of one family / variant (`mistral` returns the lightarch config it is converted from)."""
    overrides = dict(overrides)
    preset = "streaming" if family == "streaming" else "hybrid-long"
    values = {**SPARSE_MOE_PRESETS[preset], **overrides}
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
    torch.manual_seed(seed)
    config = family_config(family, variant, overrides)
    model = SparseMoeForCausalLM(config)
    if variant == "mistral":
        model = to_transformers(model, "mistral")
    return model.eval()


# --------------------------------------------------------------------------------------------------- measuring


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
    """Run `measure(spec)` in a fresh interpreter; kill it at the time or memory limit."""
    import psutil

    command = [sys.executable, str(Path(__file__).resolve()), "--single", json.dumps(spec)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    load = os.getloadavg()[0]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=PROJECT_ROOT) as process:
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


# ---------------------------------------------------------------------------------------------------- schedule


def _power_law_exponent(points: list[tuple[int, float]], default: float) -> float:
    """Exponent of value ~ n^p from the last two points, clamped to [1, 2]; `default` without two points."""
    if len(points) < 2 or points[-2][1] <= 0 or points[-1][1] <= 0:
        return default
    (n0, v0), (n1, v1) = points[-2], points[-1]
    return min(2.0, max(1.0, math.log(v1 / v0) / math.log(n1 / n0)))


def skip_reason(history: list[tuple[int, dict]], n: int, args: BenchArguments, max_memory_mb: float) -> str | None:
    """Why variant should not run at length n given its results at smaller lengths (None: run it)."""
    for previous_n, result in history:
        if result["status"] != "ok":
            return f"skipped ({result['status']} at n={previous_n})"
    if args.no_predictive_skip or not history:
        return None
    times = [(m, r["seconds"]) for m, r in history]
    memory = [(m, r["rss_increase_mb"]) for m, r in history]
    last_n = history[-1][0]
    predicted_seconds = times[-1][1] * (n / last_n) ** _power_law_exponent(times, 1.0)
    if predicted_seconds > args.max_seconds_per_run:
        return f"skipped (predicted {predicted_seconds:.0f} s > {args.max_seconds_per_run:.0f} s, from n={last_n})"
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


def _available_memory_mb() -> float:
    import psutil

    return psutil.virtual_memory().available / MB


def environment(num_threads: int) -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "available_cpus": available_cpus(),
        "torch_num_threads": num_threads,
    }


def run(args: BenchArguments, on_progress=None) -> dict:
    """Run every measurement; `on_progress(partial_results)` is called after each length."""
    if args.isolation not in ("subprocess", "inprocess"):
        raise ValueError(f"--isolation must be 'subprocess' or 'inprocess', got {args.isolation!r}")
    lengths = parse_lengths(QUICK_LENGTHS if args.quick and args.lengths == DEFAULT_LENGTHS else args.lengths)
    overrides = parse_overrides(args.config_overrides)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"--families: unknown {family!r}; choose from {list(FAMILIES)}")
    names = [f"{family}/{variant}" for family in families for variant in FAMILIES[family]]
    if args.variants:
        wanted = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; available: {names}")
        names = [name for name in names if name in wanted]
    repeats = 1 if args.quick else max(1, args.repeats)
    generate_length = min(args.generate_length, 8192) if args.quick else args.generate_length
    others_at_start = other_running_processes()
    num_threads = args.num_threads or max(1, available_cpus() - others_at_start)
    max_memory_mb = args.max_memory_mb
    if max_memory_mb <= 0:
        max_memory_mb = min(12_000.0, 0.6 * _available_memory_mb())

    equivalence = check_equivalence(overrides, args.seed) if any(n.split("/")[0] in ("hybrid", "dense")
                                                                    for n in names) else {}
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * available_cpus():
        logger.warning(f"Load average {load_before[0]:.1f} on {available_cpus()} CPUs: other processes compete for "
                       "the CPU, so wall times are inflated and noisy (cpu_seconds are reported too).")

    def execute(spec: dict, max_seconds: float) -> dict:
        if args.isolation == "inprocess":
            return run_in_process(spec)
        return run_in_subprocess(spec, max_seconds, max_memory_mb)

    configs = {family: family_config(family, "windowed", overrides).to_diff_dict() for family in families}

    def report(end_to_end: dict | None, complete: bool) -> dict:
        env = environment(num_threads)
        env.update(load_average_before=list(load_before), load_average_after=list(os.getloadavg()),
                   max_memory_mb=max_memory_mb, isolation=args.isolation,
                   other_running_processes_at_start=others_at_start)
        return {
            "complete": complete,
            "arguments": asdict(args),
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

    base_spec = {"overrides": overrides, "seed": args.seed, "num_threads": num_threads, "new_tokens": 0,
                 "kind": "prefill"}
    results: dict[str, dict[str, dict]] = {name: {} for name in names}
    history: dict[str, list[tuple[int, dict]]] = {name: [] for name in names}
    total = sum((repeats if n <= args.repeat_up_to else 1) * len(names) for n in lengths)
    with tqdm(total=total, desc="bench_long_context", unit="run", file=sys.stderr) as progress:
        for n in lengths:
            reps = repeats if n <= args.repeat_up_to else 1
            todo = {}
            for name in names:
                reason = skip_reason(history[name], n, args, max_memory_mb)
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
                    spec = dict(base_spec, family=family, variant=variant, n=n)
                    result = execute(spec, args.max_seconds_per_run)
                    result["n"] = n
                    todo[name].append(result)
                    progress.update(1 if result["status"] == "ok" else reps - rep)
            for name, runs in todo.items():
                summary = summarise(runs)
                results[name][str(n)] = summary
                history[name].append((n, summary))
            logger.info(f"n={n}: " + ", ".join(f"{name} {_cell(results[name][str(n)])}" for name in names))
            if on_progress is not None:  # partial results, so a long run that dies still leaves its numbers
                on_progress(report(None, complete=False))

    end_to_end = None
    if generate_length > 0 and "hybrid" in families:
        end_to_end = run_end_to_end(args, generate_length, num_threads, max_memory_mb)
    else:  # measured by a separate `--only_end_to_end` run into the same folder, if any
        end_to_end = load_end_to_end(Path(args.output_dir))

    return report(end_to_end, complete=True)


def run_end_to_end(args: BenchArguments, generate_length: int, num_threads: int, max_memory_mb: float) -> dict:
    """hybrid-long: prefill of `generate_length` random tokens + greedy `generate` of --generate_new_tokens."""
    spec = {"overrides": parse_overrides(args.config_overrides), "seed": args.seed, "num_threads": num_threads,
            "family": "hybrid", "variant": "windowed", "n": generate_length, "kind": "generate",
            "new_tokens": args.generate_new_tokens}
    logger.info(f"End-to-end: hybrid-long prefill of {generate_length} tokens + {args.generate_new_tokens} "
                "generated tokens")
    if args.isolation == "inprocess":
        result = run_in_process(spec)
    else:
        result = run_in_subprocess(spec, args.generate_max_seconds, max_memory_mb)
    result.update(n=generate_length, new_tokens=args.generate_new_tokens, torch_num_threads=num_threads)
    return result


def load_end_to_end(output_dir: Path) -> dict | None:
    path = output_dir / "end_to_end.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    result["separate_run"] = True
    return result


# ------------------------------------------------------------------------------------------------------ report


def targets(results: dict, lengths: list[int], end_to_end: dict | None, configs: dict) -> dict:
    """Ratios and flatness checks the markdown states against the targets.

    Flatness is judged from the first length that fills a prefill chunk: below it the whole prompt is one chunk,
    so activations legitimately grow with n up to the chunk size.
    """
    out = {}
    at = 32768 if 32768 in lengths else max((n for n in lengths if n <= 32768), default=lengths[0])
    out["speedup_length"] = at
    for family in ("dense", "hybrid"):
        windowed = results.get(f"{family}/windowed", {}).get(str(at), {})
        mask = results.get(f"{family}/mask", {}).get(str(at), {})
        ratio = None
        if windowed.get("status") == "ok" and mask.get("status") == "ok":
            ratio = mask["seconds"] / windowed["seconds"]
        out[f"{family}_mask_over_windowed"] = ratio
        out[f"{family}_load_average"] = ([windowed.get("load_average"), mask.get("load_average")]
                                         if ratio is not None else None)
        out[f"{family}_mask_over_windowed_cpu"] = (mask["cpu_seconds"] / windowed["cpu_seconds"]
                                                   if ratio is not None else None)
        mistral = results.get(f"{family}/mistral", {}).get(str(at), {})
        if family == "dense":
            out["dense_mistral_over_windowed"] = (mistral["seconds"] / windowed["seconds"]
                                                  if ratio is not None and mistral.get("status") == "ok" else None)
    for name in ("dense/windowed", "streaming/windowed"):
        chunk_size = (configs.get(name.split("/")[0]) or {}).get("prefill_chunk_size") or 0
        rows = [(int(n), r) for n, r in results.get(name, {}).items() if r.get("status") == "ok"]
        rows = [(n, r) for n, r in rows if n >= chunk_size] or rows
        if len(rows) >= 2:
            (n0, first), (n1, last) = rows[0], rows[-1]
            out[f"{name}_memory"] = {
                "from_n": n0, "to_n": n1,
                "peak_rss_mb": [first["peak_rss_mb"], last["peak_rss_mb"]],
                "rss_increase_mb": [first["rss_increase_mb"], last["rss_increase_mb"]],
                "increase_growth_mb_per_1k_tokens": (last["rss_increase_mb"] - first["rss_increase_mb"])
                / ((n1 - n0) / 1000),
                "cached_tokens": [first.get("cached_tokens"), last.get("cached_tokens")],
            }
    if end_to_end and end_to_end.get("status") == "ok":
        out["end_to_end_peak_rss_under_4gb"] = end_to_end["peak_rss_mb"] < 4096
    return out


def _cell(result: dict) -> str:
    if not result:
        return "not measured"
    if result.get("status") == "ok":
        return f"{result['seconds']:.2f} s / {result['peak_rss_mb']:.0f} MB"
    if result.get("status") == "skipped":
        return result["detail"]
    return f"{result.get('status')} ({result.get('detail', '')})" if result.get("status") in ("error",) else (
        f"{result.get('status')}")


def _format_n(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def markdown(results: dict) -> str:
    env, lengths, runs = results["environment"], results["lengths"], results["prefill"]
    names = list(runs)
    lines = [
        "# Long-context prefill benchmark",
        "",
        f"One prefill (`torch.no_grad()`, batch 1, random ids, `use_cache=True`, `logits_to_keep=1`) per cell, "
        f"{'each in a fresh process' if env['isolation'] == 'subprocess' else 'all in one process (not isolated)'};"
        f" cells: median wall seconds / peak RSS of the process during the prefill (MB, absolute: model included; the "
        f"increase over the RSS after model creation is in the second table). torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['torch_num_threads']} threads on {env['available_cpus']} CPUs, load average "
        f"{env['load_average_before'][0]:.1f} at start / {env['load_average_after'][0]:.1f} at end; limits "
        f"{results['arguments']['max_seconds_per_run']:.0f} s and {env['max_memory_mb']:.0f} MB per run.",
        "",
        "Families: " + "; ".join(f"**{k}** = {v}" for k, v in results["families"].items()) + ".",
        "",
        "Variants: " + "; ".join(f"**{variant}** = {text}" for variant, text in
                                 {k.split("/")[1]: v for k, v in results["variants"].items()
                                  if not k.startswith("streaming")}.items()) + ".",
        "",
        "The Mistral comparison runs on the **dense** family: Mistral can only express dense layers with one sliding "
        "window on every layer, so `dense/windowed`, `dense/mask` and `dense/mistral` compute the same function "
        "with the same weights (max |logit difference| against windowed: "
        + ", ".join(f"{k} {v:.1e}" for k, v in results["equivalence_max_abs_logit_diff"].items()) + ").",
        "",
        "| n | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for n in lengths:
        lines.append(f"| {_format_n(n)} | " + " | ".join(_cell(runs[name].get(str(n), {})) for name in names) + " |")

    for note in results.get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += ["", "The same runs, process CPU seconds (all threads; steadier than wall time on a shared machine) / "
                  "RSS increase over the model (MB):", "",
              "| n | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for n in lengths:
        cells = []
        for name in names:
            row = runs[name].get(str(n), {})
            cells.append(f"{row['cpu_seconds']:.2f} s / +{row['rss_increase_mb']:.0f} MB" if row.get("status") == "ok"
                         else (row.get("status") or ""))
        lines.append(f"| {_format_n(n)} | " + " | ".join(cells) + " |")

    streaming = runs.get("streaming/windowed")
    if streaming:
        lines += ["", "Streaming preset (all sliding + sinks): KV cache after prefill, in tokens summed over layers "
                      "(sinks + window per layer):", "", "| n | cached tokens | peak RSS MB | RSS increase MB |",
                  "|---:|---:|---:|---:|"]
        for n in lengths:
            row = streaming.get(str(n), {})
            if row.get("status") == "ok":
                lines.append(f"| {_format_n(n)} | {row.get('cached_tokens')} | {row['peak_rss_mb']:.0f} | "
                             f"{row['rss_increase_mb']:.0f} |")
            elif row:
                lines.append(f"| {_format_n(n)} | {_cell(row)} | | |")

    e2e = results["end_to_end_generate"]
    if e2e:
        lines += ["", f"## End to end: hybrid-long, {e2e['n']:,}-token prompt + {e2e['new_tokens']} generated tokens "
                      "(`model.generate`, greedy)", ""]
        if e2e.get("separate_run"):
            lines += [f"Measured by a separate `--only_end_to_end` run (end_to_end.json; "
                      f"{e2e.get('torch_num_threads', '?')} threads, load average {e2e.get('load_average', 0):.1f} "
                      "at its start), concurrently with part of the sweep above.", ""]
        if e2e.get("status") == "ok":
            lines += [
                "| total s | time to first token s | decoding tokens/s | peak RSS MB | KV cache tokens |",
                "|---:|---:|---:|---:|---:|",
                f"| {e2e['seconds']:.1f} | {e2e['time_to_first_token_s']:.1f} | "
                f"{(e2e['decode_tokens_per_s'] or 0):.2f} | {e2e['peak_rss_mb']:.0f} | {e2e.get('cached_tokens')} |",
            ]
        else:
            lines.append(f"Did not complete: {e2e.get('status')} ({e2e.get('detail', '')}).")

    t = results["targets"]
    at = _format_n(t["speedup_length"])

    def ratio(value):
        return "n/a (a variant did not run at this length)" if value is None else f"{value:.2f}x"

    lines += ["", "## Targets", ""]
    # The verdict uses process CPU time (1 thread: the time on a dedicated core), which stays comparable when the
    # two runs saw different machine loads; wall-time ratios are shown with the load each run started at.
    dense_cpu = t.get("dense_mask_over_windowed_cpu")
    verdict = "" if dense_cpu is None else (" — **met**" if dense_cpu >= 4 else " — **not met**")

    def loads(family):
        values = t.get(f"{family}_load_average") or []
        return ("" if len(values) < 2 or None in values else
                f", wall-time ratio {t[f'{family}_mask_over_windowed']:.2f}x at load averages {values[1]:.1f} (mask) "
                f"/ {values[0]:.1f} (windowed)")

    lines.append(f"- At {at} tokens, lightarch sliding layers >= 4x faster than mask-only sliding: dense all-sliding "
                 f"mask/windowed CPU-time ratio = {ratio(dense_cpu)}{loads('dense')}{verdict}; hybrid (1 of 6 "
                 f"layers global, the same in both) CPU-time ratio = {ratio(t.get('hybrid_mask_over_windowed_cpu'))}"
                 f"{loads('hybrid')}; Mistral/windowed wall-time ratio = "
                 f"{ratio(t.get('dense_mistral_over_windowed'))}.")
    for name in ("dense/windowed", "streaming/windowed"):
        memory = t.get(f"{name}_memory")
        if memory:
            lines.append(
                f"- Memory flat in n from one prefill chunk on ({name}): peak RSS {memory['peak_rss_mb'][0]:.0f} MB at "
                f"{_format_n(memory['from_n'])} -> {memory['peak_rss_mb'][1]:.0f} MB at {_format_n(memory['to_n'])}"
                f" (increase over the model {memory['rss_increase_mb'][0]:.0f} -> {memory['rss_increase_mb'][1]:.0f} "
                f"MB, {memory['increase_growth_mb_per_1k_tokens']:.2f} MB per 1K tokens); KV cache "
                f"{memory['cached_tokens'][0]} -> {memory['cached_tokens'][1]} tokens.")
    if "end_to_end_peak_rss_under_4gb" in t:
        lines.append(f"- 200K end to end under 4 GB peak RSS: "
                     f"{'met' if t['end_to_end_peak_rss_under_4gb'] else 'not met'} "
                     f"({results['end_to_end_generate']['peak_rss_mb']:.0f} MB).")
    return "\n".join(lines) + "\n"


def plot(results: dict) -> bytes:
    plt = pyplot()
    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"windowed": "-o", "mask": "--s", "full": ":^", "mistral": "-.D"}
    colors = {"hybrid": "tab:blue", "dense": "tab:orange", "streaming": "tab:green"}
    for name, rows in results["prefill"].items():
        family, variant = name.split("/")
        ok = [(int(n), r) for n, r in rows.items() if r.get("status") == "ok"]
        if not ok:
            continue
        ns = [n for n, _ in ok]
        style = dict(color=colors.get(family), label=name, ms=4)
        ax_time.plot(ns, [r["cpu_seconds"] for _, r in ok], styles.get(variant, "-o"), **style)
        ax_memory.plot(ns, [r["peak_rss_mb"] for _, r in ok], styles.get(variant, "-o"), **style)
        failed = [(int(n), r) for n, r in rows.items() if r.get("status") in ("OOM", "timeout")]
        for n, r in failed:
            ax_time.annotate(r["status"], (n, ok[-1][1]["cpu_seconds"]), fontsize=7, color=colors.get(family))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax, title, label in ((ax_time, "Prefill time (process CPU seconds: steady under load;\n= wall time on a dedicated core with 1 thread)",
                              "CPU seconds"), (ax_memory, "Peak memory", "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(results["lengths"], [_format_n(n) for n in results["lengths"]], fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("prompt tokens n")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle("lightarch long-context prefill (batch 1, CPU)")
    fig.tight_layout()
    return figure_to_png(fig)


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), run, write results.{json,md,png}, print the markdown."""
    parser = HfArgumentParser(BenchArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if args.single:
        result = measure(json.loads(args.single))
        print("RESULT " + json.dumps(result), flush=True)
        return result
    logging.set_verbosity_info() if argv is None else None
    output_dir = Path(args.output_dir)
    if args.render_only:
        results = json.loads((output_dir / "results.json").read_text())
        if not results.get("end_to_end_generate"):
            results["end_to_end_generate"] = load_end_to_end(output_dir)
        results["targets"] = targets(results["prefill"], results["lengths"], results["end_to_end_generate"],
                                     results["configs"])
        text = write_results(output_dir, results)
        print(text)
        return results
    if args.only_end_to_end:
        length = min(args.generate_length, 8192) if args.quick else args.generate_length
        threads = args.num_threads or max(1, available_cpus() - other_running_processes())
        memory = args.max_memory_mb or min(12_000.0, 0.6 * _available_memory_mb())
        result = run_end_to_end(args, length, threads, memory)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(output_dir / "end_to_end.json", json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return result
    results = run(args, on_progress=lambda partial: write_results(output_dir, partial, with_plot=False))
    text = write_results(output_dir, results)
    print(text)
    return results


def write_results(output_dir: Path, results: dict, with_plot: bool = True) -> str:
    """results.json, results.md (and results.png), each written atomically; returns the markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    if not results.get("complete", True):
        text = "**Partial results: the benchmark is still running (or was interrupted).**\n\n" + text
    write_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(output_dir / "results.md", text)
    if with_plot:
        write_atomically(output_dir / "results.png", plot(results))
    return text


if __name__ == "__main__":
    main()
