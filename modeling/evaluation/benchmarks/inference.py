"""CPU inference benchmark of a lightarch model (`scripts/bench_inference.py`): latency per backend, batching
throughput, and online serving latency.

Latency, end to end (prefill + greedy decode), one request of `prompt_tokens` held-out tokens + `new_tokens`:

    torch_fp32          model.generate
    torch_int8          torch.ao dynamic int8 of the nn.Linear layers (experts stay fp32: they are 3D tensors)
    onnx_fp32           ONNX Runtime, lightarch.deploy.onnx.OrtDecoder on export_onnx_decoder's graph
    onnx_int8           the same graph after ONNX Runtime dynamic int8 quantization (router kept float)
    bnb_int8            bitsandbytes LLM.int8 (lightarch.deploy.bitsandbytes.load_quantized)

Each variant is timed in a block of its own (ONNX Runtime's and torch's idle threads spin, so alternating them slows
both); p50 / p95 are over all its runs. Throughput: requests with prompt lengths spread over a range, for each
workload of new tokens (every request generating the same number, or lengths spread over a range, as answers of a
real service end at different points): padded `generate` in batches of each batch size (arrival order; a batch runs
until its longest request is done) against one warm continuous-batching manager (paged cache sized by
lightarch.deploy.serving.cpu_continuous_batching_config) running in a process of its own, as a server would; the
speed-up is over the fastest padded batch size. The padding bound (token positions padded / real) is the most
continuous batching could gain if compute were the only cost. Online serving: the requests arrive over time at each
rate (Poisson), served by a static-batching server and by continuous batching; the latency from arrival to last
token is compared. Greedy outputs are compared everywhere.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList)

from ...configuration import SparseMoeConfig
from ...data.corpus import heldout_texts, heldout_token_stream
from ...deploy.bitsandbytes import bnb_quantization_config, load_quantized, memory_report
from ...deploy.onnx import OrtDecoder, export_onnx_decoder, quantize_onnx_int8
from ...deploy.serving import cpu_continuous_batching_config, paged_cache_bytes
from ...training.checkpoints import check_output_dir, prepare_output_dir, write_atomically, write_result_files
from ...training.cli import available_cpus
from ..plots import figure_to_png, pyplot
from .machine import machine_info
from .workloads import check_sharegpt_options, sample_sharegpt_requests, serving_summary, slot_utilisation_bound

logger = logging.getLogger(__name__)
LATENCY_VARIANTS = ("torch_fp32", "torch_int8", "onnx_fp32", "onnx_int8", "bnb_int8")
TARGETS = {"onnx_int8_speedup": 1.7, "continuous_batching_speedup": 2.0, "p50_ms": 120.0}
CB_ATTN_IMPLEMENTATIONS = ("sdpa", "paged|eager")  # what continuous batching runs with on CPU


@dataclass(frozen=True)
class ThroughputSettings:
    """The throughput and online tests' workload and continuous-batching sizes (picklable: the continuous-batching
    worker gets it in its own process)."""

    requests: int
    min_prompt: int
    max_prompt: int
    padded_batch_sizes: tuple[int, ...]
    rounds: int  # timed repetitions of each mode
    cb_max_batch_tokens: int
    cb_page_size: int
    cb_attn_implementation: str
    seed: int
    cb_max_concurrent: int = 0  # requests the paged cache holds at once; 0 = every request
    online_load: float = 0.0  # > 0: the worker serves once more at this fraction of its measured capacity


def parse_variants(text: str) -> list[str]:
    """`--variants` 'torch_fp32,onnx_int8' -> the list (ValueError naming the option for an unknown one)."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants or any(v not in LATENCY_VARIANTS for v in variants):
        raise ValueError(f"--variants {text!r}: use a comma-separated subset of {LATENCY_VARIANTS}.")
    return variants


def check_inference_options(
    preset: str,
    variants: str,
    padded_batch_sizes: str,
    throughput_new_tokens: str,
    online_rates: str,
    online_workload: str,
    cb_attn_implementation: str,
    min_prompt: int,
    max_prompt: int,
) -> None:
    """Raise ValueError naming the option when the benchmark's options are inconsistent (before any model loads)."""
    parse_variants(variants)
    parse_batch_sizes(padded_batch_sizes)
    parse_rates(online_rates, online_workload, parse_workloads(throughput_new_tokens))
    if cb_attn_implementation not in CB_ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--cb_attn_implementation {cb_attn_implementation!r}: use one of {CB_ATTN_IMPLEMENTATIONS} "
                         "on CPU.")
    if preset not in SparseMoeConfig.presets():
        raise ValueError(f"--preset {preset!r} is unknown; choose one of {sorted(SparseMoeConfig.presets())}.")
    if not 1 <= min_prompt <= max_prompt:
        raise ValueError(f"Need 1 <= --min_prompt <= --max_prompt, got {min_prompt} and {max_prompt}.")


COUNT_OPTIONS = ("prompt_tokens", "new_tokens", "rounds", "prompts", "warmup", "throughput_requests",
                 "throughput_rounds", "cb_max_batch_tokens", "cb_page_size", "num_threads")


def run_counts(options: dict) -> dict[str, int]:
    """The integer options `check_inference_run` bounds, picked from the benchmark's options."""
    return {name: options[name] for name in COUNT_OPTIONS}


