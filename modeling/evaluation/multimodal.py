"""Evaluation of the multimodal model on held-out images and voices: VQA accuracy, retrieval R@1, modality alignment
error (`evaluate_model`), and the evaluation of saved runs from disk with plots (`evaluate_saved_models`,
`scripts/eval_multimodal.py`)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.multimodal import (
    CLASS_NAMES,
    QUESTION_KINDS,
    ModalityPool,
    MultiModalData,
    Question,
    class_texts,
    generate_questions,
    question_inputs,
)
from .metrics import load_metric
from .plots import figure_to_png, pyplot

RUN_NAMES = ("aligned", "no_alignment")  # the model folders of a `lightarch.training.multimodal` run
PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))



def _normalize(embeddings) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float64)
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


def recall_at_1(queries, query_labels, gallery, gallery_labels) -> float:
    """Fraction of queries whose most similar (cosine) gallery item has the query's class (the `retrieval_recall`
    evaluate metric of `lightarch.evaluation.metrics`, k=1).

    The pairs are class-level (a picture of a sneaker and any voice saying "sneaker" match), so a hit is the nearest
    gallery item being of the right class; with one gallery item per class this is zero-shot classification.
    """
    similarity = _normalize(queries) @ _normalize(gallery).T  # (Q, G)
    nearest = np.asarray(gallery_labels)[similarity.argmax(axis=1)]  # (Q,)
    return load_metric("retrieval_recall").compute(predictions=nearest[:, None].tolist(),
                                                   references=np.asarray(query_labels).tolist(), k=1)["recall@1"]


def class_centroids(embeddings, labels, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """(num_classes, D) unit-length mean embedding of each class."""
    embeddings, labels = _normalize(embeddings), np.asarray(labels)
    missing = [c for c in range(num_classes) if not np.any(labels == c)]
    if missing:
        raise ValueError(f"class centroids need every class; classes {missing} have no item.")
    return _normalize(np.stack([embeddings[labels == c].mean(axis=0) for c in range(num_classes)]))


def nearest_centroid_classes(queries, targets, target_labels) -> np.ndarray:
    """(N,) the class whose centroid in the target modality is most cosine-similar to each query."""
    return (_normalize(queries) @ class_centroids(targets, target_labels).T).argmax(axis=1)


def modality_alignment_error(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """The modality alignment error reported by `scripts/eval_multimodal.py` (defined in the README), computed by
    the `modality_alignment_error` evaluate metric of `lightarch.evaluation.metrics`.

    `embeddings`: modality -> (aligned embeddings (N, D), class labels (N,)). For every ordered pair of modalities
    (A, B), the error of A->B is the fraction of A's items whose aligned embedding is closer to the centroid of a
    different class in B than to the centroid of its own class in B. The modality alignment error is the mean over
    all ordered pairs: 0 when every item sits nearest its own class in every other modality, about 0.9 (1 - 1/10)
    for unrelated embedding spaces. Returns {"error": mean, "pairs": {"A->B": error}}.
    """
    metric = load_metric("modality_alignment_error")
    for a, (a_emb, a_labels) in embeddings.items():
        for b, (b_emb, b_labels) in embeddings.items():
            if a != b:
                metric.add_batch(predictions=nearest_centroid_classes(a_emb, b_emb, b_labels).tolist(),
                                 references=np.asarray(a_labels).tolist(), pairs=[f"{a}->{b}"] * len(a_labels))
    result = metric.compute()
    return {"error": result["error"], "pairs": result["pairs"]}


def class_similarity_matrix(a_emb, a_labels, b_emb, b_labels, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """(num_classes, num_classes) mean cosine similarity between A's items of class i and B's items of class j."""
    similarity = _normalize(a_emb) @ _normalize(b_emb).T
    a_labels, b_labels = np.asarray(a_labels), np.asarray(b_labels)
    matrix = np.zeros((num_classes, num_classes))
    for i in range(num_classes):
        for j in range(num_classes):
            matrix[i, j] = similarity[np.ix_(a_labels == i, b_labels == j)].mean()
    return matrix


def answer_accuracy(questions: Sequence[Question], predictions: Sequence[str]) -> dict:
    """Exact-match accuracy (whitespace and case normalised) overall and per question kind (the `vqa_accuracy`
    evaluate metric of `lightarch.evaluation.metrics`)."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions.")
    result = load_metric("vqa_accuracy").compute(predictions=list(predictions),
                                                 references=[q.answer for q in questions],
                                                 kinds=[q.kind for q in questions])
    return {"accuracy": result["accuracy"], "per_kind": result["per_kind"], "count": result["count"]}


def _batches(items: Sequence, size: int, desc: str, show_progress: bool):
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", disable=not show_progress, leave=False):
        yield items[start : start + size]


