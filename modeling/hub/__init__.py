"""Sharing on the Hub: the self-contained check (a fresh process without lightarch loads and runs the folder),
the dry-run plan and the push (`create_repo` + `upload_folder`, model card completed from results.json)."""

from .push import IGNORE_PATTERNS, UploadPlan, plan_upload, push_folder
from .self_contained import check_self_contained

__all__ = ["IGNORE_PATTERNS", "UploadPlan", "check_self_contained", "plan_upload", "push_folder"]