def check_inference_run(model_dir: str, output_dir: str, counts: dict[str, int], new_tokens: int, prompt_tokens: int,
                        max_prompt: int, throughput_new_tokens: str) -> None:
    """Raise ValueError naming the option, before any model loads, when `counts` (option name -> value: every one
    >= 1, `warmup` and `num_threads` >= 0) is out of range, `output_dir` may not be written (it is the model, or a
    foreign folder: `check_output_dir`), or the longest request exceeds the saved model's max_position_embeddings
    (read from its config.json only, when the folder has one: the script may train the model first)."""
    for name, value in counts.items():
        low = 0 if name in ("warmup", "num_threads") else 1
        if value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}.")
    check_output_dir(output_dir, BENCH_SCRIPT, inputs={"--model_dir": model_dir})
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return
    limit = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    longest_new = max([new_tokens] + [high for _, high in parse_workloads(throughput_new_tokens).values()])
    if max(prompt_tokens, max_prompt) + longest_new > limit:
        raise ValueError(f"--prompt_tokens / --max_prompt: prompts of up to {max(prompt_tokens, max_prompt)} tokens + "
                         f"{longest_new} new exceed the model's max_position_embeddings ({limit}); use shorter "
                         "prompts or fewer new tokens.")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def preset_differences(config, preset: str) -> dict:
    """`{field: (preset value, model value)}` where the loaded model does not follow the preset."""
    return {name: (value, getattr(config, name)) for name, value in SparseMoeConfig.presets()[preset].items()
            if getattr(config, name) != value}


def latency_runners(model, folder: Path, onnx_dir: Path, variants: Sequence[str], new_tokens: int,
                    num_threads: int = 0) -> tuple[dict, dict]:
    """(name -> callable(prompt (1, T) LongTensor) generating exactly `new_tokens` tokens, memory footprints).

    `folder` holds the saved model (bitsandbytes loads from it); the ONNX graphs are exported into `onnx_dir`.
    """
    new = new_tokens
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=model.config.pad_token_id or 0, eos_token_id=model.config.eos_token_id)
    runners, memory = {}, {"torch_fp32": memory_report(model)["total_bytes"]}

    def torch_runner(m):
        def run(prompt):
            with torch.inference_mode():
                return m.generate(prompt, generation_config=config)[0, prompt.shape[1]:].numpy()
        return run

    if "torch_fp32" in variants:
        runners["torch_fp32"] = torch_runner(model)
    if "torch_int8" in variants:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                               dtype=torch.qint8)
        runners["torch_int8"] = torch_runner(quantized)
    if "onnx_fp32" in variants or "onnx_int8" in variants:
        export_onnx_decoder(model, onnx_dir / "model.onnx")
        quantize_onnx_int8(onnx_dir / "model.onnx", onnx_dir / "model_int8.onnx")
        for name, file in (("onnx_fp32", "model.onnx"), ("onnx_int8", "model_int8.onnx")):
            if name in variants:
                decoder = OrtDecoder(onnx_dir / file, num_threads)
                runners[name] = (lambda d: lambda prompt: d.generate(prompt.numpy(), max_new_tokens=new,
                                                                     eos_token_id=-1)[0, prompt.shape[1]:])(decoder)
                memory[name + "_file"] = (onnx_dir / file).stat().st_size
    if "bnb_int8" in variants:
        bnb_model = load_quantized(folder, bnb_quantization_config(model.config, bits=8)).eval()
        runners["bnb_int8"] = torch_runner(bnb_model)
        memory["bnb_int8"] = memory_report(bnb_model)["total_bytes"]
        nf4 = load_quantized(folder, bnb_quantization_config(model.config, bits=4))
        memory["bnb_nf4"] = memory_report(nf4)["total_bytes"]
        del nf4
    return runners, memory


def measure_latency(runners: dict, prompts: list[torch.Tensor], rounds: int, warmup: int) -> dict:
    """Each variant timed in its own block (`warmup` untimed runs, then `rounds` rounds over the prompts).

    Blocks, not interleaved runs: ONNX Runtime's thread pool spins after a run, and torch's OpenMP threads wait for
    work the same way, so alternating the two back to back makes each pay for the other's idle threads (torch fp32
    measured 2x slower interleaved than alone).
    """
    reference = {i: runners["torch_fp32"](p) for i, p in enumerate(prompts)} if "torch_fp32" in runners else None
    results = {}
    for name, run in runners.items():
        for _ in range(warmup):
            run(prompts[0])
        agreement = None
        if reference is not None:
            agreement = float(np.mean([np.mean(run(p) == reference[i]) for i, p in enumerate(prompts)]))
        times = []
        for _ in range(rounds):
            for prompt in prompts:
                start = time.perf_counter()
                run(prompt)
                times.append(1000 * (time.perf_counter() - start))
        results[name] = {"p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95),
                         "mean_ms": statistics.fmean(times), "runs": len(times),
                         "greedy_agreement_with_torch_fp32": agreement}
    return results


def parse_batch_sizes(text: str) -> list[int]:
    """`--padded_batch_sizes` '8,32' -> [8, 32] (ValueError naming the option when not positive integers)."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--padded_batch_sizes {text!r}: give positive batch sizes, e.g. '8,32'.")
    return sizes


def parse_workloads(text: str) -> dict[str, tuple[int, int]]:
    """The --throughput_new_tokens workloads, validated: label ('N' or 'A-B') -> (A, B) new tokens, 1 <= A <= B."""
    workloads = {}
    for label in (w.strip() for w in text.split(",") if w.strip()):
        bounds = label.split("-")
        if not (1 <= len(bounds) <= 2 and all(b.isdigit() and int(b) >= 1 for b in bounds)
                and int(bounds[0]) <= int(bounds[-1])):
            raise ValueError(f"--throughput_new_tokens {text!r}: each workload is 'N' or 'A-B' "
                             "with 1 <= A <= B, e.g. '16,8-128'.")
        workloads[label] = (int(bounds[0]), int(bounds[-1]))
    if not workloads:
        raise ValueError("--throughput_new_tokens is empty; give e.g. '16,8-128'.")
    return workloads


def parse_rates(text: str, online_workload: str, workloads: dict) -> list[float]:
    """The validated --online_rates (requests per second); checks that `online_workload` is one of `workloads`."""
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        rates = [-1.0]
    if any(not 0 < r < 1e4 for r in rates):
        raise ValueError(f"--online_rates {text!r}: give positive requests per second, e.g. '4,8,16', "
                         "or '' to skip the online test.")
    if rates and online_workload not in workloads:
        raise ValueError(f"--online_workload {online_workload!r} is not one of --throughput_new_tokens "
                         f"{sorted(workloads)}.")
    return rates


def new_tokens_per_request(bounds: tuple[int, int], requests: int, rng: np.random.Generator) -> list[int]:
    """Per-request new-token counts spread evenly over `bounds`, in shuffled order."""
    lengths = np.linspace(*bounds, requests).astype(int)
    rng.shuffle(lengths)
    return [int(n) for n in lengths]


def throughput_requests(settings: ThroughputSettings, stream: list[int], bounds: tuple[int, int]
                        ) -> tuple[list[list[int]], list[int]]:
    """The workload: `settings.requests` held-out prompts of lengths spread over [min_prompt, max_prompt] in
    shuffled arrival order, and each request's number of new tokens (spread over `bounds`)."""
    rng = np.random.default_rng(settings.seed)
    lengths = np.linspace(settings.min_prompt, settings.max_prompt, settings.requests).astype(int)
    rng.shuffle(lengths)  # arrival order mixes short and long prompts
    starts = rng.integers(0, len(stream) - settings.max_prompt - 1, size=len(lengths))
    prompts = [stream[s : s + n] for s, n in zip(starts, lengths)]
    return prompts, new_tokens_per_request(bounds, len(prompts), rng)


