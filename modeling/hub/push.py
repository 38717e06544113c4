"""Push a saved lightarch folder to the Hub: check it is self-contained, complete its model card from its
results.json, then `huggingface_hub.create_repo` + `upload_folder`. `plan_upload` (the dry run) says exactly what
would be uploaded without changing anything."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Never uploaded: resumable Trainer checkpoints, the output-folder marker of lightarch's scripts, caches.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "lightarch_output.json", "**/__pycache__/**", "*.pyc",
                   ".cache/**", "runs/**"]


@dataclass
class UploadPlan:
    """What `push_folder` uploads: the files (paths in the repository, in upload order), the model card text that
    README.md will hold, and where to."""

    repo_id: str
    folder: Path
    files: list[str]
    card: str
    private: bool = False
    revision: str | None = None
    commit_message: str = "Upload lightarch model"
    create_pr: bool = False
    self_contained: str = ""
    result: dict = field(default_factory=dict)

    def describe(self) -> str:
        """The dry-run listing: destination, every file with its size, and the card."""
        lines = [(f"repo: {self.repo_id} ({'private' if self.private else 'public'}), revision "
                  f"{self.revision or 'main'}{', as a pull request' if self.create_pr else ''}"),
                 f"commit message: {self.commit_message}",
                 f"self-contained: {self.self_contained or 'not checked'}",
                 f"files ({len(self.files)}):"]
        lines += [f"  {name}  ({(self.folder / name).stat().st_size:,} bytes)" for name in self.files]
        return "\n".join(lines + ["", "model card (README.md):", self.card])


def _folder_files(folder: Path) -> list[str]:
    """The files `upload_folder` picks from `folder` with `IGNORE_PATTERNS` (its own filter and order)."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS))


def plan_upload(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, create_pr: bool = False, base_model: str | None = None,
                datasets: list[str] | None = None, check: bool = True) -> UploadPlan:
    """Everything `push_folder` would do, computed without writing anywhere: the self-contained check (`check`),
    the completed model card (`lightarch.evaluation.model_cards.hub_model_card`) and the file list."""
    from ..evaluation.model_cards import hub_model_card
    from .self_contained import check_self_contained

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--folder {folder} is not a folder; give a model folder written by a script of scripts/.")
    if repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise ValueError(f"--repo_id {repo_id!r} is not a Hub repository name; write 'user/name' or 'name'.")
    card = hub_model_card(folder, base_model=base_model, datasets=datasets)
    files = _folder_files(folder)
    if "README.md" not in files:
        files.append("README.md")
    report = check_self_contained(folder) if check else ""
    return UploadPlan(repo_id=repo_id, folder=folder, files=files, card=card, private=private, revision=revision,
                      commit_message=commit_message or f"Upload lightarch model from {folder.name}",
                      create_pr=create_pr, self_contained=report)


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, create_pr: bool = False, base_model: str | None = None,
                datasets: list[str] | None = None, token: str | None = None, check: bool = True) -> UploadPlan:
    """Check `folder` loads and runs without lightarch, write its completed model card into README.md, create the
    repository (`private`; an existing one is kept) and, for a `revision` other than main, the branch (unless
    `create_pr`: the pull request goes against it), then `upload_folder` with `commit_message` / `create_pr`.
    Returns the plan with `result` = {"repo_url", "commit_url", "pr_url"}."""
    from huggingface_hub import HfApi

    from ..training.checkpoints import write_atomically

    plan = plan_upload(folder, repo_id, private, revision, commit_message, create_pr, base_model, datasets, check)
    readme = plan.folder / "README.md"
    if readme.read_text(encoding="utf-8") != plan.card:
        write_atomically(readme, plan.card)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main" and not create_pr:
        api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=plan.folder, revision=revision,
                               commit_message=plan.commit_message, create_pr=create_pr,
                               ignore_patterns=IGNORE_PATTERNS)
    plan.result = {"repo_url": str(repo_url), "commit_url": commit.commit_url, "pr_url": commit.pr_url}
    return plan
