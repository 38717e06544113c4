#!/usr/bin/env python
"""Cross-modal retrieval with the multimodal model's aligned embeddings (lightarch.retrieval.crossmodal): index the
held-out images, clips and class texts in faiss and retrieve images and audio clips by text and by each other
(lightarch.retrieval.crossmodal_evaluation.search_saved_models).

The model of --model_dir (default outputs/multimodal/aligned, from `scripts/train_multimodal.py`) embeds every
held-out item of the data set it was trained on (Fashion-MNIST test-file images, clips of held-out espeak-ng voices,
the four texts of each class) with its aligned embedding for that modality, L2-normalised, in an exact
inner-product index per modality. Measured, for the model and for --baseline_dir (default the no_alignment run
beside it, trained identically without the alignment loss):

- class-level recall@k (a hit: an item of the query's class among the top k; the `retrieval_recall` metric) for
  text->image, text->audio, image->audio, audio->image, image->text and audio->text;
- approximate indexes (--approximate, faiss HNSW / IVF) against exact search on the image and audio galleries:
  the fraction of the exact top-k neighbours found, and the class-level recall with them.

Example queries (texts, a clip, an image) are printed with their top hits. Writes into --output_dir (default
<model_dir>/../crossmodal_search), atomically:

    results.json              every number, per model, and the example queries
    results.md                the recall table, the approximate comparison, the examples
    recall.png                recall@k against k per direction, model vs baseline
    indexes/<modality>/       the model's exact indexes (CrossModalIndex.from_pretrained; numpy + faiss, no pickle)

    python scripts/search_multimodal.py
    python scripts/search_multimodal.py --model_dir outputs/multimodal/aligned --baseline_dir none --ks 1,5
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class SearchArguments:
    model_dir: str = field(
        default="outputs/multimodal/aligned",
        metadata={"help": "A saved multimodal model folder (e.g. the aligned/ run of train_multimodal.py)."},
    )
    baseline_dir: str | None = field(
        default=None,
        metadata={"help": "The baseline model folder (default: <model_dir>/../no_alignment when it is saved; "
                          "'none' for no baseline)."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where to write (default <model_dir>/../crossmodal_search): a new or empty folder, or an "
                          "earlier output of this script (it is replaced); never an input folder."},
    )
    ks: str = field(default="1,5,10", metadata={"help": "Comma-separated k of recall@k."})
    approximate: str = field(
        default="hnsw,ivf",
        metadata={"help": "Comma-separated approximate index kinds compared with exact search ('' for none)."},
    )
    ef_search: int = field(default=16, metadata={"help": "HNSW efSearch of the approximate comparison."})
    nprobe: int = field(default=2, metadata={"help": "IVF lists searched in the approximate comparison."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "fashion_mnist or synthetic; default: the data set the model was trained on.",
                  "choices": [None, "fashion_mnist", "synthetic"]},
    )
    eval_images_per_class: int | None = field(
        default=None, metadata={"help": "Held-out images per class (default: as in training's results.json)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of the data (default: the training seed)."})
    batch_size: int = field(default=128, metadata={"help": "Items per embedding forward."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(SearchArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on a shared CPU
    import torch
    from lightarch.data.multimodal import MissingDataError
    from lightarch.evaluation.multimodal import (
        find_models,
        heldout_data,
        training_record,
    )
    from lightarch.retrieval.crossmodal_evaluation import (
        check_model_folder,
        check_search_output_dir,
        examples_text,
        parse_search_options,
        recall_table,
        resolve_baseline,
        search_saved_models,
    )

    try:
        if args.num_threads < 0 or args.batch_size < 1 or args.ef_search < 1 or args.nprobe < 1:
            raise ValueError("--num_threads must be >= 0, --batch_size, --ef_search and --nprobe >= 1.")
        ks, approximate = parse_search_options(args.ks, args.approximate)
        record = training_record(args.model_dir, find_models(check_model_folder(args.model_dir)))
        baseline = resolve_baseline(args.model_dir, args.baseline_dir)
        check_search_output_dir(args.model_dir, baseline, args.output_dir)
        # the training run's data settings (Fashion-MNIST folder, espeak-ng, clip cache), except these two
        data = heldout_data(record, dataset=args.dataset, eval_images_per_class=args.eval_images_per_class)
    except ValueError as error:
        parser.error(str(error))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    try:
        results = search_saved_models(args.model_dir, baseline, args.output_dir, data, args.seed, ks, approximate,
                                      args.batch_size, show_progress=not args.disable_tqdm,
                                      ef_search=args.ef_search, nprobe=args.nprobe)
    except MissingDataError as error:
        raise SystemExit(f"error: {error}") from None
    first = next(iter(results["models"].values()))
    print(recall_table(results["models"], results["ks"]))
    print("\nExample queries (top 5: class, cosine score):")
    print(examples_text(first["examples"]))
    print(f"\nWrote {results['output_dir']} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