def token_positions(prompts: list[list[int]], new_tokens: list[int], batch_size: int | None) -> int:
    """Token positions the forwards compute: padded `generate` in batches of `batch_size` (every row padded to the
    batch's longest prompt, and decoding until its longest request is done), or None = one position per real token
    (continuous batching). Their ratio is the most continuous batching can gain when compute, not per-forward
    overhead, is the cost."""
    if batch_size is None:
        return sum(len(p) for p in prompts) + sum(n - 1 for n in new_tokens)
    total = 0
    for i in range(0, len(prompts), batch_size):
        rows = prompts[i : i + batch_size]
        total += len(rows) * (max(map(len, rows)) + max(new_tokens[i : i + batch_size]) - 1)
    return total


class _StepClock(LogitsProcessor):
    """Stamps `time.perf_counter()` each time `generate` picks a token (the first call follows the prefill)."""

    def __init__(self, stamps: list[float]):
        self.stamps = stamps

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def padded_generate(model, prompts: list[list[int]], new_tokens: list[int],
                    stamps: list[float] | None = None) -> list[list[int]]:
    """One padded `generate` call on `prompts` (left padding) until the longest request is done; each row is cut to its
    own number of new tokens. `stamps`, when given, receives the perf_counter time of each generated position (token
    k of every row is picked at stamps[k]), for time to first token."""
    pad = model.config.pad_token_id or 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    longest = max(new_tokens)
    generation_config = GenerationConfig(max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                         pad_token_id=pad, eos_token_id=model.config.eos_token_id)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, generation_config=generation_config,
                             logits_processor=LogitsProcessorList([_StepClock(stamps)] if stamps is not None else []))
    return [row[:n] for row, n in zip(out[:, width:].tolist(), new_tokens)]


def measure_padded(model, prompts: list[list[int]], new_tokens: list[int], batch_sizes: Sequence[int],
                   rounds: int) -> dict:
    """Padded `generate` at each of `batch_sizes` (arrival order), interleaved round by round for `rounds` rounds after
    one untimed pass. A batch generates until its longest request is done."""

    def padded(batch_size: int) -> list[list[int]]:
        return [row for i in range(0, len(prompts), batch_size)
                for row in padded_generate(model, prompts[i : i + batch_size], new_tokens[i : i + batch_size])]

    modes = {f"padded_generate_bs{size}": size for size in batch_sizes}
    outputs = {name: padded(size) for name, size in modes.items()}  # untimed: warms every mode
    timings = {name: [] for name in modes}
    names = list(modes)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            padded(modes[name])
            timings[name].append(time.perf_counter() - start)
    return {"outputs": outputs, "timings": timings,
            "token_positions": {name: token_positions(prompts, new_tokens, size) for name, size in modes.items()}}


