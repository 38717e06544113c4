"""What scripts/build_datastore.py and scripts/eval_retrieval.py run: a datastore from a model folder's training
files, held-out perplexity with and without kNN-LM (lambda / temperature chosen on one half of the held-out blocks,
reported on the other), the index comparison on real queries, decoding latency (plain, retrieval sequential,
retrieval overlapped), and the JSON / markdown / PNG / model-card outputs."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .datastore import Datastore, DatastoreConfig, build_datastore
from .hooks import capture_keys
from .index import compare_indexes
from .knn_lm import KnnLM, KnnLMConfig, mix
from .search_process import knn_distribution

BUILD_SCRIPT = "build_datastore"
EVAL_SCRIPT = "eval_retrieval"


def load_causal_lm(model_dir: str | os.PathLike):
    """(model in eval mode, tokenizer) from a saved folder; ValueError naming --model_dir when it holds none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--model_dir {model_dir}: no saved model there (config.json missing); train one with "
                         "scripts/train.py.")
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def _recorded_data(model_dir: str | os.PathLike) -> dict:
    try:
        data = json.loads((Path(model_dir) / "results.json").read_text()).get("data", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def training_texts(model_dir: str | os.PathLike, max_files: int) -> tuple[list[str], str]:
    """The texts a datastore is built from: the training files a main-job run recorded in results.json
    (`data.train_files`, relative to the standard library), else the main job's default training split."""
    from ..data.corpus import load_corpus, stdlib_dir

    files = _recorded_data(model_dir).get("train_files")
    if isinstance(files, list) and files:
        root = Path(stdlib_dir())
        texts = [(root / f).read_text(encoding="utf-8") for f in files[:max_files] if (root / f).is_file()]
        if texts:
            return texts, f"the first {len(texts)} training files recorded in {Path(model_dir) / 'results.json'}"
    corpus = load_corpus(max_train_files=max_files)
    return corpus.train_texts, f"the main job's default training split ({len(corpus.train_texts)} files)"


def default_block_size(model_dir: str | os.PathLike, model) -> int:
    """The block size the model was trained with (results.json), else min(256, max_position_embeddings)."""
    recorded = _recorded_data(model_dir).get("block_size")
    if isinstance(recorded, int) and recorded >= 2:
        return recorded
    return min(256, int(getattr(model.config, "max_position_embeddings", 256) or 256))


def build_folder_datastore(model_dir: str | os.PathLike, output_dir: str | os.PathLike | None,
                           config: DatastoreConfig, max_files: int = 300, max_tokens: int | None = None,
                           batch_size: int = 8, progress: bool = True) -> tuple[Path, Datastore]:
    """Build the datastore of the model in `model_dir` over its training files and save it as `output_dir`
    (default <model_dir>/datastore) under the output-folder rule (written in a staging folder, swapped in whole)."""
    from ..data.corpus import tokenize_documents
    from ..training.checkpoints import check_output_dir, replace_output_dir, staging_dir

    folder = check_output_dir(output_dir or Path(model_dir) / "datastore", BUILD_SCRIPT, {"--model_dir": model_dir})
    model, tokenizer = load_causal_lm(model_dir)
    if config.block_size <= 0:
        config.block_size = default_block_size(model_dir, model)
    if config.stride <= 0:
        config.stride = config.block_size
    texts, source = training_texts(model_dir, max_files)
    ids = tokenize_documents(tokenizer, texts, desc="Tokenizing")
    used = f" (first {max_tokens} used)" if max_tokens and max_tokens < len(ids) else ""
    config.source = f"{source}, {len(ids):,} tokens{used}"
    staging = staging_dir(folder)
    try:
        datastore = build_datastore(model, ids, staging, config, batch_size=batch_size, max_tokens=max_tokens,
                                    progress=progress)
        datastore.save_pretrained(staging)
        del datastore
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_output_dir(staging, folder, BUILD_SCRIPT, keep=())
    return folder, Datastore.from_pretrained(folder)


@torch.no_grad()
def _batches(model, datastore: Datastore, blocks: torch.Tensor, k: int, batch_size: int):
    """Per batch of block rows: ids `(B, T)`, LM logits `(B*T, V)`, neighbours' distances and tokens `(B*T, k)`,
    queries `(B*T, d)`: one forward and one search, shared by every grid point."""
    captured: list[torch.Tensor] = []
    with capture_keys(model, captured.append, datastore.config.layer, datastore.config.site):
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]  # (B, T)
            captured.clear()
            logits = model(input_ids=batch).logits.float()  # (B, T, V)
            queries = captured[-1].float().reshape(-1, captured[-1].shape[-1]).numpy()  # (B*T, d)
            distances, tokens = datastore.search(queries, k)
            yield batch, logits.reshape(-1, logits.shape[-1]), torch.from_numpy(distances), \
                torch.from_numpy(tokens), queries