def predict_answers(model, processor, pool: ModalityPool, questions: Sequence[Question], batch_size: int = 64,
                    max_new_tokens: int = 4, show_progress: bool = True) -> list[str]:
    """Greedy answers of `model` (decoded new tokens, special tokens dropped), batch by batch."""
    import torch

    answers = []
    model.eval()
    with torch.inference_mode():
        for chunk in _batches(list(questions), batch_size, "Answering", show_progress):
            inputs = question_inputs(processor, pool, chunk, with_answers=False)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [a.strip() for a in answers]


EMBEDDED_MODALITIES = ("image", "audio", "text")


def embed_items(model, processor, items: Sequence, modality: str, sampling_rate: int | None = None,
                batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
    """(N, D) float32 aligned embeddings (the model's `get_{modality}_features` pooler output) of `items` of one
    `modality`: images (arrays the processor takes), audio clips (waveforms at `sampling_rate`) or texts (str)."""
    import torch

    if modality not in EMBEDDED_MODALITIES:
        raise ValueError(f"modality must be one of {EMBEDDED_MODALITIES}, got {modality!r}.")
    parts = []
    model.eval()
    with torch.inference_mode():
        for chunk in _batches(list(items), batch_size, f"Embedding {modality}", show_progress):
            if modality == "image":
                inputs = processor.alignment_batch(images=chunk)
                output = model.get_image_features(pixel_values=inputs["pixel_values"])
            elif modality == "audio":
                inputs = processor.alignment_batch(audio=chunk, sampling_rate=sampling_rate)
                output = model.get_audio_features(input_features=inputs["input_features"],
                                                  input_features_mask=inputs["input_features_mask"])
            else:
                inputs = processor.alignment_batch(text=list(chunk))
                output = model.get_text_features(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"])
            parts.append(output.pooler_output.float())  # (B, D)
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), dtype=np.float32)


def embed_pool(model, processor, pool: ModalityPool, batch_size: int = 128, show_progress: bool = True
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Aligned embeddings of every image, every clip and every class text of `pool`:
    modality -> (embeddings (N, D) float32, class labels (N,))."""
    texts = [(text, label) for label in range(len(CLASS_NAMES)) for text in class_texts(label)]
    return {
        "image": (embed_items(model, processor, list(pool.images), "image", batch_size=batch_size,
                              show_progress=show_progress), pool.image_labels.copy()),
        "audio": (embed_items(model, processor, pool.clips, "audio", pool.sampling_rate, batch_size, show_progress),
                  pool.clip_labels.copy()),
        "text": (embed_items(model, processor, [t for t, _ in texts], "text", batch_size=batch_size,
                             show_progress=show_progress), np.array([label for _, label in texts], dtype=np.int64)),
    }


RETRIEVAL_DIRECTIONS = (("image", "text"), ("text", "image"), ("audio", "text"), ("text", "audio"),
                        ("image", "audio"), ("audio", "image"))


def retrieval_scores(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """R@1 for every direction "query->gallery" of `RETRIEVAL_DIRECTIONS`. Text galleries are the ten class names
    (the first text of each class), so image->text and audio->text are zero-shot classification; other galleries
    are all items of the split."""
    scores = {}
    for query, gallery in RETRIEVAL_DIRECTIONS:
        gallery_emb, gallery_labels = embeddings[gallery]
        if gallery == "text":
            first = [int(np.nonzero(gallery_labels == c)[0][0]) for c in range(len(CLASS_NAMES))]
            gallery_emb, gallery_labels = gallery_emb[first], gallery_labels[first]
        scores[f"{query}->{gallery}"] = recall_at_1(*embeddings[query], gallery_emb, gallery_labels)
    return scores


def evaluate_model(model, processor, pool: ModalityPool, questions: Sequence[Question], batch_size: int = 64,
                   show_progress: bool = True) -> dict:
    """VQA accuracy (overall and per kind), retrieval R@1 per direction and the modality alignment error of `model`
    on `pool` (the held-out split). Also returns the predictions and the embeddings (for plots)."""
    predictions = predict_answers(model, processor, pool, questions, batch_size, show_progress=show_progress)
    embeddings = embed_pool(model, processor, pool, 2 * batch_size, show_progress)
    return {
        "vqa": answer_accuracy(questions, predictions),
        "retrieval_r_at_1": retrieval_scores(embeddings),
        "alignment_error": modality_alignment_error(embeddings),
        "predictions": predictions,
        "embeddings": embeddings,
    }


def comparison_table(runs: dict[str, dict]) -> str:
    """Markdown table of held-out measurements, one column per run (run name -> `evaluate_model` summary with
    "vqa", "retrieval_r_at_1" and "alignment_error")."""
    names = list(runs)
    rows = ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows.append("| VQA accuracy, all kinds | " + " | ".join(f"{100 * runs[n]['vqa']['accuracy']:.1f}%"
                                                          for n in names) + " |")
    for kind in QUESTION_KINDS:
        rows.append(f"| VQA: {kind} ({' + '.join(QUESTION_KINDS[kind][1])}) | "
                    + " | ".join(f"{100 * runs[n]['vqa']['per_kind'].get(kind, float('nan')):.1f}%" for n in names)
                    + " |")
    for direction, _ in runs[names[0]]["retrieval_r_at_1"].items():
        rows.append(f"| R@1 {direction} | " + " | ".join(f"{runs[n]['retrieval_r_at_1'][direction]:.3f}"
                                                         for n in names) + " |")
    rows.append("| modality alignment error | " + " | ".join(f"{runs[n]['alignment_error']['error']:.3f}"
                                                            for n in names) + " |")
    return "\n".join(rows)


def find_models(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Run name -> saved model folder: the runs of a `train_multimodal` output folder, or the folder itself."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        return {model_dir.name: model_dir}
    found = {v: model_dir / v for v in RUN_NAMES if (model_dir / v / "config.json").is_file()}
    if not found:
        raise ValueError(f"--model_dir {model_dir} holds no saved model (config.json) and no finished "
                         f"{' / '.join(RUN_NAMES)} run; train one with `python scripts/train_multimodal.py`.")
    return found


def training_record(model_dir: str | os.PathLike, models: dict[str, Path]) -> dict:
    """The training run's results.json (data set, seed, sizes), from the run folder or a model folder's parent."""
    for path in (Path(model_dir) / "results.json", *(folder.parent / "results.json" for folder in models.values())):
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            if "data_args" in record:
                return record
    return {}


def heldout_data(record: dict, **given) -> MultiModalData:
    """The data settings of an evaluation: `given` values that are not None first, then the training `record`'s
    (`data_args` of its results.json), then `MultiModalData`'s defaults."""
    names = {f.name for f in dataclasses.fields(MultiModalData)}
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"unknown data settings {sorted(unknown)}; MultiModalData has {sorted(names)}.")
    trained = {k: v for k, v in record.get("data_args", {}).items() if k in names}
    return MultiModalData(**{**trained, **{k: v for k, v in given.items() if v is not None}})