def arrival_times(rate: float, requests: int, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: a Poisson process of `rate` requests per second."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=requests)
    return [float(t) for t in np.cumsum(gaps)]


def static_batching_server(model, prompts: list[list[int]], new_tokens: list[int], arrivals: list[float],
                           max_batch: int, token_times: list | None = None) -> tuple[list[float], list[list[int]]]:
    """A server without continuous batching: whenever it is free it runs one padded `generate` on every request that
    has arrived (up to `max_batch`); a request arriving meanwhile waits for that batch to finish. Returns each
    request's completion time (seconds after the start) and its tokens. `token_times` (a list of len(prompts)), when
    given, receives each request's (first token, own last token) times, as a streaming server would send them."""
    completions, outputs = [0.0] * len(prompts), [None] * len(prompts)
    start, first = time.perf_counter(), 0
    while first < len(prompts):
        now = time.perf_counter() - start
        if arrivals[first] > now:
            time.sleep(arrivals[first] - now)
            continue
        batch = [i for i in range(first, min(first + max_batch, len(prompts))) if arrivals[i] <= now]
        stamps = [] if token_times is not None else None
        rows = padded_generate(model, [prompts[i] for i in batch], [new_tokens[i] for i in batch],
                               **({"stamps": stamps} if stamps is not None else {}))
        done = time.perf_counter() - start
        for i, row in zip(batch, rows):
            completions[i], outputs[i] = done, row
            if token_times is not None:
                token_times[i] = (stamps[0] - start, stamps[new_tokens[i] - 1] - start)
        first = batch[-1] + 1
    return completions, outputs


def latency_summary(arrivals: list[float], completions: list[float]) -> dict:
    latencies = [c - a for a, c in zip(arrivals, completions)]
    return {"p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "mean_s": statistics.fmean(latencies), "makespan_s": max(completions)}


def continuous_batching_worker(model_dir: str, settings: ThroughputSettings, prompts: list[list[int]],
                               new_tokens: list[int], threads: int, online_arrivals: dict | None = None) -> dict:
    """One warm continuous-batching manager, as a server process runs it: the untimed first pass, then
    `settings.rounds` timed passes of every request, then one online run per entry of `online_arrivals`
    ({rate: arrival times}: each request submitted at its arrival time). Runs in a process of its own (see
    measure_continuous)."""
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=settings.cb_attn_implementation).eval()
    cb_config = cpu_continuous_batching_config(model.config,
                                               max_concurrent_requests=settings.cb_max_concurrent or len(prompts),
                                               max_request_tokens=max(map(len, prompts)) + max(new_tokens),
                                               max_batch_tokens=settings.cb_max_batch_tokens,
                                               page_size=settings.cb_page_size)
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(max_new_tokens=max(new_tokens), do_sample=False,
                                           pad_token_id=model.config.pad_token_id or 0, eos_token_id=-1),
        continuous_batching_config=cb_config,
    )
    manager.start()

    def serve(arrivals: list[float]) -> tuple[list[float], list[list[int]], list[float]]:
        """Submit each request at its arrival time (seconds from now; all 0 = every request at once), and return
        each one's completion time, stamped by a collector thread, its tokens, and its first token's time (the
        manager's own timestamp)."""
        finished, start = {}, time.perf_counter()

        def collect():
            deadline = time.monotonic() + 600
            while len(finished) < len(prompts) and time.monotonic() < deadline:
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    finished[result.request_id] = (time.perf_counter() - start, result.generated_tokens,
                                                   result.timestamps[0] - start)

        collector = threading.Thread(target=collect)
        collector.start()
        ids = []
        for prompt, n, arrival in zip(prompts, new_tokens, arrivals):
            time.sleep(max(0.0, arrival - (time.perf_counter() - start)))
            ids.append(manager.add_request(prompt, max_new_tokens=n, record_timestamps=True))
        collector.join()
        if len(finished) < len(ids):
            raise RuntimeError(f"continuous batching finished {len(finished)} of {len(ids)} requests in 600 s")
        return [finished[i][0] for i in ids], [finished[i][1] for i in ids], [finished[i][2] for i in ids]

    at_once = [0.0] * len(prompts)
    try:
        _, outputs, _ = serve(at_once)
        timings, offline = [], None
        for _ in range(settings.rounds):
            start = time.perf_counter()
            offline = serve(at_once)
            timings.append(time.perf_counter() - start)
        online_arrivals = dict(online_arrivals or {})
        if settings.online_load > 0:  # Poisson arrivals at a fraction of the capacity just measured
            rate = settings.online_load * len(prompts) / statistics.median(timings)
            online_arrivals[rate] = arrival_times(rate, len(prompts), settings.seed)
        online = {rate: serve(arrivals) for rate, arrivals in online_arrivals.items()}
        cache_bytes = manager.batch_processor.cache.cache_tensor.nbytes
    finally:
        manager.stop(block=True, timeout=60)
    return {"outputs": outputs, "timings": timings, "online": online, "online_arrivals": online_arrivals,
            "offline": offline, "paged_cache_bytes": cache_bytes,
            "paged_cache_estimate_bytes": paged_cache_bytes(model.config, cb_config),
            "cb_config": {"num_blocks": cb_config.num_blocks, "page_size": cb_config.page_size,
                          "max_batch_tokens": cb_config.max_batch_tokens,
                          "attn_implementation": settings.cb_attn_implementation}}