def heldout_nll(model, datastore: Datastore, blocks: torch.Tensor, configs: Sequence[KnnLMConfig | None],
                batch_size: int = 8, max_queries: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Summed next-token NLL `(len(configs), num_blocks)` of each block under each config (None: the LM alone,
    else the kNN-LM mixture of `mix`), and up to `max_queries` held-out queries `(Q, d)` for the index
    comparison. Memory: one batch of logits at a time."""
    k = max([c.k for c in configs if c is not None] or [1])
    nll = torch.zeros(len(configs), len(blocks), dtype=torch.float64)
    queries, kept, row = [], 0, 0
    for batch, logits, distances, tokens, batch_queries in _batches(model, datastore, blocks, k, batch_size):
        B, T = batch.shape
        keep = (torch.arange(B * T) % T) < T - 1  # positions with a next token inside the block
        targets = batch[:, 1:].reshape(-1)  # (B*(T-1),)
        distributions = {}  # (k, temperature) -> p_kNN: the grid's lambdas and modes share it
        for i, config in enumerate(configs):
            if config is None:
                log_probs = torch.log_softmax(logits[keep], -1)
            else:
                key = (config.k, config.temperature)
                if key not in distributions:
                    distributions[key] = knn_distribution(distances[keep, : config.k].numpy(),
                                                          tokens[keep, : config.k].numpy(), config.temperature)
                log_probs = mix(logits[keep], distributions[key], config)
            picked = -log_probs.gather(1, targets[:, None]).view(B, T - 1)
            nll[i, row : row + B] = picked.double().sum(1)
        if kept < max_queries:
            queries.append(batch_queries[: max_queries - kept])
            kept += len(queries[-1])
        row += B
    return nll, (np.concatenate(queries) if queries else np.zeros((0, datastore.keys.shape[1]), np.float32))


def perplexity_comparison(model, datastore: Datastore, blocks: torch.Tensor, k: int, lambdas: Sequence[float],
                          temperatures: Sequence[float], lambda_modes: Sequence[str] = ("fixed",),
                          batch_size: int = 8, max_queries: int = 0) -> tuple[dict, np.ndarray]:
    """Pick (lambda, temperature, mode) on the first half of `blocks` (the tuning half), report the held-out
    perplexity with and without kNN-LM on the second half (the test half), and every grid point on both. Also
    returns held-out queries (`heldout_nll`)."""
    if len(blocks) < 2:
        raise ValueError("perplexity needs at least 2 held-out blocks (one to tune lambda on, one to report on); "
                         "raise --max_eval_files or lower --block_size.")
    points = [(mode, lam, t) for mode in lambda_modes for lam in lambdas for t in temperatures]
    configs = [None] + [KnnLMConfig(k=k, lambda_=lam, temperature=t, lambda_mode=mode, lambda_scale=t)
                        for mode, lam, t in points]
    nll, queries = heldout_nll(model, datastore, blocks, configs, batch_size, max_queries)
    half = len(blocks) // 2
    per_half = (blocks.shape[1] - 1) * torch.tensor([half, len(blocks) - half], dtype=torch.float64)
    tune = torch.exp(nll[:, :half].sum(1) / per_half[0])  # (configs,)
    test = torch.exp(nll[:, half:].sum(1) / per_half[1])
    grid = [{"lambda": lam, "temperature": t, "lambda_mode": mode, "tune_perplexity": float(tune[i + 1]),
             "test_perplexity": float(test[i + 1])} for i, (mode, lam, t) in enumerate(points)]
    best = min(grid, key=lambda g: g["tune_perplexity"])
    return {"k": k, "tune_blocks": half, "test_blocks": len(blocks) - half, "lm_perplexity": float(test[0]),
            "lm_perplexity_tune_half": float(tune[0]), "knn_lm_perplexity": best["test_perplexity"], "best": best,
            "relative_reduction": 1.0 - best["test_perplexity"] / float(test[0]), "grid": grid}, queries


def auto_temperatures(model, datastore: Datastore, blocks: torch.Tensor,
                      factors: Sequence[float] = (0.1, 0.3, 1.0, 3.0)) -> list[float]:
    """Temperatures as multiples of the median nearest-neighbour squared distance of held-out queries (`blocks`,
    a batch or two): the distance scale depends on the model and the layer."""
    _, _, distances, _, _ = next(_batches(model, datastore, blocks, 1, len(blocks)))
    nearest = distances[:, 0][torch.isfinite(distances[:, 0])]
    median = float(nearest.median()) if len(nearest) else 1.0
    return [max(median * f, 1e-6) for f in factors]


def decode_latency(model, datastore: Datastore, prompts: torch.Tensor, new_tokens: int, knn_config: KnnLMConfig,
                   repeats: int = 7, threads: int = 1) -> dict:
    """Seconds per generated token (greedy, `(B, T)` prompts) of three paths at `threads` torch threads: plain
    `generate`, kNN-LM with the search sequential (in the logits processor) and overlapped (in the worker process,
    sent from the key hook). With 2 cores and 1 torch thread the worker has a core of its own; a fourth path, plain
    `generate` at the caller's thread count (when it differs), shows whether the baseline chosen is the faster one.

    The paths run interleaved, `repeats` rounds of one run each (order rotated every round). Two overheads per path:
    `overhead_*`, the median over rounds of that round's time against the same round's plain run (the runs of a
    round see nearly the same machine), and `overhead_*_fastest`, the fastest round against plain's fastest (as
    `timeit` advises: slower runs are the machine interfering, not the code; here identical plain runs of 128
    tokens varied from 2.2 to 4.2 ms per token on an idle VM). A timing measurement all the same: run it on a quiet
    machine. Also checks that both kNN-LM paths gave the same tokens."""
    if repeats < 1 or new_tokens < 1 or threads < 1:
        raise ValueError(f"repeats ({repeats}), new_tokens ({new_tokens}) and threads ({threads}) must be >= 1.")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    caller_threads = torch.get_num_threads()

    with KnnLM(model, datastore, knn_config, overlap=False) as sequential, \
            KnnLM(model, datastore, knn_config, overlap=True) as overlapped:
        paths = {"plain": (threads, lambda: model.generate(prompts, **kwargs)),  # name -> (torch threads, run)
                 "sequential": (threads, lambda: sequential.generate(prompts, **kwargs)),
                 "overlapped": (threads, lambda: overlapped.generate(prompts, **kwargs))}
        if caller_threads != threads:
            paths["plain_caller_threads"] = (caller_threads, lambda: model.generate(prompts, **kwargs))
        try:
            outputs = {}
            for name, (count, run) in paths.items():  # warm-up (worker start, faiss buffers); the tokens
                torch.set_num_threads(count)
                outputs[name] = run()
            names, times = list(paths), {name: [] for name in paths}
            for round_index in range(repeats):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    count, run = paths[name]
                    torch.set_num_threads(count)  # outside the timed run
                    started = time.perf_counter()
                    run()
                    times[name].append((time.perf_counter() - started) / new_tokens)
        finally:
            torch.set_num_threads(caller_threads)

    compared = [name for name in names if name != "plain"]
    per_round = {name: [t / plain - 1.0 for t, plain in zip(times[name], times["plain"])]  # vs the round's plain
                 for name in compared}
    return {"seconds_per_token": {name: statistics.median(values) for name, values in times.items()},
            "seconds_per_token_per_round": times, "new_tokens": new_tokens, "batch": int(prompts.shape[0]),
            "prompt_tokens": int(prompts.shape[1]), "repeats": repeats, "torch_threads": threads,
            "caller_threads": caller_threads, "overhead_per_round": per_round,
            **{f"overhead_{name}": statistics.median(per_round[name]) for name in compared},
            **{f"overhead_{name}_fastest": min(times[name]) / min(times["plain"]) - 1.0 for name in compared},
            "same_tokens": bool(torch.equal(outputs["sequential"], outputs["overlapped"]))}


def evaluate_retrieval(model_dir: str | os.PathLike, datastore_dir: str | os.PathLike, max_eval_files: int = 12,
                       max_blocks: int = 64, k: int = 8, lambdas: Sequence[float] = (0.1, 0.25, 0.5),
                       temperatures: Sequence[float] | None = None, lambda_modes: Sequence[str] = ("fixed",),
                       index_kinds: Sequence[str] = ("flat", "hnsw", "ivf"), index_k: int = 8,
                       max_index_queries: int = 2000,
                       latency_tokens: int = 0, latency_repeats: int = 7, latency_threads: int = 1) -> dict:
    """Everything eval_retrieval reports, as one results dict. Held-out text: `lightarch.data.corpus.heldout_texts`
    (the files the model's run recorded as held out). Index comparison and latency are timings (quiet machine)."""
    from ..data.corpus import heldout_texts, token_blocks, tokenize_documents

    model, tokenizer = load_causal_lm(model_dir)
    datastore = Datastore.from_pretrained(datastore_dir)
    block_size = datastore.config.block_size
    texts, source = heldout_texts(model_dir, max_files=max_eval_files)
    blocks = token_blocks(tokenize_documents(tokenizer, texts, desc="Tokenizing held-out"), block_size)[:max_blocks]
    if len(blocks) < 2:
        raise ValueError(f"the held-out text gives {len(blocks)} block(s) of {block_size} tokens; at least 2 are "
                         "needed: raise --max_eval_files or build the datastore with a smaller --block_size.")
    started = time.perf_counter()
    temperatures = list(temperatures or auto_temperatures(model, datastore, blocks[:4]))
    comparison, queries = perplexity_comparison(model, datastore, blocks, k, lambdas, temperatures, lambda_modes,
                                                max_queries=max_index_queries if index_kinds else 0)
    results = {
        "model": str(model_dir), "datastore": str(datastore_dir),
        "datastore_config": {key: value for key, value in vars(datastore.config).items() if key != "extra"},
        "num_keys": len(datastore), "heldout": source, "block_size": block_size, "perplexity": comparison,
        "perplexity_seconds": time.perf_counter() - started, "torch_num_threads": torch.get_num_threads(),
    }
    if index_kinds:
        results["index_comparison"] = compare_indexes(datastore.keys, queries, kinds=tuple(index_kinds), k=index_k,
                                                      ef_search=datastore.config.ef_search,
                                                      nprobe=datastore.config.nprobe)
    if latency_tokens > 0:
        best = results["perplexity"]["best"]
        knn_config = KnnLMConfig(k=k, lambda_=best["lambda"], temperature=best["temperature"],
                                 lambda_mode=best["lambda_mode"], lambda_scale=best["temperature"])
        prompt = blocks[:1, : min(32, block_size)]
        results["latency"] = decode_latency(model, datastore, prompt, latency_tokens, knn_config, latency_repeats,
                                            threads=latency_threads)
    return results


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def perplexity_table(results: dict) -> list[str]:
    """Markdown lines: perplexity with and without kNN-LM on the test half."""
    ppl = results["perplexity"]
    best = ppl["best"]
    return ["| | perplexity (test half) |", "|---|---:|",
            f"| LM alone | {_fmt(ppl['lm_perplexity'])} |",
            f"| kNN-LM (k={ppl['k']}, lambda={best['lambda']}, T={best['temperature']:.3g}, {best['lambda_mode']}) | "
            f"{_fmt(ppl['knn_lm_perplexity'])} |", "",
            f"Relative reduction: **{100 * ppl['relative_reduction']:.1f}%**.", ""]


def timing_tables(results: dict) -> list[str]:
    """Markdown lines: the index comparison and the decoding latency, where measured."""
    lines = []
    if results.get("index_comparison"):
        k = results["index_comparison"][0]["k"]
        lines += [f"| index | factory | build s | MB | queries/s (batch) | queries/s (one at a time) | recall@{k} |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in results["index_comparison"]:
            lines.append(f"| {row['index']} | {row['factory']} | {_fmt(row['build_seconds'])} | "
                         f"{_fmt(row['bytes'] / 1e6, 1)} | {_fmt(row['queries_per_second_batched'], 0)} | "
                         f"{_fmt(row['queries_per_second_single'], 0)} | {row[f'recall_at_{k}']:.3f} |")
        lines.append("")
    if results.get("latency"):
        lat = results["latency"]
        s = lat["seconds_per_token"]
        rounds = lat.get("overhead_per_round", {})  # results files before the interleaved rounds have neither
        fastest = lat.get("seconds_per_token_per_round", {})

        def row(label: str, name: str) -> str:
            """ms/token (median), overhead (median of paired rounds), the rounds' range, the fastest round's
            ms/token and overhead; plain has no overheads, and older results no rounds."""
            paired = f"{100 * lat[f'overhead_{name}']:+.1f}%" if name != "plain" else ""
            spread = (f"{100 * min(rounds[name]):+.1f}% .. {100 * max(rounds[name]):+.1f}%" if name in rounds
                      else "")
            best = _fmt(1e3 * min(fastest[name])) if fastest else ""
            best_overhead = (f"{100 * lat[f'overhead_{name}_fastest']:+.1f}%" if fastest and name != "plain"
                             else "")
            return "| " + " | ".join([label, _fmt(1e3 * s[name]), paired, spread, best, best_overhead]) + " |"

        lines += ["| decoding | ms / token (median) | vs plain (median of paired rounds) | rounds' range | "
                  "ms / token (fastest round) | vs plain (fastest rounds) |", "|---|---:|---:|---:|---:|---:|",
                  row("plain generate", "plain"), row("kNN-LM, search sequential", "sequential"),
                  row("kNN-LM, search overlapped", "overlapped")]
        if "plain_caller_threads" in s:
            lines.append(row(f"plain generate, {lat['caller_threads']} torch threads", "plain_caller_threads"))
        threads = f", {lat['torch_threads']} torch thread(s)" if "torch_threads" in lat else ""
        lines += ["", f"{lat['repeats']} interleaved rounds of {lat['new_tokens']} tokens (batch {lat['batch']}"
                  f"{threads}); same tokens sequential vs overlapped: {lat['same_tokens']}.", ""]
    return lines


def qa_summary(qa_results: dict) -> dict:
    """What eval_retrieval keeps of a reader's QA evaluation (`lightarch.training.retrieval_qa.evaluate_saved_reader`,
    whose full record is in `<reader>/qa_eval`): exact match with and without retrieval, overall and per kind."""
    return {"model_dir": qa_results["model_dir"], "factual_accuracy": qa_results["factual_accuracy"],
            "num_passages": qa_results["qa_settings"]["num_passages"], "evaluation": qa_results["qa"]}


def qa_table(results: dict) -> list[str]:
    """Markdown lines: the factual-QA exact match, where measured."""
    if not results.get("qa"):
        return []
    from .qa import qa_markdown

    qa = results["qa"]
    return [f"Factual QA (reader `{qa['model_dir']}`, {qa['num_passages']} BM25 passages):", "",
            qa_markdown(qa["evaluation"], qa["num_passages"]).strip(), ""]


def markdown(results: dict) -> str:
    """The results as markdown tables (perplexity, index comparison, latency, factual QA)."""
    ppl, config = results["perplexity"], results["datastore_config"]
    return "\n".join([
        f"# Retrieval evaluation: {results['model']}", "",
        f"Datastore `{results['datastore']}`: {results['num_keys']:,} keys (layer {config['layer']}, {config['site']}, "
        f"index {config['index']}); held-out text: {results['heldout']}; blocks of {results['block_size']} tokens, "
        f"lambda / temperature chosen on {ppl['tune_blocks']} blocks, reported on the other {ppl['test_blocks']}.",
        "", *perplexity_table(results), *timing_tables(results), *qa_table(results)])


def plots(results: dict) -> dict[str, bytes]:
    """PNGs: perplexity by lambda (each temperature a line, the LM alone dashed); index recall vs queries/s;
    latency bars."""
    from ..evaluation.plots import figure_to_png, pyplot

    plt = pyplot()
    out = {}
    ppl = results["perplexity"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for temperature in sorted({g["temperature"] for g in ppl["grid"]}):
        points = sorted((g["lambda"], g["test_perplexity"]) for g in ppl["grid"]
                        if g["temperature"] == temperature and g["lambda_mode"] == ppl["best"]["lambda_mode"])
        ax.plot(*zip(*points), "o-", label=f"T={temperature:.3g}")
    ax.axhline(ppl["lm_perplexity"], color="gray", ls="--", label="LM alone")
    ax.set_xlabel("lambda (weight of p_kNN)")
    ax.set_ylabel("held-out perplexity (test half)")
    ax.set_title("kNN-LM perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out["perplexity.png"] = figure_to_png(fig)
    if results.get("index_comparison"):
        k = results["index_comparison"][0]["k"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in results["index_comparison"]:
            ax.scatter(row["queries_per_second_single"], row[f"recall_at_{k}"], s=60)
            ax.annotate(row["index"], (row["queries_per_second_single"], row[f"recall_at_{k}"]))
        ax.set_xscale("log")
        ax.set_xlabel("queries / s (one at a time)")
        ax.set_ylabel(f"recall@{k} vs exact")
        ax.set_title("Index comparison")
        ax.grid(alpha=0.3)
        out["index_comparison.png"] = figure_to_png(fig)
    if results.get("latency"):
        s = results["latency"]["seconds_per_token"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [n for n in ("plain", "sequential", "overlapped", "plain_caller_threads") if n in s]
        ax.bar([n.replace("_", " ") for n in names], [1e3 * s[n] for n in names],
               color=["tab:gray", "tab:red", "tab:green", "tab:blue"][: len(names)])
        ax.set_ylabel("ms / generated token")
        ax.set_title("Decoding with kNN-LM retrieval")
        out["latency.png"] = figure_to_png(fig)
    return out


def model_card_section(results: dict) -> str:
    """The retrieval section of a model card, from the shipped template `model_cards/retrieval.md`."""
    from ..evaluation.model_cards import model_card_template, render_model_card

    template = model_card_template("retrieval")
    ppl, config = results["perplexity"], results["datastore_config"]
    return render_model_card(template, {
        "num_keys": f"{results['num_keys']:,}", "layer": config["layer"], "site": config["site"],
        "index": config["index"], "source": config.get("source") or "(not recorded)", "heldout": results["heldout"],
        "lm_perplexity": _fmt(ppl["lm_perplexity"]), "knn_lm_perplexity": _fmt(ppl["knn_lm_perplexity"]),
        "reduction": f"{100 * ppl['relative_reduction']:.1f}", "k": ppl["k"], "lambda": ppl["best"]["lambda"],
        "temperature": f"{ppl['best']['temperature']:.3g}", "lambda_mode": ppl["best"]["lambda_mode"],
        "tables": "\n".join(perplexity_table(results) + timing_tables(results)).strip(),
    })


def check_eval_output_dir(model_dir, datastore_dir, output_dir=None) -> Path:
    """The folder eval_retrieval writes (default <model_dir>/retrieval_eval), checked by the output-folder rule."""
    from ..training.checkpoints import check_output_dir

    return check_output_dir(output_dir or Path(model_dir) / "retrieval_eval", EVAL_SCRIPT,
                            {"--model_dir": model_dir, "--datastore": datastore_dir})


def save_results(results: dict, output_dir: str | os.PathLike | None = None) -> str:
    """results.json, results.md, model_card_section.md and the PNGs as one folder, atomically; returns the
    markdown."""
    from ..training.checkpoints import atomic_save_pretrained

    folder = check_eval_output_dir(results["model"], results["datastore"], output_dir)
    text = markdown(results)
    files = {"results.json": json.dumps(results, indent=2) + "\n", "results.md": text,
             "model_card_section.md": model_card_section(results), **plots(results)}
    atomic_save_pretrained(folder, extra_files=files, keep=(), script=EVAL_SCRIPT)
    return text
