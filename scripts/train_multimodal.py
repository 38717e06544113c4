#!/usr/bin/env python
"""Train the lightarch multimodal model on the built-in tri-modal data, with and without the alignment loss, on CPU
(the recipe: lightarch.training.multimodal).

The data (lightarch.data.multimodal): Fashion-MNIST images, the ten class names spoken by espeak-ng in several
voices, speeds and pitches, and generated questions needing one or two modalities ("<image> what is shown?",
"<audio> what is said?", "<image> <audio> does the voice name what is shown?", ...). Evaluation uses held-out images
(the Fashion-MNIST test file) and held-out voices. `--dataset synthetic` replaces both with generated images and tones.
The model is the `trimodal-qa` preset of MultiModalConfig (--preset and --config_overrides change it). Two runs train
the same way: `aligned` (generation loss + the contrastive alignment loss on the text-image and text-audio pairs) and
`no_alignment` (generation loss only, the ablation); each is measured on the held-out split.

Writes into --output_dir (default outputs/multimodal); each model folder is written atomically, the model first:

    aligned/, no_alignment/      model + processor (AutoModelForImageTextToText / AutoProcessor, trust_remote_code),
                                 results.json, README.md (model card), training.png, checkpoint-*/ (resume)
    results.json, results.md     both runs side by side
    training.png                 the loss parts of both runs

    python scripts/train_multimodal.py
    python scripts/train_multimodal.py --max_steps 100 --output_dir outputs/mm_quick
    python scripts/train_multimodal.py --dataset synthetic --max_steps 20 --output_dir outputs/mm_smoke
    python scripts/train_multimodal.py --config_overrides 'alignment_pairs=["text_image","text_audio","image_audio"]'
    python scripts/train_multimodal.py --resume_from_checkpoint True     # continue an interrupted run
    python scripts/eval_multimodal.py --model_dir outputs/multimodal
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # the time budget counts the imports too

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field, fields  # noqa: E402

from transformers.hf_argparser import HfArgumentParser  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# TrainingArguments defaults this script changes (listed by --help). Both runs together fit --time_budget_minutes on
# an idle 2-core machine; the budget cuts them short (equally) on a busy one.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/multimodal",
    "use_cpu": True,
    "max_steps": 1500,  # 500 steps: VQA 85.8% vs 72.4% without alignment; 1500: 91.0% vs 66.8% (about 11 min for both)
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "logging_steps": 25,
    "logging_first_step": True,
    "eval_strategy": "no",
    "save_strategy": "steps",
    "save_steps": 0.5,
    "save_total_limit": 1,
    "report_to": "none",
    "seed": 42,
    "dataloader_num_workers": 1,  # the processor (resampling, log-mel) runs beside the training step
    "remove_unused_columns": False,  # the collator reads the raw question / alignment items
}
EPILOG = ("Every transformers.TrainingArguments option is accepted too (--help_all lists them all; slow); "
          "--resume_from_checkpoint True continues an interrupted run in --output_dir (a finished model is kept, an "
          "unfinished one continues from its last complete checkpoint). Defaults this script changes: "
          + ", ".join(f"{k}={v}" for k, v in TRAINING_DEFAULTS.items()) + ".")


@dataclass
class MultiModalArguments:
    preset: str = field(
        default="trimodal-qa",
        metadata={"help": "MultiModalConfig preset, the architecture (MultiModalConfig.presets() lists them); "
                          "'trimodal-qa' is 'tiny' with the built-in data's tokenizer ids, trained on the text-image "
                          "and text-audio pairs."},
    )
    config_overrides: str = field(
        default="",
        metadata={"help": "MultiModalConfig fields over the preset, 'key=value,...' or a JSON object, sub-configs as "
                          "nested objects, e.g. '{\"audio_seq_length\": 4, \"decoder_config\": "
                          "{\"num_hidden_layers\": 2}}' or 'alignment_loss_weight=0.5'."},
    )
    ablation: bool = field(
        default=True, metadata={"help": "Also train the model without the alignment loss (the ablation)."}
    )
    dataset: str = field(
        default="fashion_mnist",
        metadata={"help": "fashion_mnist: real images and espeak-ng speech (needs `sudo apt-get install "
                          "dataset-fashion-mnist espeak-ng`); synthetic: generated images and tones (tests, smoke "
                          "runs).", "choices": ["fashion_mnist", "synthetic"]},
    )
    train_images_per_class: int = field(default=300, metadata={"help": "Training images per class."})
    eval_images_per_class: int = field(default=50, metadata={"help": "Held-out images per class (evaluation)."})
    eval_questions_per_kind: int = field(
        default=100, metadata={"help": "Held-out questions per question kind (5 kinds) for VQA accuracy."}
    )
    fashion_mnist_dir: str = field(default="/usr/share/datasets/fashion-mnist",
                                   metadata={"help": "Fashion-MNIST IDX folder."})
    espeak_executable: str = field(default="espeak-ng", metadata={"help": "The espeak-ng program."})
    clip_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of synthesized clips (default $LIGHTARCH_CACHE/espeak-ng or "
                                        "~/.cache/lightarch/espeak-ng)."}
    )
    time_budget_minutes: float = field(
        default=20.0,
        metadata={"help": "Wall-clock budget of the whole script (data, both runs, measurements, saving), in minutes. "
                          "The aligned run gets half of what is left after data preparation; the ablation then trains "
                          "the same number of steps. A run stopped by the budget is checkpointed "
                          "(--resume_from_checkpoint True continues it). 0 disables it."},
    )
    num_threads: int = field(
        default=1,
        metadata={"help": "torch threads of the training process (0: torch's default). The default 1 leaves the "
                          "second core of a 2-core machine to the data worker (--dataloader_num_workers 1); the "
                          "matrices are small and more threads on a shared CPU oversubscribe it."},
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    description = __doc__.split("\n\n")[0]
    fast = HfArgumentParser(MultiModalArguments, description=description, epilog=EPILOG)
    fast.add_argument("--help_all", action="store_true", help="List every option, TrainingArguments included.")
    if "--help_all" not in argv:
        fast.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on a shared CPU
    import torch
    from transformers import TrainingArguments

    from lightarch import MultiModalConfig
    from lightarch.data.multimodal import MissingDataError, MultiModalData
    from lightarch.training.cli import config_from_preset, script_parser
    from lightarch.training.multimodal import check_multimodal_run, train_multimodal

    parser = script_parser((MultiModalArguments, TrainingArguments), description, TRAINING_DEFAULTS)
    parser.add_argument("--help_all", action="help", help="List every option, TrainingArguments included.")
    try:
        args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        if args.num_threads < 0:
            raise ValueError(f"--num_threads must be >= 0 (0: torch's default), got {args.num_threads}.")
        if args.time_budget_minutes < 0:
            raise ValueError(f"--time_budget_minutes must be >= 0 (0 disables it), got {args.time_budget_minutes}.")
        config = config_from_preset(MultiModalConfig, args.preset, args.config_overrides)
        data = MultiModalData(**{f.name: getattr(args, f.name) for f in fields(MultiModalData)})
        check_multimodal_run(config, training_args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        train_multimodal(config, training_args, data, ablation=args.ablation,
                         time_budget_minutes=args.time_budget_minutes, started=PROCESS_START)
    except MissingDataError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
