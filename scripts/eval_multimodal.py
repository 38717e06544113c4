#!/usr/bin/env python
"""Measure the multimodal models of `scripts/train_multimodal.py` on held-out images and voices (the evaluation:
lightarch.evaluation.multimodal.evaluate_saved_models).

Each model is loaded from its saved folder (AutoModelForImageTextToText / AutoProcessor with trust_remote_code, as a
user would) and measured on the held-out split of the data set it was trained on (evaluation images from the
Fashion-MNIST test file, held-out espeak-ng voices):

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

import os
import time
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class EvalArguments:
    model_dir: str = field(
        default="outputs/multimodal",
        metadata={"help": "An --output_dir of train_multimodal.py (its aligned/ and no_alignment/ models are "
                          "compared), or one saved model folder."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where to write (default <model_dir>/eval): a new or empty folder, or an earlier output of "
                          "this script (it is replaced); never --model_dir."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "fashion_mnist or synthetic; default: the data set the model was trained on.",
                  "choices": [None, "fashion_mnist", "synthetic"]},
    )
    eval_images_per_class: int | None = field(
        default=None, metadata={"help": "Held-out images per class (default: as in training's results.json)."}
    )
    eval_questions_per_kind: int | None = field(
        default=None, metadata={"help": "Held-out questions per question kind (default: as in training, else 100)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of the data (default: the training seed)."})
    batch_size: int = field(default=64, metadata={"help": "Questions per generate call."})
    fashion_mnist_dir: str | None = field(default=None, metadata={"help": "Fashion-MNIST IDX folder."})
    espeak_executable: str | None = field(default=None, metadata={"help": "The espeak-ng program."})
    clip_cache_dir: str | None = field(default=None, metadata={"help": "Cache of synthesized clips."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(EvalArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on a shared CPU
    import torch

    from lightarch.data.multimodal import MissingDataError
    from lightarch.evaluation.multimodal import (
        check_evaluation_output_dir,
        evaluate_saved_models,
        evaluation_markdown,
        find_models,
        heldout_data,
        training_record,
    )

    try:
        if args.num_threads < 0 or args.batch_size < 1:
            raise ValueError("--num_threads must be >= 0 and --batch_size >= 1.")
        check_evaluation_output_dir(args.model_dir, args.output_dir)
        record = training_record(args.model_dir, find_models(args.model_dir))
        data = heldout_data(record, dataset=args.dataset, eval_images_per_class=args.eval_images_per_class,
                            eval_questions_per_kind=args.eval_questions_per_kind,
                            fashion_mnist_dir=args.fashion_mnist_dir, espeak_executable=args.espeak_executable,
                            clip_cache_dir=args.clip_cache_dir)
    except ValueError as error:
        parser.error(str(error))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    try:
        results = evaluate_saved_models(args.model_dir, args.output_dir, data, args.seed, args.batch_size,
                                        show_progress=not args.disable_tqdm)
    except MissingDataError as error:
        raise SystemExit(f"error: {error}") from None
    print(evaluation_markdown(results))
    print(f"Wrote {args.output_dir or os.path.join(args.model_dir, 'eval')} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
