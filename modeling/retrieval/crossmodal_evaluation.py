"""What scripts/search_multimodal.py runs: cross-modal indexes (`CrossModalIndex`) over the held-out images, clips
and class texts of the tri-modal data set, class-level recall@k per direction (the `retrieval_recall` metric) for a
model and its no-alignment baseline, approximate indexes against exact search, example queries, and the
results.json / results.md / recall PNG / saved indexes of the output folder."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.multimodal import CLASS_NAMES, ModalityPool, MultiModalData, class_texts
from ..evaluation.metrics import load_metric
from ..evaluation.multimodal import (
    embed_items,
    find_models,
    heldout_data,
    training_record,
)
from .crossmodal import CrossModalIndex, check_modality
from .index import recall_at_k

SCRIPT = "search_multimodal.py"
# query modality -> gallery modality; text->image / text->audio / image->audio / audio->image first (the issue's)
DIRECTIONS = (("text", "image"), ("text", "audio"), ("image", "audio"), ("audio", "image"), ("image", "text"),
              ("audio", "text"))
APPROXIMATE_GALLERIES = ("image", "audio")  # the text gallery (40 texts) is too small for an approximate index


def heldout_collections(pool: ModalityPool) -> dict[str, tuple[list, list[dict]]]:
    """modality -> (items, metadata) of the held-out split: every image, every clip (with its voice), and the four
    texts of every class (`class_texts`). Metadata holds the class "label" and "class" name."""
    texts = [(text, label) for label in range(len(CLASS_NAMES)) for text in class_texts(label)]
    return {
        "image": (list(pool.images), [{"label": int(c), "class": CLASS_NAMES[c]} for c in pool.image_labels]),
        "audio": (list(pool.clips), [{"label": int(c), "class": CLASS_NAMES[c], "voice": v}
                                     for c, v in zip(pool.clip_labels, pool.clip_voices)]),
        "text": ([t for t, _ in texts], [{"label": c, "class": CLASS_NAMES[c], "text": t} for t, c in texts]),
    }


def build_indexes(model, processor, pool: ModalityPool, batch_size: int = 128, show_progress: bool = False
                  ) -> dict[str, CrossModalIndex]:
    """modality -> an exact `CrossModalIndex` over that modality's held-out collection, embedded once each."""
    indexes = {}
    for modality, (items, metadata) in heldout_collections(pool).items():
        embeddings = embed_items(model, processor, items, modality, pool.sampling_rate, batch_size, show_progress)
        indexes[modality] = CrossModalIndex.from_embeddings(embeddings, modality, metadata, "flat", model=model,
                                                            processor=processor)
    return indexes


def class_recall(index: CrossModalIndex, queries: np.ndarray, query_labels, ks: Sequence[int]) -> dict[str, float]:
    """recall@k for each of `ks` (`retrieval_recall`): the fraction of queries `(Q, D)` with an item of their own
    class among the top k items `index` returns."""
    ids, _ = index.search_embeddings(queries, min(max(ks), len(index)))
    labels = np.where(ids < 0, -1, index.labels[np.maximum(ids, 0)])  # (Q, k) classes of the hits, best first
    result = load_metric("retrieval_recall").compute(predictions=labels.tolist(),
                                                     references=np.asarray(query_labels).tolist(),
                                                     k=[k for k in ks if k <= len(index)])
    return {key: value for key, value in result.items() if key.startswith("recall@")}


