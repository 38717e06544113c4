"""Passkey retrieval accuracy by prompt length and key depth: the grid, its verdict, table and heatmap.

`evaluate_passkey` measures a model in memory; `evaluate_passkey_folder` a saved one (what
`scripts/eval_long_context.py` runs); `merge_results` pools shards of one grid run in parallel; `save_results` writes
results.json, results.md and heatmap.png, and the default run's table into the model card.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from ..data.passkey import NUM_DIGITS, PasskeyTask
from ..training.checkpoints import write_atomically
from .metrics import load_metric
from .plots import figure_to_png, pyplot

CARD_MARKERS = ("<!-- long-context-eval -->", "<!-- /long-context-eval -->")


def score(predicted: str, passkey: str) -> dict[str, float]:
    """`exact`: 1.0 when all digits match (nothing more, nothing less); `digits`: fraction of positions right (the
    `passkey_accuracy` evaluate metric of `lightarch.evaluation.metrics` on one prediction)."""
    result = load_metric("passkey_accuracy").compute(predictions=[predicted], references=[passkey])
    return {"exact": result["exact"], "digits": result["digits"]}


def _pooled(row: dict) -> dict:
    """Exact / digit accuracy over the cells of one length, weighted by their prompt counts."""
    total = sum(c["count"] for c in row.values())
    return {"exact": sum(c["exact"] * c["count"] for c in row.values()) / total,
            "digits": sum(c["digits"] * c["count"] for c in row.values()) / total, "count": total}


@torch.no_grad()
def evaluate_passkey(model, task: PasskeyTask, lengths, depths, samples: int, seed: int = 0,
                     max_batch_tokens: int = 65536, progress=None, distractors: int = 0) -> dict:
    """Greedy exact-match accuracy for every (length, depth) cell, `samples` prompts each (with `distractors` other
    numbers in each prompt's filler).

    Prompts of one cell share a length, so they are batched without padding (at most `max_batch_tokens` prompt
    tokens per `generate` call); the model's chunked prefill (`prefill_chunk_size`) bounds memory. The prompts of a
    cell depend only on (seed, length, depth). `progress` is called with the number of prompts done.

    Returns {"cells": {length: {depth: {exact, digits, count, achieved_depth, predictions}}},
             "overall": {length: {exact, digits, count}}} (keys as strings, JSON-ready).
    """
    model.eval()
    device = next(model.parameters()).device
    pad_token_id = task.tokenizer.pad_token_id
    cells, overall = {}, {}
    metric = load_metric("passkey_accuracy")  # exact / digit accuracy of each cell
    for length in lengths:
        row = {}
        for depth in depths:
            rng = random.Random(f"passkey-{seed}-{length}-{depth}")
            prompts = [task.build(length, depth, rng=rng, distractors=distractors) for _ in range(samples)]
            batch_size = max(1, max_batch_tokens // length)
            predictions = []
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                input_ids = torch.tensor([p.input_ids for p in batch], device=device)
                output = model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NUM_DIGITS,
                    min_new_tokens=NUM_DIGITS, do_sample=False, pad_token_id=pad_token_id,
                )
                for prompt, generated in zip(batch, output[:, length:]):
                    predictions.append({"passkey": prompt.passkey, "predicted": task.passkey_from_ids(generated)})
                if progress is not None:
                    progress(len(batch))
            accuracy = metric.compute(predictions=[p["predicted"] for p in predictions],
                                      references=[p["passkey"] for p in predictions])
            row[str(depth)] = {
                "exact": accuracy["exact"],
                "digits": accuracy["digits"],
                "count": accuracy["count"],
                "achieved_depth": sum(p.depth for p in prompts) / len(prompts),
                "predictions": predictions,
            }
        cells[str(length)] = row
        overall[str(length)] = _pooled(row)
    return {"cells": cells, "overall": overall}


# -------------------------------------------------------------------------------------------------- the grid


def parse_lengths(text: str) -> list[int]:
    """`--lengths` '1K,512,200000' -> sorted distinct token counts ('K' means x1024)."""
    values = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            value = int(float(item[:-1]) * 1024) if item[-1] in "kK" else int(item)
        except ValueError:
            raise ValueError(f"--lengths: {item!r} is not a length; write e.g. '1K,4K,200000'.") from None
        if value < 1:
            raise ValueError(f"--lengths: every length must be >= 1, got {item!r}.")
        values.append(value)
    if not values:
        raise ValueError(f"--lengths must list at least one length, got {text!r}.")
    return sorted(set(values))


def parse_depths(text: str) -> list[float]:
    """`--depths` '0,0.5,1' -> sorted distinct key depths in [0, 1]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--depths must be numbers in [0, 1], got {text!r}")
    return sorted(set(values))


def format_length(n: int) -> str:
    """1024 -> '1K', 96 -> '96' (what `parse_lengths` reads back)."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def evaluate_passkey_folder(model_dir: str | Path, lengths: Sequence[int], depths: Sequence[float], samples: int,
                            seed: int = 0, distractors: int = 0, max_batch_tokens: int = 65536,
                            train_length: int | None = None, good_accuracy: float = 0.9,
                            show_progress: bool = True) -> dict:
    """Accuracy of the model saved in `model_dir` on the (length, depth) grid, `samples` prompts per cell: the
    results dict `save_results` writes (evaluation, verdict, timings, versions).

    `train_length` (marked on the heatmap, used by the verdict) defaults to the folder's results.json
    (`data.max_length`, written by `train_passkey`). Bad arguments raise a ValueError naming the option.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}.")
    if distractors < 0:
        raise ValueError(f"--distractors must be >= 0, got {distractors}.")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no saved model there (run scripts/train_passkey.py first).")
    if train_length is None and (model_dir / "results.json").is_file():
        train_length = json.loads((model_dir / "results.json").read_text()).get("data", {}).get("max_length")
    task = PasskeyTask(AutoTokenizer.from_pretrained(model_dir))
    too_short = [n for n in lengths if n < task.min_length]
    if too_short:
        raise ValueError(f"--lengths {too_short} are shorter than the shortest passkey prompt ({task.min_length}).")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    started = time.perf_counter()
    with tqdm(total=len(lengths) * len(depths) * samples, desc="passkey eval", unit="prompt", file=sys.stderr,
              disable=not show_progress) as progress:
        evaluation = evaluate_passkey(model, task, lengths, depths, samples, seed=seed,
                                      max_batch_tokens=max_batch_tokens, progress=progress.update,
                                      distractors=distractors)
    results = {
        "model": str(model_dir),
        "arguments": {"samples": samples, "distractors": distractors, "seed": seed,
                      "max_batch_tokens": max_batch_tokens, "good_accuracy": good_accuracy},
        "lengths": list(lengths),
        "depths": list(depths),
        "train_length": train_length,
        "evaluation": evaluation,
        "seconds": time.perf_counter() - started,
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    results["verdict"] = verdict(evaluation["overall"], lengths, train_length, good_accuracy)
    return results


def verdict(overall: dict, lengths: Sequence[int], train_length: int | None, good: float) -> str:
    """One sentence on how far the model generalises: the longest length with accuracy >= good from the start,
    then the accuracy at the first length below it."""
    trained = f"trained at <= {train_length} tokens" if train_length else "training length unknown"
    accuracies = [(n, overall[str(n)]["exact"]) for n in lengths]
    reach = None
    for n, accuracy in accuracies:
        if accuracy < good:
            break
        reach = n
    if reach is None:
        # Below the mark from the start: say how well it holds its own accuracy at the training length instead.
        inside = [(n, a) for n, a in accuracies if train_length and n <= train_length] or accuracies[:1]
        base_n, base = inside[-1]
        text = (f"{trained}; accuracy {100 * base:.0f}% at {base_n} tokens (below {100 * good:.0f}% already "
                f"there)")
        later = [(n, a) for n, a in accuracies if n > base_n]
        held = base_n
        for n, accuracy in later:
            if accuracy < base - 0.15:
                break
            held = n
        if held > base_n:
            text += f", within 15 points of that up to {held} tokens"
        dropped = [(n, a) for n, a in later if n > held]
        if dropped:
            text += f", falls to {100 * dropped[0][1]:.0f}% at {dropped[0][0]}"
            if len(dropped) > 1:
                text += f" and {100 * dropped[-1][1]:.0f}% at {dropped[-1][0]}"
        return text + "."
    text = f"{trained}; accuracy >= {100 * good:.0f}% up to {reach} tokens"
    later = [(n, a) for n, a in accuracies if n > reach]
    if not later:
        text += ", the longest length evaluated"
    if train_length and reach > train_length:
        text += f" ({reach / train_length:.0f}x the training length)"
    if later:
        n, accuracy = later[0]
        text += f", falls to {100 * accuracy:.0f}% at {n}"
        if len(later) > 1:
            text += f" and {100 * later[-1][1]:.0f}% at {later[-1][0]}"
    return text + "."


def merge_results(shards: list[dict], good_accuracy: float = 0.9) -> dict:
    """One results dict from several evaluations of the same model (different lengths / depths, e.g. run in
    parallel); a cell measured in several shards pools its prompts. A ValueError when they are not one grid."""
    if len({shard["model"] for shard in shards}) != 1:
        raise ValueError(f"Shards come from different models: {sorted({shard['model'] for shard in shards})}")
    if len({shard["arguments"].get("distractors", 0) for shard in shards}) > 1:
        raise ValueError("Shards were run with different --distractors; merge runs of one setting only.")
    lengths = sorted({n for shard in shards for n in shard["lengths"]})
    depths = sorted({d for shard in shards for d in shard["depths"]})
    cells: dict[str, dict] = {}
    for shard in shards:
        for length, row in shard["evaluation"]["cells"].items():
            for depth, cell in row.items():
                previous = cells.setdefault(length, {}).get(depth)
                if previous is None:
                    cells[length][depth] = dict(cell)
                    continue
                count = previous["count"] + cell["count"]
                for key in ("exact", "digits", "achieved_depth"):
                    previous[key] = (previous[key] * previous["count"] + cell[key] * cell["count"]) / count
                previous["count"] = count
                previous["predictions"] = previous["predictions"] + cell["predictions"]
    missing = [(n, d) for n in lengths for d in depths if str(d) not in cells.get(str(n), {})]
    if missing:
        raise ValueError(f"The shards do not cover the grid: missing (length, depth) cells {missing}")
    cells = {str(n): {str(d): cells[str(n)][str(d)] for d in depths} for n in lengths}
    first = shards[0]
    results = {
        **{k: first[k] for k in ("model", "train_length", "torch_num_threads", "torch", "transformers")},
        "arguments": {**first["arguments"], "samples": min(c["count"] for row in cells.values()
                                                           for c in row.values())},
        "lengths": lengths,
        "depths": depths,
        "evaluation": {"cells": cells, "overall": {length: _pooled(row) for length, row in cells.items()}},
        "seconds": sum(shard["seconds"] for shard in shards),
        "merged_from": len(shards),
    }
    results["verdict"] = verdict(results["evaluation"]["overall"], lengths, results["train_length"], good_accuracy)
    return results


def merge_result_folders(folders: Sequence[str | Path], good_accuracy: float = 0.9) -> dict:
    """`merge_results` of the results.json in each folder (or of the given results.json files)."""
    paths = [Path(f) / "results.json" if Path(f).is_dir() else Path(f) for f in folders]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise ValueError(f"--merge: no results.json at {', '.join(absent)}.")
    return merge_results([json.loads(p.read_text()) for p in paths], good_accuracy)


# ----------------------------------------------------------------------------------------------- the outputs


def accuracy_table(evaluation: dict, lengths: Sequence[int], depths: Sequence[float],
                   train_length: int | None = None) -> str:
    """Markdown: one row per length (marked "(train)" up to `train_length`), exact match per depth, mean, digits."""
    cells, overall = evaluation["cells"], evaluation["overall"]
    lines = ["| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean | digits right |",
             "|---:|" + "---:|" * (len(depths) + 2)]
    for n in lengths:
        marker = " (train)" if train_length and n <= train_length else ""
        row = " | ".join(f"{100 * cells[str(n)][str(d)]['exact']:.0f}%" for d in depths)
        lines.append(f"| {format_length(n)}{marker} | {row} | {100 * overall[str(n)]['exact']:.0f}% | "
                     f"{100 * overall[str(n)]['digits']:.0f}% |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """results.md: how it was measured, the verdict, the accuracy table."""
    arguments = results["arguments"]
    return "\n".join([
        f"# Passkey retrieval: {results['model']}",
        "",
        f"Greedy exact match of all 5 digits, {arguments['samples']} prompts per cell (prompt lengths in "
        f"tokens x depth of the key line in the filler)"
        + (f", {arguments['distractors']} other 5-digit numbers in each filler" if arguments.get("distractors")
           else "")
        + f"; {results['seconds']:.0f} s on "
        f"{results['torch_num_threads']} thread(s), torch {results['torch']}, transformers {results['transformers']}"
        + (f" (merged from {results['merged_from']} shards run in parallel; seconds summed)."
           if results.get("merged_from") else "."),
        "",
        f"**{results['verdict']}**",
        "",
        accuracy_table(results["evaluation"], results["lengths"], results["depths"], results.get("train_length")),
    ]) + "\n"


def heatmap(results: dict) -> bytes:
    """PNG: exact-match accuracy by length x depth, annotated, the longest training length marked."""
    plt = pyplot()
    lengths, depths = results["lengths"], results["depths"]
    cells = results["evaluation"]["cells"]
    grid = [[cells[str(n)][str(d)]["exact"] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2.5, 0.7 * len(depths) + 2))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.0f}%", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth (0 = start, 1 = end)")
    train_length = results.get("train_length")
    if train_length:
        trained = [j for j, n in enumerate(lengths) if n <= train_length]
        if trained:
            ax.axvline(trained[-1] + 0.5, color="black", lw=2, ls="--",
                       label=f"longest training length ({train_length} tokens): trained lengths to the left")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="exact-match accuracy")
    trained_at = f", trained at <= {train_length} tokens" if train_length else ""
    ax.set_title(f"Passkey retrieval accuracy ({results['arguments']['samples']} prompts per cell{trained_at})")
    fig.tight_layout()
    return figure_to_png(fig)


EVAL_SCRIPT = "eval_long_context.py"  # the writer named in the output folder's marker (`check_output_dir`)


def check_results_dir(model: str | Path, output_dir: str | Path | None = None, distractors: int = 0,
                      merged: Sequence[str | Path] = ()) -> Path:
    """The folder `save_results` writes: `output_dir`, or by default <model>/long_context_eval (with distractors:
    <model>/long_context_eval_distractors<N>). A ValueError names it when it is (or holds) the `model` folder or one
    of the `merged` shards, or is not empty and no earlier output of this evaluation
    (`lightarch.training.checkpoints.check_output_dir`)."""
    from ..training.checkpoints import check_output_dir

    model = Path(model)
    default = model / ("long_context_eval" + (f"_distractors{distractors}" if distractors else ""))
    inputs = {"--model": model, **{f"--merge {Path(shard)}": shard for shard in merged}}
    return check_output_dir(output_dir or default, EVAL_SCRIPT, inputs)


def write_outputs(output_dir: str | Path, results: dict) -> str:
    """results.json, results.md and heatmap.png as `output_dir`, atomically (`check_results_dir` first: an
    unrelated folder is never replaced); returns the markdown."""
    from ..training.checkpoints import atomic_save_pretrained

    folder = check_results_dir(results["model"], output_dir)
    text = markdown(results)
    atomic_save_pretrained(folder, extra_files={"results.json": json.dumps(results, indent=2) + "\n",
                                                "results.md": text, "heatmap.png": heatmap(results)},
                           keep=(), script=EVAL_SCRIPT)
    return text


def update_model_card(model_dir: str | Path, results: dict) -> bool:
    """Put the accuracy table between the markers of the model folder's README.md (the card `train_passkey`
    wrote), replacing what was there; False when there is no card with the markers."""
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8")
    start, end = CARD_MARKERS
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    table = markdown(results).split("\n", 2)[2].strip()  # without the "# Passkey retrieval: <folder>" title
    write_atomically(card, f"{head}{start}\n{table}\n\nCommand: `python scripts/eval_long_context.py "
                           f"--lengths {','.join(format_length(n) for n in results['lengths'])} --samples "
                           f"{results['arguments']['samples']}`.\n{end}{tail}")
    return True


def save_results(results: dict, output_dir: str | Path | None = None) -> str:
    """Write the outputs into `output_dir`, or by default into <model>/long_context_eval (with distractors:
    <model>/long_context_eval_distractors<N>); the default run without distractors documents the model, so its
    table also goes into the model card. Returns the markdown."""
    model_dir, distractors = Path(results["model"]), results["arguments"].get("distractors", 0)
    text = write_outputs(check_results_dir(model_dir, output_dir, distractors), results)
    if not output_dir and not distractors:
        update_model_card(model_dir, results)
    return text