def pca_2d(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every modality's embeddings projected on the first two principal axes of all of them together."""
    stacked = np.concatenate([e for e, _ in embeddings.values()])
    mean = stacked.mean(axis=0)
    _, _, axes = np.linalg.svd(stacked - mean, full_matrices=False)
    return {m: (e - mean) @ axes[:2].T for m, (e, _) in embeddings.items()}


def plot_retrieval(measured: dict[str, dict]) -> bytes:
    """PNG: one row per model: class-by-class mean cosine similarity for each modality pair, and a PCA scatter."""
    plt = pyplot()
    fig, axes = plt.subplots(len(measured), 4, figsize=(20, 4.8 * len(measured)), squeeze=False)
    short = [name.split()[0][:7] for name in CLASS_NAMES]
    markers = {"image": "o", "audio": "^", "text": "*"}
    colors = plt.get_cmap("tab10")
    for row, (name, result) in enumerate(measured.items()):
        embeddings = result["embeddings"]
        for col, (a, b) in enumerate(PAIRS):
            ax = axes[row, col]
            matrix = class_similarity_matrix(*embeddings[a], *embeddings[b])
            image = ax.imshow(matrix, cmap="viridis", vmin=-1, vmax=1)
            ax.set_xticks(range(len(CLASS_NAMES)), short, rotation=60, fontsize=7)
            ax.set_yticks(range(len(CLASS_NAMES)), short, fontsize=7)
            ax.set_xlabel(f"{b} class")
            ax.set_ylabel(f"{a} class")
            r1 = result["retrieval_r_at_1"][f"{a}->{b}"]
            ax.set_title(f"{name}: {a}-{b} mean cosine (R@1 {a}->{b} {r1:.2f})", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax = axes[row, 3]
        for modality, points in pca_2d(embeddings).items():
            labels = embeddings[modality][1]
            ax.scatter(points[:, 0], points[:, 1], c=[colors(int(c)) for c in labels], marker=markers[modality],
                       s=60 if modality == "text" else 10, alpha=0.9 if modality == "text" else 0.5,
                       edgecolors="black" if modality == "text" else "none", linewidths=0.5, label=modality)
        ax.set_title(f"{name}: aligned embeddings, PCA (colour = class; alignment error "
                     f"{result['alignment_error']['error']:.2f})", fontsize=9)
        ax.legend(fontsize=7, markerscale=1.0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_to_png(fig)


def evaluation_markdown(results: dict) -> str:
    """results.md of `evaluate_saved_models`: the comparison table and the definitions."""
    lines = ["# Multimodal evaluation (held-out images and voices)", "",
             f"Data: {results['data']['dataset']}, {results['data']['images']} held-out images, "
             f"{results['data']['clips']} clips of held-out voices ({', '.join(results['data']['voice_names'])}), "
             f"{results['data']['questions']} questions.", "",
             comparison_table({name: run for name, run in results["models"].items()}), ""]
    if results.get("vqa_accuracy_gain") is not None:
        relative = results["vqa_accuracy_relative_gain"]
        lines.append(f"Alignment loss effect on VQA accuracy: {100 * results['vqa_accuracy_gain']:+.1f} points"
                     + (f" ({100 * relative:+.1f}% relative)." if relative is not None else "."))
        lines.append("")
    lines.append("Modality alignment error: fraction of held-out items whose aligned embedding is nearer another "
                 "class's centroid than its own class's centroid in the other modality, mean over the six ordered "
                 "pairs of image, audio and text (0 perfect, ~0.9 chance, target < 0.1).")
    return "\n".join(lines) + "\n"



EVAL_SCRIPT = "eval_multimodal.py"  # the writer named in the output folder's marker (`check_output_dir`)


def check_evaluation_output_dir(model_dir: str | os.PathLike, output_dir: str | os.PathLike | None) -> Path:
    """The folder `evaluate_saved_models` writes (`output_dir`, default `<model_dir>/eval`); a ValueError naming
    it when it is (or holds) `model_dir` or one of its models, or is not empty and no earlier evaluation
    (`lightarch.training.checkpoints.check_output_dir`)."""
    from ..training.checkpoints import check_output_dir

    model_dir = Path(model_dir)
    inputs = {"--model_dir": model_dir, **{f"model {name}/": folder for name, folder in find_models(model_dir).items()}}
    return check_output_dir(Path(output_dir) if output_dir else model_dir / "eval", EVAL_SCRIPT, inputs)


def evaluate_saved_models(model_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                          data: MultiModalData | None = None, seed: int | None = None, batch_size: int = 64,
                          show_progress: bool = True) -> dict:
    """Load each model of `model_dir` (a `train_multimodal` output folder, or one model folder) as a user would
    (AutoModelForImageTextToText / AutoProcessor, trust_remote_code), measure it on the held-out split with
    `evaluate_model`, and write results.json, results.md and retrieval.png into `output_dir` (default
    `<model_dir>/eval`) atomically; returns the results.

    `data` / `seed` default to the training run's (its results.json), so the held-out split is the one it was
    measured on; `data.eval_questions_per_kind` questions per kind are asked.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..training.checkpoints import atomic_save_pretrained

    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}.")
    model_dir = Path(model_dir)
    models = find_models(model_dir)
    output_dir = check_evaluation_output_dir(model_dir, output_dir)
    record = training_record(model_dir, models)
    data = data or heldout_data(record)
    seed = seed if seed is not None else record.get("seed", 42)

    # The held-out split only: one training image per class is enough.
    pool = dataclasses.replace(data, train_images_per_class=1).pools(seed, show_progress)["eval"]
    questions = generate_questions(pool, data.eval_questions_per_kind, seed + 2)
    measured, summaries = {}, {}
    for name, folder in models.items():
        print(f"Measuring {name} ({folder})", flush=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        measured[name] = evaluate_model(model, processor, pool, questions, batch_size, show_progress=show_progress)
        summaries[name] = {k: measured[name][k] for k in ("vqa", "retrieval_r_at_1", "alignment_error")}
        summaries[name]["examples"] = [
            {"kind": q.kind, "prompt": q.prompt, "answer": q.answer, "prediction": p}
            for q, p in list(zip(questions, measured[name]["predictions"]))[:10]
        ]
        del model

    results = {
        "model_dir": model_dir.as_posix(),
        "data": {"dataset": data.dataset, "seed": seed, "images": int(len(pool.images)), "clips": len(pool.clips),
                 "voice_names": sorted({v.split()[0] for v in pool.clip_voices}), "questions": len(questions)},
        "models": summaries,
        "alignment_error_definition": "mean over the 6 ordered modality pairs (A, B) of the fraction of A's held-out "
                                      "items whose embedding is nearer another class's centroid in B than its own",
    }
    if {"aligned", "no_alignment"} <= set(summaries):
        with_alignment = summaries["aligned"]["vqa"]["accuracy"]
        without = summaries["no_alignment"]["vqa"]["accuracy"]
        results["vqa_accuracy_gain"] = with_alignment - without
        results["vqa_accuracy_relative_gain"] = (with_alignment - without) / without if without else None
    results["seconds"] = time.perf_counter() - started
    atomic_save_pretrained(output_dir, extra_files={"results.json": json.dumps(results, indent=2),
                                                    "results.md": evaluation_markdown(results),
                                                    "retrieval.png": plot_retrieval(measured)}, keep=(),
                           script=EVAL_SCRIPT)
    return results