def measure_continuous(model_dir: str, settings: ThroughputSettings, prompts: list[list[int]],
                       new_tokens: list[int], threads: int, online_arrivals: dict | None = None) -> dict:
    """continuous_batching_worker in a fresh process.

    transformers' manager computes in a background thread, which gets its own OpenMP thread team. When the main
    thread has a team too (it ran padded `generate` a moment ago), the process holds more OpenMP threads than CPUs
    and libgomp stops spin-waiting between operations: every operation of the manager then waits for its threads to
    wake up (measured: 3.9 s instead of 1.4 s for the same requests). A server process that only serves has one
    team, as here.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(continuous_batching_worker,
                          (model_dir, settings, prompts, new_tokens, threads, online_arrivals))


def measure_throughput(model, model_dir: str, settings: ThroughputSettings, stream: list[int], workload: str,
                       bounds: tuple[int, int], threads: int, rates: Sequence[float] = ()) -> dict:
    """Padded `generate` at each batch size (this process) against continuous batching (its own process); then, for
    each of `rates`, the same requests arriving over time, served by static batching and by continuous batching."""
    prompts, new_tokens = throughput_requests(settings, stream, bounds)
    padded = measure_padded(model, prompts, new_tokens, settings.padded_batch_sizes, settings.rounds)
    arrivals = {rate: arrival_times(rate, len(prompts), settings.seed) for rate in rates}
    continuous = measure_continuous(model_dir, settings, prompts, new_tokens, threads, arrivals)
    timings = {**padded["timings"], "continuous_batching": continuous["timings"]}
    tokens = sum(new_tokens)
    result = {"modes": {name: {"median_seconds": statistics.median(t), "seconds": t,
                               "tokens_per_second": tokens / statistics.median(t)} for name, t in timings.items()}}
    padded_modes = list(padded["timings"])
    best = min(padded_modes, key=lambda name: result["modes"][name]["median_seconds"])
    cb_positions = token_positions(prompts, new_tokens, None)
    result.update({
        "requests": len(prompts), "workload": workload, "new_tokens": sorted(new_tokens),
        "prompt_lengths": sorted(len(p) for p in prompts),
        "best_padded": best,
        "identical_outputs": {name: sum(a == b for a, b in zip(padded["outputs"][name], continuous["outputs"]))
                              for name in padded_modes},
        "speedup": result["modes"][best]["median_seconds"] / result["modes"]["continuous_batching"]["median_seconds"],
        "token_positions": {**padded["token_positions"], "continuous_batching": cb_positions},
        "padding_bound": padded["token_positions"][best] / cb_positions,
        **{key: continuous[key] for key in ("paged_cache_bytes", "paged_cache_estimate_bytes", "cb_config")},
    })
    if rates:
        max_batch = max(settings.padded_batch_sizes)
        result["online"] = {"max_static_batch": max_batch, "rates": {}}
        for rate, times in arrivals.items():
            completions, outputs = static_batching_server(model, prompts, new_tokens, times, max_batch)
            cb_completions, cb_outputs, _ = continuous["online"][rate]
            static, cb = latency_summary(times, completions), latency_summary(times, cb_completions)
            result["online"]["rates"][f"{rate:g}"] = {
                "static_batching": static, "continuous_batching": cb,
                "p50_latency_speedup": static["p50_s"] / cb["p50_s"],
                "identical_outputs": sum(a == b for a, b in zip(outputs, cb_outputs)),
            }
    return result


def measure_sharegpt(model, model_dir: str, tokenizer, settings: ThroughputSettings, batch_size: int,
                     max_answer_tokens: int, threads: int, tokens_per_word: float = 0.0) -> dict:
    """The ShareGPT workload (`settings.requests` chat lengths, `sample_sharegpt_requests`) served offline (every
    request at t=0) and online (Poisson arrivals at `settings.online_load` x continuous batching's measured
    capacity) by static batching (padded `generate` on up to `batch_size` arrived requests, each batch running to
    its longest member; this process) and by one warm continuous-batching manager (its own process). Greedy outputs
    of every request are compared between the two."""
    prompts, new_tokens, sampling = sample_sharegpt_requests(tokenizer, settings.requests, settings.seed,
                                                             model.config.max_position_embeddings, max_answer_tokens,
                                                             tokens_per_word=tokens_per_word)
    count, at_once = len(prompts), [0.0] * len(prompts)
    padded_generate(model, prompts[:batch_size], new_tokens[:batch_size])  # untimed: warms the padded path
    static_runs = []
    for _ in range(settings.rounds):
        times = [None] * count
        start = time.perf_counter()
        _, outputs = static_batching_server(model, prompts, new_tokens, at_once, batch_size, times)
        static_runs.append((time.perf_counter() - start, times, outputs))
    seconds = [run[0] for run in static_runs]
    _, static_times, static_outputs = sorted(static_runs, key=lambda run: run[0])[(len(static_runs) - 1) // 2]
    continuous = measure_continuous(model_dir, settings, prompts, new_tokens, threads)
    (rate, arrivals), = continuous["online_arrivals"].items()
    online_times = [None] * count
    _, online_outputs = static_batching_server(model, prompts, new_tokens, arrivals, batch_size, online_times)
    cb_completions, cb_outputs, cb_firsts = continuous["offline"]
    cb_online_completions, cb_online_outputs, cb_online_firsts = continuous["online"][rate]

    def static_summary(arrival, times):
        return serving_summary(arrival, [t[0] for t in times], [t[1] for t in times], new_tokens)

    modes = {
        "offline": {"static_batching": static_summary(at_once, static_times),
                    "continuous_batching": serving_summary(at_once, cb_firsts, cb_completions, new_tokens)},
        "online": {"static_batching": static_summary(arrivals, online_times),
                   "continuous_batching": serving_summary(arrivals, cb_online_firsts, cb_online_completions,
                                                          new_tokens)},
    }
    mismatched = [i for i, (a, b) in enumerate(zip(static_outputs, cb_outputs)) if a != b]
    if mismatched:
        logger.warning("ShareGPT: continuous batching's greedy outputs differ from padded generate for %d of %d "
                       "requests (first: %s)", len(mismatched), count, mismatched[:5])
    online_same = sum(a == b == c for a, b, c in zip(static_outputs, online_outputs, cb_online_outputs))
    cb_seconds = continuous["timings"]
    return {
        "requests": count, "sampling": sampling, "static_batch_size": batch_size,
        "prompt_lengths": [len(p) for p in prompts], "new_tokens": new_tokens,
        "static_seconds": seconds, "continuous_seconds": cb_seconds, "modes": modes,
        "speedup": statistics.median(seconds) / statistics.median(cb_seconds),
        "online_rate": rate, "online_load": settings.online_load,
        "static_capacity_requests_per_second": count / statistics.median(seconds),
        "continuous_capacity_requests_per_second": count / statistics.median(cb_seconds),
        "online_ttft_p50_ratio": modes["online"]["static_batching"]["ttft_p50_s"]
        / modes["online"]["continuous_batching"]["ttft_p50_s"],
        "slot_utilisation_bound": slot_utilisation_bound(new_tokens, batch_size),
        "padding_bound": token_positions(prompts, new_tokens, batch_size) / token_positions(prompts, new_tokens, None),
        "identical_outputs": count - len(mismatched), "mismatched_requests": mismatched,
        "online_identical_outputs": online_same,
        **{key: continuous[key] for key in ("paged_cache_bytes", "paged_cache_estimate_bytes", "cb_config")},
    }


def plot_sharegpt(result: dict, path: Path) -> None:
    """sharegpt.png: output tokens/s, time to first token and latency (p50 bars, p95 ticks), static against
    continuous batching, offline and online."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    scenarios = list(result["modes"])
    x = np.arange(len(scenarios))
    for offset, (mode, color) in zip((-0.2, 0.2), (("static_batching", "tab:blue"),
                                                   ("continuous_batching", "tab:orange"))):
        rows = [result["modes"][s][mode] for s in scenarios]
        label = mode.replace("_", " ")
        axes[0].bar(x + offset, [r["output_tokens_per_second"] for r in rows], 0.4, color=color, label=label)
        for axis, metric in ((axes[1], "ttft"), (axes[2], "latency")):
            axis.bar(x + offset, [r[f"{metric}_p50_s"] for r in rows], 0.4, color=color, label=f"{label}, p50")
            axis.plot(x + offset, [r[f"{metric}_p95_s"] for r in rows], "k_", markersize=18)
    titles = ("output tokens / s", "time to first token (s), p95 tick", "latency, arrival to last token (s)")
    for axis, title in zip(axes, titles):
        axis.set_xticks(x, scenarios)
        axis.set_title(title)
        axis.legend(fontsize=8)
    fig.suptitle(f"ShareGPT, {result['requests']} requests: static batches of {result['static_batch_size']} vs "
                 f"continuous batching (online at {result['online_rate']:.2f} requests/s)")
    fig.tight_layout()
    write_atomically(path, figure_to_png(fig))


