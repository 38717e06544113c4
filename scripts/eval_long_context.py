#!/usr/bin/env python
"""Passkey retrieval accuracy of a saved model by context length x key depth (see lightarch.data.passkey).

For every (length, depth) cell, --samples prompts of exactly `length` tokens hide a random 5-digit key at `depth`
of the filler; the model generates 5 tokens greedily (`generate`, with the model's chunked prefill keeping memory
bounded), and a prompt counts as correct only if all five digits match. Writes to --output_dir (default
<model>/long_context_eval):

    results.json   every cell: exact-match and per-digit accuracy, achieved depth, each prediction
    results.md     the accuracy table and a one-line verdict on generalisation beyond the training length
    heatmap.png    accuracy by length x depth, annotated, the training length marked

    python scripts/eval_long_context.py                                  # outputs/passkey, 1K..32K x 5 depths
    python scripts/eval_long_context.py --model outputs/passkey --lengths 1K,64K --samples 10
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser  # noqa: E402

import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch.data.passkey import PasskeyTask  # noqa: E402
from lightarch.evaluation.passkey import evaluate_passkey  # noqa: E402
from lightarch.training.cli import available_cpus, other_running_processes
from lightarch.evaluation.plots import figure_to_png, pyplot
from lightarch.training.checkpoints import write_atomically


@dataclass
class EvalArguments:
    model: str = field(default="outputs/passkey", metadata={"help": "Folder saved by scripts/train_passkey.py."})
    lengths: str = field(
        default="1K,2K,4K,8K,16K,32K",
        metadata={"help": "Comma-separated prompt lengths in tokens; 'K' means x1024."},
    )
    depths: str = field(default="0,0.25,0.5,0.75,1.0", metadata={"help": "Comma-separated key depths in [0, 1]."})
    samples: int = field(default=5, metadata={"help": "Prompts per (length, depth) cell."})
    distractors: int = field(
        default=0,
        metadata={"help": "Other 5-digit numbers hidden in each prompt's filler ('The sky is 40817.'): the model must "
                  "return the one after 'pass key', not the only digits it sees."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the prompts (keys and filler start)."})
    max_batch_tokens: int = field(
        default=65536, metadata={"help": "Prompt tokens per generate call (prompts of a cell are batched)."}
    )
    train_length: int = field(
        default=0,
        metadata={"help": "Longest training length, marked on the heatmap and used in the verdict; 0 = read it "
                          "from the model folder's results.json (data.max_length)."},
    )
    good_accuracy: float = field(default=0.9, metadata={"help": "Accuracy the verdict calls 'works' (0..1)."})
    num_threads: int = field(
        default=0, metadata={"help": "torch threads; 0 = the available CPUs minus the other running processes."}
    )
    output_dir: str = field(
        default="",
        metadata={"help": "Where to write; empty = <model>/long_context_eval, and the accuracy table also goes into "
                          "the model card (<model>/README.md, between its long-context-eval markers)."},
    )
    merge: str = field(
        default="",
        metadata={"help": "Evaluate nothing: merge the results.json of these comma-separated folders (shards of one "
                          "grid run in parallel, e.g. one per length or depth) into --output_dir. A cell measured in "
                          "several shards pools its prompts."},
    )


def parse_lengths(text: str) -> list[int]:
    values = []
    for item in filter(None, (part.strip().upper() for part in text.split(","))):
        values.append(int(float(item[:-1]) * 1024) if item.endswith("K") else int(item))
    if not values or min(values) < 1:
        raise ValueError(f"--lengths must list positive lengths, got {text!r}")
    return sorted(set(values))


def parse_depths(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--depths must be numbers in [0, 1], got {text!r}")
    return sorted(set(values))


def format_length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def verdict(overall: dict, lengths: list[int], train_length: int | None, good: float) -> str:
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


def markdown(results: dict) -> str:
    lengths, depths = results["lengths"], results["depths"]
    cells, overall = results["evaluation"]["cells"], results["evaluation"]["overall"]
    lines = [
        f"# Passkey retrieval: {results['model']}",
        "",
        f"Greedy exact match of all 5 digits, {results['arguments']['samples']} prompts per cell (prompt lengths in "
        f"tokens x depth of the key line in the filler)"
        + (f", {results['arguments']['distractors']} other 5-digit numbers in each filler"
           if results["arguments"].get("distractors") else "")
        + f"; {results['seconds']:.0f} s on "
        f"{results['torch_num_threads']} thread(s), torch {results['torch']}, transformers {results['transformers']}"
        + (f" (merged from {results['merged_from']} shards run in parallel; seconds summed)."
           if results.get("merged_from") else "."),
        "",
        f"**{results['verdict']}**",
        "",
        "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean | digits right |",
        "|---:|" + "---:|" * (len(depths) + 2),
    ]
    train_length = results.get("train_length")
    for n in lengths:
        marker = " (train)" if train_length and n <= train_length else ""
        row = " | ".join(f"{100 * cells[str(n)][str(d)]['exact']:.0f}%" for d in depths)
        lines.append(f"| {format_length(n)}{marker} | {row} | {100 * overall[str(n)]['exact']:.0f}% | "
                     f"{100 * overall[str(n)]['digits']:.0f}% |")
    return "\n".join(lines) + "\n"


def heatmap(results: dict) -> bytes:
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


def merge_results(shards: list[dict], good_accuracy: float) -> dict:
    """One results dict from several runs of this script on the same model (different lengths / depths)."""
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
    overall = {}
    for length, row in cells.items():
        total = sum(c["count"] for c in row.values())
        overall[length] = {"exact": sum(c["exact"] * c["count"] for c in row.values()) / total,
                           "digits": sum(c["digits"] * c["count"] for c in row.values()) / total, "count": total}
    first = shards[0]
    results = {
        **{k: first[k] for k in ("model", "train_length", "torch_num_threads", "torch", "transformers")},
        "arguments": {**first["arguments"], "samples": min(c["count"] for row in cells.values()
                                                           for c in row.values())},
        "lengths": lengths,
        "depths": depths,
        "evaluation": {"cells": {str(n): {str(d): cells[str(n)][str(d)] for d in depths} for n in lengths},
                       "overall": {str(n): overall[str(n)] for n in lengths}},
        "seconds": sum(shard["seconds"] for shard in shards),
        "merged_from": len(shards),
    }
    results["verdict"] = verdict(results["evaluation"]["overall"], lengths, results["train_length"], good_accuracy)
    return results


def write_outputs(output_dir: Path, results: dict) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    write_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(output_dir / "results.md", text)
    write_atomically(output_dir / "heatmap.png", heatmap(results))
    return text


CARD_MARKERS = ("<!-- long-context-eval -->", "<!-- /long-context-eval -->")


def update_model_card(model_dir: Path, results: dict) -> bool:
    """Put the accuracy table between the markers of the model folder's README.md (the card train_passkey.py
    wrote), replacing what was there; False when there is no card with the markers."""
    card = model_dir / "README.md"
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


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(EvalArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if args.merge:
        folders = [Path(part.strip()) for part in args.merge.split(",") if part.strip()]
        shards = [json.loads(((f / "results.json") if f.is_dir() else f).read_text()) for f in folders]
        try:
            results = merge_results(shards, args.good_accuracy)
        except ValueError as error:
            parser.error(str(error))
        output_dir = Path(args.output_dir) if args.output_dir else Path(results["model"]) / "long_context_eval"
        print(write_outputs(output_dir, results))
        if not args.output_dir:
            update_model_card(Path(results["model"]), results)
        return results
    try:
        lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    except ValueError as error:
        parser.error(str(error))
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    if args.distractors < 0:
        parser.error("--distractors must be >= 0")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model {model_dir}: no saved model there (run scripts/train_passkey.py first).")
    train_length = args.train_length or None
    if train_length is None and (model_dir / "results.json").is_file():
        train_length = json.loads((model_dir / "results.json").read_text()).get("data", {}).get("max_length")

    num_threads = args.num_threads or max(1, available_cpus() - other_running_processes())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        task = PasskeyTask(tokenizer)
        too_short = [n for n in lengths if n < task.min_length]
        if too_short:
            parser.error(f"--lengths {too_short} are shorter than the shortest passkey prompt ({task.min_length}).")
        started = time.perf_counter()
        with tqdm(total=len(lengths) * len(depths) * args.samples, desc="passkey eval", unit="prompt",
                  file=sys.stderr) as progress:
            evaluation = evaluate_passkey(model, task, lengths, depths, args.samples, seed=args.seed,
                                          max_batch_tokens=args.max_batch_tokens, progress=progress.update,
                                          distractors=args.distractors)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)

    results = {
        "model": str(model_dir),
        "arguments": asdict(args),
        "lengths": lengths,
        "depths": depths,
        "train_length": train_length,
        "evaluation": evaluation,
        "seconds": seconds,
        "torch_num_threads": num_threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    results["verdict"] = verdict(evaluation["overall"], lengths, train_length, args.good_accuracy)
    default_dir = model_dir / ("long_context_eval" + (f"_distractors{args.distractors}" if args.distractors else ""))
    output_dir = Path(args.output_dir) if args.output_dir else default_dir
    print(write_outputs(output_dir, results))
    if not args.output_dir and not args.distractors:  # the default run documents the model: its card gets the table
        update_model_card(model_dir, results)
    return results


if __name__ == "__main__":
    main()
