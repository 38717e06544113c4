#!/usr/bin/env python
"""Measure the multimodal models of `scripts/train_multimodal.py` on held-out images and voices.

Each model is loaded from its saved folder (AutoModelForImageTextToText / AutoProcessor with trust_remote_code, as a
user would) and measured on the held-out split of the same data set (evaluation images from the Fashion-MNIST test
file, held-out espeak-ng voices):

- VQA accuracy (exact match of the greedy answer), overall and per question kind, with vs without the alignment loss;
- cross-modal retrieval R@1 (cosine similarity of the aligned embeddings) for image-text, audio-text and image-audio,
  both directions. Text galleries are the ten class names (so image->text is zero-shot classification); image and
  audio galleries are every held-out image / clip, and a hit is a nearest item of the query's class. With the
  default training the image-audio pair is never trained: its R@1 is the emergent alignment (ImageBind);
- the modality alignment error (README, "Multimodal"): for each ordered modality pair (A, B), the fraction of A's
  held-out items whose embedding is closer to another class's centroid in B than to its own class's centroid in B,
  averaged over the six ordered pairs of image, audio and text. 0 is perfect, ~0.9 is chance; the target is < 0.1.

Writes into --output_dir (default <model_dir>/eval), atomically:

    results.json    every number, per model; predictions of the first questions
    results.md      the comparison table
    retrieval.png   per model: class-by-class similarity matrices (image-text, audio-text, image-audio) and a 2-D
                    PCA projection of the aligned embeddings

    python scripts/eval_multimodal.py                                   # outputs/multimodal (both runs)
    python scripts/eval_multimodal.py --model_dir outputs/multimodal/aligned --eval_questions_per_kind 40
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # spinning OpenMP threads crawl on a shared CPU (before torch; see scripts/train.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser  # noqa: E402

import lightarch  # noqa: E402,F401  (registers the lightarch Auto classes)
from lightarch.data.multimodal import (
    CLASS_NAMES,
    FASHION_MNIST_DIR,
    MissingDataError,
    fashion_mnist_pools,
    generate_questions,
    synthetic_pools,
)
from lightarch.evaluation.multimodal import class_similarity_matrix, comparison_table, evaluate_model
from lightarch.training.checkpoints import atomic_save_pretrained  # noqa: E402
from lightarch.evaluation.plots import figure_to_png, pyplot  # noqa: E402

VARIANTS = ("aligned", "no_alignment")  # the run folders of scripts/train_multimodal.py
PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))


@dataclass
class EvalArguments:
    model_dir: str = field(
        default="outputs/multimodal",
        metadata={"help": "An --output_dir of train_multimodal.py (its aligned/ and no_alignment/ models are "
                  "compared), or one saved model folder."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where to write (default <model_dir>/eval)."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "fashion_mnist or synthetic; default: the data set the model was trained on.",
                  "choices": [None, "fashion_mnist", "synthetic"]},
    )
    eval_images_per_class: int | None = field(
        default=None, metadata={"help": "Held-out images per class (default: as in training's results.json)."}
    )
    eval_questions_per_kind: int = field(default=100, metadata={"help": "Held-out questions per question kind."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the data (default: the training seed)."})
    batch_size: int = field(default=64, metadata={"help": "Questions per generate call."})
    fashion_mnist_dir: str | None = field(default=None, metadata={"help": "Fashion-MNIST IDX folder."})
    espeak_executable: str | None = field(default=None, metadata={"help": "The espeak-ng program."})
    clip_cache_dir: str | None = field(default=None, metadata={"help": "Cache of synthesized clips."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


def find_models(model_dir: Path) -> dict[str, Path]:
    """Run name -> saved model folder: the runs of a train_multimodal.py output, or the folder itself."""
    if (model_dir / "config.json").is_file():
        return {model_dir.name: model_dir}
    found = {v: model_dir / v for v in VARIANTS if (model_dir / v / "config.json").is_file()}
    if not found:
        raise SystemExit(f"error: --model_dir {model_dir} holds no saved model (config.json) and no finished "
                         f"{' / '.join(VARIANTS)} run; train one with `python scripts/train_multimodal.py`.")
    return found


def training_record(model_dir: Path, models: dict[str, Path]) -> dict:
    """The training script's results.json (data set, seed, sizes), from the run folder or a model folder."""
    for path in (model_dir / "results.json", *(folder.parent / "results.json" for folder in models.values())):
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            if "data_args" in record:
                return record
    return {}