def sharegpt_markdown(result: dict) -> list[str]:
    """results.md lines of the ShareGPT comparison."""
    sampling = result["sampling"]
    lines = [
        "", f"ShareGPT workload: {result['requests']} first-turn requests sampled with seed {sampling['seed']} from "
        f"{sampling['conversations']:,} conversations (vLLM's filter, lengths: {sampling['length_source']}; "
        "answers capped "
        f"at {sampling['max_answer_tokens']} ({sampling['answers_capped']} capped), prompts cut to "
        f"{sampling['max_request_tokens'] - sampling['max_answer_tokens']} tokens ({sampling['prompts_truncated']} "
        "cut)); "
        f"{sum(result['new_tokens']):,} output tokens. Static batching: padded `generate` on up to "
        f"{result['static_batch_size']} arrived requests, each batch running to its longest member. Online: Poisson "
        f"arrivals at {result['online_rate']:.2f} requests/s ({result['online_load']:.0%} of continuous batching's "
        f"measured {result['continuous_capacity_requests_per_second']:.2f}; static batching's is "
        f"{result['static_capacity_requests_per_second']:.2f}).", "",
        "| scenario | mode | output tokens/s | TTFT p50 / p95 s | TPOT p50 / p95 ms | latency p50 / p95 s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for scenario, modes in result["modes"].items():
        for mode, row in modes.items():
            lines.append(f"| {scenario} | {mode.replace('_', ' ')} | {row['output_tokens_per_second']:.1f} | "
                         f"{row['ttft_p50_s']:.2f} / {row['ttft_p95_s']:.2f} | {1000 * row['tpot_p50_s']:.1f} / "
                         f"{1000 * row['tpot_p95_s']:.1f} | {row['latency_p50_s']:.2f} / {row['latency_p95_s']:.2f} |")
    cb = result["cb_config"]
    lines += [
        "", f"Continuous batching over static batches of {result['static_batch_size']} (offline throughput): "
        f"{result['speedup']:.2f}x measured; slot-utilisation bound {result['slot_utilisation_bound']:.2f}x (decode "
        f"slots a static batch holds / tokens generated), padding bound with prefill {result['padding_bound']:.2f}x. "
        f"Online p50 TTFT, static / continuous: {result['online_ttft_p50_ratio']:.2f}x. Greedy outputs identical to "
        f"padded `generate`: {result['identical_outputs']}/{result['requests']} offline, "
        f"{result['online_identical_outputs']}/{result['requests']} online. Manager: {cb['attn_implementation']}, "
        f"max_batch_tokens {cb['max_batch_tokens']}, {cb['num_blocks']} blocks of {cb['page_size']} "
        f"({result['paged_cache_bytes'] / 2**20:.1f} MB).",
    ]
    return lines


def plot(latency: dict, throughput: dict, path: Path) -> None:
    """latency.png: latency per variant, throughput per mode and workload, online latency by arrival rate."""
    plt = pyplot()
    online = next(((w, thr["online"]) for w, thr in throughput.items() if "online" in thr), None)
    panels = 1 + bool(throughput) + bool(online)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False,
                             gridspec_kw={"width_ratios": [2] + [1] * (panels - 1)})
    axes = axes[0]
    left = axes[0]
    names = list(latency)
    x = np.arange(len(names))
    left.bar(x - 0.2, [latency[n]["p50_ms"] for n in names], 0.4, label="p50")
    left.bar(x + 0.2, [latency[n]["p95_ms"] for n in names], 0.4, label="p95")
    left.axhline(TARGETS["p50_ms"], color="gray", linestyle="--", linewidth=1, label="p50 target")
    left.set_xticks(x, names, rotation=15)
    left.set_ylabel("ms per request")
    left.set_title("Latency: 1 request, prompt + greedy tokens")
    left.legend()
    if not throughput:
        fig.tight_layout()
        write_atomically(path, figure_to_png(fig))
        return
    right = axes[1]
    workloads = list(throughput)
    modes = list(throughput[workloads[0]]["modes"])
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        right.bar(np.arange(len(workloads)) + (i - (len(modes) - 1) / 2) * width,
                  [throughput[w]["modes"][mode]["tokens_per_second"] for w in workloads], width,
                  label=mode.replace("padded_generate_bs", "padded, batch ").replace("_", " "))
    right.set_xticks(np.arange(len(workloads)), [f"{w} new tokens" for w in workloads])
    right.set_ylabel("generated tokens / s")
    right.set_title(f"Throughput: {throughput[workloads[0]]['requests']} mixed-length prompts")
    right.legend(fontsize=8)
    if online:
        workload, results = online
        rates = [float(r) for r in results["rates"]]
        for mode, color in (("static_batching", "tab:blue"), ("continuous_batching", "tab:orange")):
            rows = [results["rates"][r][mode] for r in results["rates"]]
            label = mode.replace("_", " ")
            axes[2].plot(rates, [row["p50_s"] for row in rows], "o-", color=color, label=f"{label}, p50")
            axes[2].plot(rates, [row["p95_s"] for row in rows], "o--", color=color, label=f"{label}, p95")
        axes[2].set_xlabel("arrival rate (requests / s)")
        axes[2].set_ylabel("latency, arrival to last token (s)")
        axes[2].set_title(f"Online serving, {workload} new tokens")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, figure_to_png(fig))