def measure_directions(indexes: dict[str, CrossModalIndex], ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """"query->gallery" -> recall@k for every direction of `DIRECTIONS`; the queries are the other collection's
    items (their stored embeddings)."""
    return {f"{q}->{g}": class_recall(indexes[g], indexes[q].embeddings, indexes[q].labels, ks) for q, g in DIRECTIONS}


def measure_approximate(indexes: dict[str, CrossModalIndex], kinds: Sequence[str], ks: Sequence[int],
                        **options) -> list[dict]:
    """For each approximate kind and each gallery of `APPROXIMATE_GALLERIES`: the neighbour recall@max(ks) against
    exact search (the fraction of the exact top items found, `recall_at_k`) and the class-level recall@k of every
    direction into that gallery, with the approximate index in place of the exact one."""
    rows, k = [], max(ks)
    for kind in kinds:
        for gallery in APPROXIMATE_GALLERIES:
            exact = indexes[gallery]
            approximate = CrossModalIndex.from_embeddings(exact.embeddings, gallery, exact.items, kind, **options)
            row = {"index": kind, "gallery": gallery, "items": len(exact), **options, "directions": {}}
            neighbour = []
            for query, target in DIRECTIONS:
                if target != gallery:
                    continue
                queries = indexes[query].embeddings
                exact_ids, _ = exact.search_embeddings(queries, k)
                approximate_ids, _ = approximate.search_embeddings(queries, k)
                neighbour.append(recall_at_k(approximate_ids, exact_ids))
                row["directions"][f"{query}->{gallery}"] = class_recall(approximate, queries, indexes[query].labels,
                                                                        ks)
            row[f"neighbour_recall@{k}"] = float(np.mean(neighbour))
            rows.append(row)
    return rows


def example_queries(indexes: dict[str, CrossModalIndex], pool: ModalityPool, k: int = 5) -> list[dict]:
    """A few queries run through `CrossModalIndex.search` (embedded from raw items): class-name texts against the
    images and the clips, one held-out clip against the images, one held-out image against the clips."""
    examples = []

    def add(query: str, modality: str, item, gallery: str) -> None:
        ids, scores = indexes[gallery].search([item], modality, k, sampling_rate=pool.sampling_rate)
        hits = [{"id": int(i), "score": round(float(s), 4), **indexes[gallery].items[i]}
                for i, s in zip(ids[0], scores[0]) if i >= 0]
        examples.append({"query": query, "query_modality": modality, "gallery": gallery, "hits": hits})

    for text in ("sneaker", "a picture of a dress", "bag"):
        add(repr(text), "text", text, "image")
    add(repr("ankle boot"), "text", "ankle boot", "audio")
    clip = int(np.nonzero(pool.clip_labels == CLASS_NAMES.index("trouser"))[0][0])
    add(f"clip {clip} (a voice saying {CLASS_NAMES[pool.clip_labels[clip]]!r}, {pool.clip_voices[clip]})", "audio",
        pool.clips[clip], "image")
    add(f"image 0 (a {CLASS_NAMES[pool.image_labels[0]]})", "image", pool.images[0], "audio")
    return examples


def measure_model(model, processor, pool: ModalityPool, ks: Sequence[int] = (1, 5, 10),
                  approximate: Sequence[str] = ("hnsw", "ivf"), batch_size: int = 128, show_progress: bool = False,
                  **index_options) -> dict:
    """Recall@k per direction with exact indexes, the approximate comparison, recall@1..max(ks) curves (for the
    plot) and example queries of one model on `pool`; "indexes" holds the exact `CrossModalIndex` per modality."""
    indexes = build_indexes(model, processor, pool, batch_size, show_progress)
    curve_ks = list(range(1, max(ks) + 1))
    return {
        "recall": measure_directions(indexes, ks),
        "curves": measure_directions(indexes, curve_ks),
        "approximate": measure_approximate(indexes, approximate, ks, **index_options),
        "examples": example_queries(indexes, pool),
        "sizes": {modality: len(index) for modality, index in indexes.items()},
        "indexes": indexes,
    }


def recall_table(runs: dict[str, dict], ks: Sequence[int]) -> str:
    """Markdown: one row per direction, recall@k of each run side by side."""
    names = list(runs)
    header = [f"{name} R@{k}" for name in names for k in ks]
    rows = ["| direction | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for direction in runs[names[0]]["recall"]:
        cells = [runs[n]["recall"][direction].get(f"recall@{k}") for n in names for k in ks]
        rows.append(f"| {direction} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(rows)


def approximate_table(rows: list[dict], exact: dict[str, dict], ks: Sequence[int]) -> str:
    """Markdown: per approximate index and gallery, neighbour recall against exact search and class recall@k of
    each direction (exact in brackets)."""
    k = max(ks)
    lines = [f"| index | gallery | neighbour recall@{k} vs exact | direction | "
             + " | ".join(f"R@{n} (exact)" for n in ks) + " |", "|---" * (4 + len(ks)) + "|"]
    for row in rows:
        for direction, recall in row["directions"].items():
            cells = [f"{recall[f'recall@{n}']:.3f} ({exact[direction][f'recall@{n}']:.3f})" for n in ks]
            lines.append(f"| {row['index']} | {row['gallery']} ({row['items']}) | {row[f'neighbour_recall@{k}']:.3f} "
                         f"| {direction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def examples_text(examples: list[dict]) -> str:
    """One line per example query: its top hits' classes and cosine scores."""
    return "\n".join(f"- {e['query']} ({e['query_modality']}) -> {e['gallery']}: "
                     + ", ".join(f"{h['class']} {h['score']:.2f}" for h in e["hits"]) for e in examples)


def results_markdown(results: dict) -> str:
    """results.md: what was measured, the recall table, the approximate comparison, example queries."""
    ks, runs = results["ks"], results["models"]
    data = results["data"]
    lines = ["# Cross-modal retrieval (held-out images, clips and class texts)", "",
             (f"Data: {data['dataset']}, {data['images']} held-out images, {data['clips']} clips of held-out voices "
              f"({', '.join(data['voice_names'])}), {data['texts']} class texts (4 per class). Galleries: every "
              "held-out item of the target modality, exact inner-product search over L2-normalised aligned "
              "embeddings. A hit at k: an item of the query's class among the top k (`retrieval_recall`)."), "",
             recall_table(runs, ks), ""]
    for name, run in runs.items():
        if run["approximate"]:
            lines += [f"Approximate indexes ({name}) against exact search:", "",
                      approximate_table(run["approximate"], run["recall"], ks), ""]
    first = next(iter(runs))
    lines += [f"Example queries ({first}; top 5, class and cosine score):", "", examples_text(runs[first]["examples"]),
              ""]
    return "\n".join(lines)


def plot_recall_curves(runs: dict[str, dict]) -> bytes:
    """PNG: recall@k against k for every direction, one panel each, one line per run."""
    from ..evaluation.plots import figure_to_png, pyplot

    plt = pyplot()
    directions = list(next(iter(runs.values()))["curves"])
    fig, axes = plt.subplots(2, (len(directions) + 1) // 2, figsize=(4.2 * ((len(directions) + 1) // 2), 7.5),
                             squeeze=False)
    for ax, direction in zip(axes.flat, directions):
        for style, (name, run) in zip(("o-", "s--", "^:"), runs.items()):
            curve = run["curves"][direction]
            ks = sorted(int(key.split("@")[1]) for key in curve)
            ax.plot(ks, [curve[f"recall@{k}"] for k in ks], style, ms=4, label=name)
        ax.set_title(direction)
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Cross-modal retrieval on held-out items: class-level recall@k")
    fig.tight_layout()
    return figure_to_png(fig)


def check_search_output_dir(model_dir: str | os.PathLike, baseline_dir: str | os.PathLike | None,
                            output_dir: str | os.PathLike | None) -> Path:
    """The folder `search_saved_models` writes (default `<model_dir>/../crossmodal_search`), checked by the
    output-folder rule (`lightarch.training.checkpoints.check_output_dir`): never an input folder."""
    from ..training.checkpoints import check_output_dir

    model_dir = Path(model_dir)
    output_dir = Path(output_dir) if output_dir else model_dir.absolute().parent / "crossmodal_search"
    return check_output_dir(output_dir, SCRIPT, {"--model_dir": model_dir, "--baseline_dir": baseline_dir})


def resolve_baseline(model_dir: str | os.PathLike, baseline_dir: str | os.PathLike | None) -> Path | None:
    """The baseline model folder: `baseline_dir`, or (None) the no-alignment run next to a `train_multimodal` model
    folder (`<model_dir>/../no_alignment`) when it is saved, or no baseline for "none" (`check_model_folder`)."""
    if baseline_dir is None:
        sibling = Path(model_dir).absolute().parent / "no_alignment"
        found = sibling != Path(model_dir).absolute() and (sibling / "config.json").is_file()
        return sibling if found else None
    if str(baseline_dir).lower() == "none":
        return None
    return check_model_folder(baseline_dir, "--baseline_dir")


def parse_search_options(ks: str, approximate: str) -> tuple[list[int], list[str]]:
    """The script's comma-separated --ks (positive ints) and --approximate (hnsw / ivf) options, or a ValueError
    naming the option."""
    from .index import INDEX_KINDS

    try:
        parsed_ks = [int(part) for part in ks.split(",") if part.strip()]
    except ValueError:
        parsed_ks = []
    if not parsed_ks or min(parsed_ks) < 1:
        raise ValueError(f"--ks must be comma-separated positive integers like 1,5,10, got {ks!r}.")
    kinds = [part.strip() for part in approximate.split(",") if part.strip()]
    unknown = [kind for kind in kinds if kind not in INDEX_KINDS or kind == "flat"]
    if unknown:
        raise ValueError(f"--approximate: {unknown} unknown; choose from hnsw, ivf (flat is the exact reference), "
                         "or '' for none.")
    return parsed_ks, kinds


def check_model_folder(folder: str | os.PathLike, option: str = "--model_dir") -> Path:
    """`folder` itself, or a ValueError naming `option` when it holds no saved model (a train_multimodal run folder
    holds two: pass one of them)."""
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{option} {folder}: no saved model there (config.json missing); pass a model folder such "
                         "as outputs/multimodal/aligned, or train one with `python scripts/train_multimodal.py`.")
    return Path(folder)


def load_model(folder: str | os.PathLike, option: str = "--model_dir"):
    """(model in eval mode, processor) loaded as a user would (AutoModelForImageTextToText / AutoProcessor with
    trust_remote_code); ValueError naming `option` when `folder` holds no saved model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_model_folder(folder, option)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


class _SavedIndexes:
    """The aligned model's exact indexes, saved as `indexes/<modality>/` of the output folder."""

    def __init__(self, indexes: dict[str, CrossModalIndex]) -> None:
        self.indexes = indexes

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        for modality, index in self.indexes.items():
            index.save_pretrained(Path(folder) / "indexes" / check_modality(modality))


def search_saved_models(model_dir: str | os.PathLike, baseline_dir: str | os.PathLike | None = None,
                        output_dir: str | os.PathLike | None = None, data: MultiModalData | None = None,
                        seed: int | None = None, ks: Sequence[int] = (1, 5, 10),
                        approximate: Sequence[str] = ("hnsw", "ivf"), batch_size: int = 128,
                        show_progress: bool = True, **index_options) -> dict:
    """Index the held-out split with the model of `model_dir` (and `baseline_dir`'s, the no-alignment baseline),
    measure recall@k per direction, compare approximate indexes with exact search, run example queries, and write
    results.json, results.md, recall.png and the model's saved indexes (`indexes/<modality>/`) into `output_dir`
    atomically; returns the results (without the index objects).

    `data` / `seed` default to the training run's (its results.json), so the held-out split is the one the models
    were evaluated on."""
    from ..training.checkpoints import atomic_save_pretrained

    started = time.perf_counter()
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"--ks must be positive integers, got {list(ks)}.")
    ks = sorted({int(k) for k in ks})
    output_dir = check_search_output_dir(model_dir, baseline_dir, output_dir)
    record = training_record(model_dir, find_models(model_dir))
    data = data or heldout_data(record)
    seed = seed if seed is not None else record.get("seed", 42)
    pool = dataclasses.replace(data, train_images_per_class=1).pools(seed, show_progress)["eval"]

    folders = {"model": Path(model_dir)}
    if baseline_dir is not None:
        folders["baseline"] = Path(baseline_dir)
    runs, saved = {}, None
    for role, folder in folders.items():
        model, processor = load_model(folder, "--model_dir" if role == "model" else "--baseline_dir")
        name = folder.name if folder.name not in runs else f"{folder.name} ({role})"
        print(f"Indexing the held-out split with {name} ({folder})", flush=True)
        measured = measure_model(model, processor, pool, ks, approximate, batch_size, show_progress,
                                 **index_options)
        indexes = measured.pop("indexes")
        if saved is None:
            saved = _SavedIndexes(indexes)
        runs[name] = {"folder": folder.as_posix(), "role": role, **measured}

    results = {
        "model_dir": Path(model_dir).as_posix(),
        "baseline_dir": Path(baseline_dir).as_posix() if baseline_dir is not None else None,
        "data": {"dataset": data.dataset, "seed": seed, "images": len(pool.images), "clips": len(pool.clips),
                 "texts": len(CLASS_NAMES) * len(class_texts(0)),
                 "voice_names": sorted({v.split()[0] for v in pool.clip_voices})},
        "ks": ks,
        "approximate_options": dict(index_options),
        "hit_definition": "an item of the query's class among the top k (class-level recall, retrieval_recall)",
        "models": runs,
    }
    results["seconds"] = time.perf_counter() - started
    atomic_save_pretrained(output_dir, saved, extra_files={"results.json": json.dumps(results, indent=2),
                                                           "results.md": results_markdown(results),
                                                           "recall.png": plot_recall_curves(runs)},
                           keep=(), script=SCRIPT)
    results["output_dir"] = output_dir.as_posix()
    return results
