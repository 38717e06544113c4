"""Is a saved folder self-contained? Load it (and run it) in a fresh interpreter where lightarch cannot be imported:
what a user who only has transformers does with a folder pulled from the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Imported first in the fresh interpreter: any import of lightarch (or of the checkout's folders) fails, so only the
# folder's own remote code can define the model.
BLOCK_LIGHTARCH = """
import importlib.abc, sys
class BlockLightarch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("configuration", "modeling", "lightarch"):
            raise ImportError("lightarch is not installed here: " + name)
sys.meta_path.insert(0, BlockLightarch())
"""

LOAD_AND_RUN = """
import json, sys, torch, transformers
from pathlib import Path
folder = Path(sys.argv[1])
config = json.loads((folder / "config.json").read_text())
auto_map = config.get("auto_map", {})
if "AutoModelForImageTextToText" in auto_map:
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
    ran = "text features"
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, min_new_tokens=2)
    assert out.shape == (1, 5), out.shape
    ran = "generate"
print("SELF-CONTAINED-OK", type(model).__name__, ran)
"""


def check_self_contained(folder: str | os.PathLike, timeout: float = 300) -> str:
    """Load the model in `folder` (and its tokenizer / processor) with the Auto classes and trust_remote_code in a
    fresh process without lightarch, and run it once (2 greedy tokens; the multimodal model: text features).
    Returns the process's report line; a ValueError with the end of its error output when the folder is not
    self-contained (e.g. a file that imports lightarch, or a missing remote-code file)."""
    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder {folder}: no config.json, so no saved model (save one with save_pretrained).")
    auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map")
    if not auto_map:
        raise ValueError(f"folder {folder}: config.json has no auto_map, so the folder carries no remote code; save "
                         "the model with lightarch imported (its save_pretrained copies the model files).")
    with tempfile.TemporaryDirectory(prefix="lightarch-self-contained-") as scratch:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(scratch) / "modules"), OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-c", BLOCK_LIGHTARCH + textwrap.dedent(LOAD_AND_RUN), str(folder)],
                                cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    report = next((line for line in result.stdout.splitlines() if line.startswith("SELF-CONTAINED-OK")), None)
    if result.returncode != 0 or report is None:
        raise ValueError(f"folder {folder} is not self-contained: loading it without lightarch failed:\n"
                         + result.stderr[-2000:])
    return report
