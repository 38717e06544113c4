#!/usr/bin/env python
"""Push a saved lightarch model folder to the Hugging Face Hub (the library: lightarch.hub.push_folder).

First checks that the folder is self-contained (a fresh process without lightarch loads it with the Auto classes and
trust_remote_code and runs it), completes its model card from its results.json (YAML metadata with a model-index of
every measured result, validated with huggingface_hub.ModelCard), then create_repo + upload_folder. Checkpoints
(checkpoint-*) and lightarch's output marker are never uploaded.

    python scripts/push_to_hub.py --folder outputs/tiny --repo_id me/lightarch-tiny --dry_run   # lists, changes nothing
    python scripts/push_to_hub.py --folder outputs/tiny --repo_id me/lightarch-tiny --private --create_pr
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser


@dataclass
class PushArguments:
    folder: str = field(default=None, metadata={"help": "A saved model folder (config.json, remote code, README.md, "
                                                "results.json). Required."})
    repo_id: str = field(default=None, metadata={"help": "Hub repository, 'user/name' or 'name'. Required."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str = field(default=None, metadata={"help": "Branch to upload to (created if missing; default main)."})
    commit_message: str = field(default=None, metadata={"help": "Commit message (default: names the folder)."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing directly."})
    base_model: str = field(default=None, metadata={"help": "Hub id of the model this one was fine-tuned or "
                                                    "distilled from, for the card's base_model."})
    datasets: str = field(default=None, metadata={"help": "Comma-separated Hub dataset ids for the card."})
    dry_run: bool = field(default=False, metadata={"help": "Only list the files that would be uploaded and print "
                                                   "the card; write and send nothing."})
    skip_check: bool = field(default=False, metadata={"help": "Skip the fresh-process load without lightarch."})
    token: str = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the saved login)."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(PushArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:  # argparse's one-line usage error, not HfArgumentParser's traceback
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for option in ("folder", "repo_id"):
        if not getattr(args, option):
            parser.error(f"--{option} is required (e.g. --folder outputs/tiny --repo_id me/lightarch-tiny).")

    from lightarch.hub import plan_upload, push_folder

    options = dict(private=args.private, revision=args.revision, commit_message=args.commit_message,
                   create_pr=args.create_pr, base_model=args.base_model, check=not args.skip_check,
                   datasets=[d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None)
    try:
        if args.dry_run:
            print(plan_upload(args.folder, args.repo_id, **options).describe())
            return
        plan = push_folder(args.folder, args.repo_id, token=args.token, **options)
    except ValueError as error:
        parser.error(str(error).split("\n")[0] if "self-contained" not in str(error) else str(error))
    if plan.self_contained:
        print(f"self-contained: {plan.self_contained}")
    print(f"uploaded {len(plan.files)} files to {plan.result['repo_url']}")
    print(f"commit: {plan.result['commit_url']}")
    if plan.result["pr_url"]:
        print(f"pull request: {plan.result['pr_url']}")


if __name__ == "__main__":
    main()