def render_markdown(results: dict) -> str:
    """results.md: the tables of `run_inference_benchmark`'s results and the targets."""
    lat = results["latency"]
    base = lat.get("torch_fp32", {}).get("p50_ms")
    lines = [
        "# Inference benchmark (CPU)", "",
        f"Model: `{results['model_dir']}` ({results['parameters']:,} parameters). Request: "
        f"{results['args']['prompt_tokens']} prompt tokens + {results['args']['new_tokens']} greedy tokens, batch 1. "
        f"{results['environment']['available_cpus']} CPU(s), {results['environment']['torch_num_threads']} torch "
        "threads.", "",
        "| variant | p50 ms | p95 ms | speed-up vs torch fp32 (p50) | greedy agreement with torch fp32 | memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in lat.items():
        speed = f"{base / row['p50_ms']:.2f}x" if base else "-"
        agreement = row.get("greedy_agreement_with_torch_fp32")
        memory = results["memory_bytes"].get(name, results["memory_bytes"].get(name + "_file"))
        lines.append(f"| {name} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {speed} | "
                     f"{'-' if agreement is None else f'{agreement:.1%}'} | "
                     f"{'-' if memory is None else f'{memory / 2**20:.2f} MB'} |")
    for workload, thr in results["throughput"].items():
        lines += [
            "", f"Throughput, {thr['requests']} requests of {min(thr['prompt_lengths'])}-{max(thr['prompt_lengths'])} "
            f"prompt tokens, {workload} new tokens per request ({sum(thr['new_tokens'])} in all):", "",
            "| mode | median s | generated tokens/s | greedy outputs identical to continuous batching |",
            "|---|---|---|---|",
        ]
        for name, row in thr["modes"].items():
            if name == "continuous_batching":
                cb = thr["cb_config"]
                label = (f"continuous batching (warm manager, {cb['attn_implementation']}, max_batch_tokens "
                         f"{cb['max_batch_tokens']}, page {cb['page_size']})")
                same = "-"
            else:
                label = f"padded generate, batches of {name.removeprefix('padded_generate_bs')}"
                same = f"{thr['identical_outputs'][name]}/{thr['requests']}"
            lines.append(f"| {label} | {row['median_seconds']:.2f} | {row['tokens_per_second']:.1f} | {same} |")
        lines += [
            "", f"Continuous batching speed-up over the fastest padded baseline ({thr['best_padded']}): "
            f"{thr['speedup']:.2f}x; paged KV cache {thr['paged_cache_bytes'] / 2**20:.1f} MB. Padding bound: that "
            f"baseline computes {thr['token_positions'][thr['best_padded']]:,} token positions for continuous "
            f"batching's {thr['token_positions']['continuous_batching']:,}, so {thr['padding_bound']:.2f}x is the most "
            "continuous batching can gain when compute, not per-forward overhead, is the cost.",
        ]
    for workload, thr in results["throughput"].items():
        if "online" not in thr:
            continue
        lines += [
            "", f"Online serving, {workload} new tokens: the same {thr['requests']} requests arriving over time "
            "(Poisson). Latency = arrival to last token; static batching runs padded `generate` on whatever has "
            f"arrived (up to {thr['online']['max_static_batch']}) while later arrivals wait.", "",
            "| arrival rate (requests/s) | static batching p50 / p95 s | continuous batching p50 / p95 s | "
            "p50 speed-up | all done after (static / continuous) | greedy outputs identical |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for rate, row in thr["online"]["rates"].items():
            static, cb = row["static_batching"], row["continuous_batching"]
            lines.append(f"| {rate} | {static['p50_s']:.2f} / {static['p95_s']:.2f} | {cb['p50_s']:.2f} / "
                         f"{cb['p95_s']:.2f} | {row['p50_latency_speedup']:.2f}x | {static['makespan_s']:.2f} s / "
                         f"{cb['makespan_s']:.2f} s | {row['identical_outputs']}/{thr['requests']} |")
    if "sharegpt" in results:
        lines += sharegpt_markdown(results["sharegpt"])
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for name, target, measured in results["targets"]:
        if name.endswith("_ms"):
            label = "realtime p50, best variant" if name == "p50_ms" else name.removesuffix("_ms").replace("_p50", " p50")
            lines.append(f"| {label} < {target} ms | {measured:.1f} ms | {'yes' if measured < target else 'no'} |")
        else:
            lines.append(f"| {name} >= {target} | {measured:.2f} | {'yes' if measured >= target else 'no'} |")
    environment = results["environment"]
    lines += ["", f"Load average (1, 5, 15 min) at the start: {environment['load_average_start']}, at the end: "
              f"{environment['load_average']}.", "", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"




BENCH_SCRIPT = "bench_inference.py"  # the writer named in the output folder's marker (`check_output_dir`)


def run_inference_benchmark(
    model_dir: str,
    output_dir: str,
    *,
    preset: str = "realtime",
    variants: str = ",".join(LATENCY_VARIANTS),
    prompt_tokens: int = 64,
    new_tokens: int = 16,
    rounds: int = 10,
    prompts: int = 3,
    warmup: int = 2,
    throughput_requests: int = 32,
    min_prompt: int = 8,
    max_prompt: int = 256,
    padded_batch_sizes: str = "8,32",
    throughput_new_tokens: str = "16,8-128",
    throughput_rounds: int = 3,
    cb_max_batch_tokens: int = 256,
    cb_page_size: int = 32,
    online_rates: str = "4,8,16",
    online_workload: str = "8-128",
    cb_attn_implementation: str = "sdpa",
    num_threads: int = 0,
    seed: int = 0,
    workload: str = "synthetic",
    requests: int = 512,
    quick: bool = False,
    sharegpt_batch_size: int = 16,
    max_answer_tokens: int = 256,
    online_load: float = 0.8,
    cb_max_concurrent: int = 64,
    tokens_per_word: float = 0.0,
    command: str = "",
) -> dict:
    """Measure the saved model in `model_dir` (latency per variant, throughput per workload, online serving) and write
    results.json, results.md and latency.png into `output_dir`; returns the results.

    The option strings are those of `scripts/bench_inference.py` (e.g. `variants="torch_fp32,onnx_int8"`,
    `throughput_new_tokens="16,8-128"`, `online_rates=""` to skip the online test); `preset` is only recorded:
    results.json lists the fields in which the model's config differs from it. `num_threads` 0 = every available CPU.
    `workload="sharegpt"` replaces the synthetic throughput and online tests by `measure_sharegpt` on `requests`
    ShareGPT lengths (`quick`: at most 32 requests and one timed round), also written to sharegpt.png.
    """
    settings = dict(locals())  # the arguments, recorded in results.json
    check_inference_options(preset, variants, padded_batch_sizes, throughput_new_tokens, online_rates,
                            online_workload, cb_attn_implementation, min_prompt, max_prompt)
    check_inference_run(model_dir, output_dir, run_counts(settings), new_tokens, prompt_tokens, max_prompt,
                        throughput_new_tokens)
    check_sharegpt_options(workload, requests, online_load, max_answer_tokens, sharegpt_batch_size,
                           cb_max_concurrent, tokens_per_word)
    if quick:
        requests, throughput_rounds = min(requests, 32), 1
    # a new or empty folder, or an earlier output of this benchmark; never the model (check_output_dir)
    output_dir = prepare_output_dir(output_dir, BENCH_SCRIPT, inputs={"--model_dir": model_dir})
    variant_names = parse_variants(variants)
    workloads = parse_workloads(throughput_new_tokens)
    rates = parse_rates(online_rates, online_workload, workloads)
    throughput_settings = ThroughputSettings(
        requests=throughput_requests, min_prompt=min_prompt, max_prompt=max_prompt,
        padded_batch_sizes=tuple(parse_batch_sizes(padded_batch_sizes)), rounds=throughput_rounds,
        cb_max_batch_tokens=cb_max_batch_tokens, cb_page_size=cb_page_size,
        cb_attn_implementation=cb_attn_implementation, seed=seed,
    )
    sharegpt_settings = ThroughputSettings(
        requests=requests, min_prompt=min_prompt, max_prompt=max_prompt,  # (unused: ShareGPT sets the lengths)
        padded_batch_sizes=(sharegpt_batch_size,), rounds=throughput_rounds, cb_max_batch_tokens=cb_max_batch_tokens,
        cb_page_size=cb_page_size, cb_attn_implementation=cb_attn_implementation, seed=seed,
        cb_max_concurrent=cb_max_concurrent, online_load=online_load,
    )
    load_average_start = [round(x, 2) for x in os.getloadavg()]
    threads = num_threads or available_cpus()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = model.config.max_position_embeddings
    longest_new = max([new_tokens] + [high for _, high in workloads.values()])
    if max(prompt_tokens, max_prompt) + longest_new > limit:
        raise ValueError(f"Prompts of up to {max(prompt_tokens, max_prompt)} tokens + {longest_new} new "
                         f"exceed the model's max_position_embeddings ({limit}).")
    texts, source = heldout_texts(model_dir)
    stream = heldout_token_stream(tokenizer, texts)
    latency_prompts = [torch.tensor([stream[i * 997 % (len(stream) - prompt_tokens):][:prompt_tokens]])
                       for i in range(prompts)]

    with tempfile.TemporaryDirectory() as onnx_dir:
        runners, memory = latency_runners(model, Path(model_dir), Path(onnx_dir), variant_names, new_tokens,
                                          num_threads)
        latency = measure_latency(runners, latency_prompts, rounds, warmup)
        del runners
    gc.collect()
    throughput = {label: measure_throughput(model, model_dir, throughput_settings, stream, label, bounds, threads,
                                            rates if label == online_workload else ())
                  for label, bounds in workloads.items()} if workload == "synthetic" else {}
    sharegpt = (measure_sharegpt(model, model_dir, tokenizer, sharegpt_settings, sharegpt_batch_size,
                                 max_answer_tokens, threads, tokens_per_word) if workload == "sharegpt" else None)

    targets = []
    if "torch_fp32" in latency and "onnx_int8" in latency:
        targets.append(("onnx_int8_speedup", TARGETS["onnx_int8_speedup"],
                        latency["torch_fp32"]["p50_ms"] / latency["onnx_int8"]["p50_ms"]))
    for label, result in throughput.items():
        targets.append((f"continuous_batching_speedup ({label} new tokens)", TARGETS["continuous_batching_speedup"],
                        result["speedup"]))
    if sharegpt is not None:
        targets.append(("continuous_batching_speedup (ShareGPT, static batches of "
                        f"{sharegpt_batch_size})", TARGETS["continuous_batching_speedup"], sharegpt["speedup"]))
        targets.append(("online p50 TTFT, static / continuous", 1.0, sharegpt["online_ttft_p50_ratio"]))
    targets.append(("p50_ms", TARGETS["p50_ms"], min(row["p50_ms"] for row in latency.values())))
    if "torch_fp32" in latency:
        targets.append(("torch_fp32_p50_ms", TARGETS["p50_ms"], latency["torch_fp32"]["p50_ms"]))
    results = {
        "command": command,
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in settings.items()},
        "model_dir": model_dir,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_experts",
                                                         "router_mode", "moe_intermediate_size", "vocab_size")},
        "preset": preset,
        "preset_differences": preset_differences(model.config, preset),
        "heldout_source": source,
        "latency": latency,
        "throughput": throughput,
        **({"sharegpt": sharegpt} if sharegpt is not None else {}),
        "memory_bytes": memory,
        "targets": targets,
        "environment": {**machine_info(threads), "load_average_start": load_average_start,
                        "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    write_result_files(output_dir, results, render_markdown(results))
    plot(latency, throughput, output_dir / "latency.png")
    if sharegpt is not None:
        plot_sharegpt(sharegpt, output_dir / "sharegpt.png")
    logger.info("Results written to %s", output_dir)
    return results


__all__ = ["LATENCY_VARIANTS", "ThroughputSettings", "check_inference_options", "check_inference_run",
           "measure_sharegpt", "run_counts", "run_inference_benchmark"]