def resolve(args: EvalArguments, record: dict) -> dict:
    """The data settings: command line first, then training's record, then the built-in defaults."""
    trained = record.get("data_args", {})

    def pick(name: str, default):
        value = getattr(args, name)
        return value if value is not None else trained.get(name, default)

    return {
        "dataset": pick("dataset", "fashion_mnist"),
        "eval_images_per_class": pick("eval_images_per_class", 50),
        "fashion_mnist_dir": pick("fashion_mnist_dir", str(FASHION_MNIST_DIR)),
        "espeak_executable": pick("espeak_executable", "espeak-ng"),
        "clip_cache_dir": pick("clip_cache_dir", None),
        "seed": args.seed if args.seed is not None else record.get("seed", 42),
    }


def heldout_pool(settings: dict):
    """The held-out split (evaluation images and voices) of the data set."""
    if settings["dataset"] == "synthetic":
        return synthetic_pools(eval_images_per_class=settings["eval_images_per_class"], seed=settings["seed"])["eval"]
    try:
        return fashion_mnist_pools(1, settings["eval_images_per_class"], root=settings["fashion_mnist_dir"],
                                   cache_dir=settings["clip_cache_dir"], seed=settings["seed"],
                                   executable=settings["espeak_executable"])["eval"]
    except MissingDataError as error:
        raise SystemExit(f"error: {error}") from None


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


def markdown(results: dict) -> str:
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


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    (args,) = HfArgumentParser(EvalArguments, description=__doc__.split("\n\n")[0]).parse_args_into_dataclasses(
        args=argv)
    if args.eval_questions_per_kind < 1 or args.batch_size < 1:
        raise SystemExit("error: --eval_questions_per_kind and --batch_size must be >= 1.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model_dir = Path(args.model_dir)
    models = find_models(model_dir)
    settings = resolve(args, training_record(model_dir, models))
    output_dir = Path(args.output_dir) if args.output_dir else model_dir / "eval"

    pool = heldout_pool(settings)
    questions = generate_questions(pool, args.eval_questions_per_kind, settings["seed"] + 2)
    measured, summaries = {}, {}
    for name, folder in models.items():
        print(f"Measuring {name} ({folder})", flush=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        measured[name] = evaluate_model(model, processor, pool, questions, args.batch_size,
                                        show_progress=not args.disable_tqdm)
        summaries[name] = {k: measured[name][k] for k in ("vqa", "retrieval_r_at_1", "alignment_error")}
        summaries[name]["examples"] = [
            {"kind": q.kind, "prompt": q.prompt, "answer": q.answer, "prediction": p}
            for q, p in list(zip(questions, measured[name]["predictions"]))[:10]
        ]
        del model

    results = {
        "model_dir": model_dir.as_posix(),
        "data": {"dataset": settings["dataset"], "seed": settings["seed"], "images": int(len(pool.images)),
                 "clips": len(pool.clips), "voice_names": sorted({v.split()[0] for v in pool.clip_voices}),
                 "questions": len(questions)},
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
    text = markdown(results)
    atomic_save_pretrained(output_dir, extra_files={"results.json": json.dumps(results, indent=2),
                                                    "results.md": text, "retrieval.png": plot_retrieval(measured)},
                           keep=())
    print(text)
    print(f"Wrote {output_dir} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
