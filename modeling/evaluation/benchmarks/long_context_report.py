"""The report of the long-context prefill benchmark (`long_context`): targets, results.md, results.png."""

from __future__ import annotations

import json
from pathlib import Path

from ...training.checkpoints import prepare_output_dir, write_result_files
from ..plots import figure_to_png, pyplot


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


def cell_text(result: dict) -> str:
    """One table cell: "1.23 s / 456 MB", or why there is no measurement."""
    if not result:
        return "not measured"
    if result.get("status") == "ok":
        return f"{result['seconds']:.2f} s / {result['peak_rss_mb']:.0f} MB"
    if result.get("status") == "skipped":
        return result["detail"]
    return f"{result.get('status')} ({result.get('detail', '')})" if result.get("status") in ("error",) else (
        f"{result.get('status')}")


def format_tokens(n: int) -> str:
    """1024 -> "1K", 200000 -> "200,000"."""
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def markdown(results: dict) -> str:
    """results.md: how it was measured, the prefill tables, the end-to-end run and the targets."""
    env, lengths, runs = results["environment"], results["lengths"], results["prefill"]
    names = list(runs)
    lines = [
        "# Long-context prefill benchmark",
        "",
        f"One prefill (`torch.no_grad()`, batch 1, random ids, `use_cache=True`, `logits_to_keep=1`) per cell, "
        f"{'each in a fresh process' if env['isolation'] == 'subprocess' else 'all in one process (not isolated)'};"
        f" cells: median wall seconds / peak RSS of the process during the prefill (MB, absolute: model included; the "
        f"increase over the RSS after model creation is in the second table). torch {env['torch']}, "
        f"transformers {env['transformers']}, "
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
        lines.append(f"| {format_tokens(n)} | " + " | ".join(cell_text(runs[name].get(str(n), {})) for name in names)
                     + " |")

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
        lines.append(f"| {format_tokens(n)} | " + " | ".join(cells) + " |")

    streaming = runs.get("streaming/windowed")
    if streaming:
        lines += ["", "Streaming preset (all sliding + sinks): KV cache after prefill, in tokens summed over layers "
                      "(sinks + window per layer):", "", "| n | cached tokens | peak RSS MB | RSS increase MB |",
                  "|---:|---:|---:|---:|"]
        for n in lengths:
            row = streaming.get(str(n), {})
            if row.get("status") == "ok":
                lines.append(f"| {format_tokens(n)} | {row.get('cached_tokens')} | {row['peak_rss_mb']:.0f} | "
                             f"{row['rss_increase_mb']:.0f} |")
            elif row:
                lines.append(f"| {format_tokens(n)} | {cell_text(row)} | | |")

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
    at = format_tokens(t["speedup_length"])

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
                f"{format_tokens(memory['from_n'])} -> {memory['peak_rss_mb'][1]:.0f} MB at "
                f"{format_tokens(memory['to_n'])}"
                f" (increase over the model {memory['rss_increase_mb'][0]:.0f} -> {memory['rss_increase_mb'][1]:.0f} "
                f"MB, {memory['increase_growth_mb_per_1k_tokens']:.2f} MB per 1K tokens); KV cache "
                f"{memory['cached_tokens'][0]} -> {memory['cached_tokens'][1]} tokens.")
    if "end_to_end_peak_rss_under_4gb" in t:
        lines.append(f"- 200K end to end under 4 GB peak RSS: "
                     f"{'met' if t['end_to_end_peak_rss_under_4gb'] else 'not met'} "
                     f"({results['end_to_end_generate']['peak_rss_mb']:.0f} MB).")
    return "\n".join(lines) + "\n"


def plot(results: dict) -> bytes:
    """results.png: prefill CPU seconds and peak RSS by prompt length, log-log, one line per variant."""
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

    time_title = "Prefill time (process CPU seconds: steady under load;\n= wall time on a dedicated core with 1 thread)"
    for ax, title, label in ((ax_time, time_title, "CPU seconds"), (ax_memory, "Peak memory", "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(results["lengths"], [format_tokens(n) for n in results["lengths"]], fontsize=8)
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


BENCH_SCRIPT = "bench_long_context.py"  # the writer named in the output folder's marker


def write_results(output_dir: str | Path, results: dict, with_plot: bool = True) -> str:
    """results.json, results.md (and results.png), each written atomically, into `output_dir`: a new or empty
    folder, or an earlier output of this benchmark (`check_output_dir`); returns the markdown."""
    output_dir = prepare_output_dir(output_dir, BENCH_SCRIPT)
    text = markdown(results)
    if not results.get("complete", True):
        text = "**Partial results: the benchmark is still running (or was interrupted).**\n\n" + text
    write_result_files(output_dir, results, text, {"results.png": plot(results)} if with_plot else None)
    return text


def load_end_to_end(output_dir: str | Path) -> dict | None:
    """The result a separate end-to-end run saved as end_to_end.json in `output_dir` (None if there is none)."""
    path = Path(output_dir) / "end_to_end.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    result["separate_run"] = True
    return result


def rerender(output_dir: str | Path) -> str:
    """Measure nothing: recompute the targets of the results.json in `output_dir` (with its end_to_end.json) and
    write results.md / results.png again; returns the markdown."""
    output_dir = Path(output_dir)
    path = output_dir / "results.json"
    if not path.is_file():
        raise ValueError(f"--render_only: no results.json in {output_dir}; run the benchmark into it first.")
    results = json.loads(path.read_text())
    if not results.get("end_to_end_generate"):
        results["end_to_end_generate"] = load_end_to_end(output_dir)
    results["targets"] = targets(results["prefill"], results["lengths"], results["end_to_end_generate"],
                                 results["configs"])
    return write_results(output_dir, results)
