"""Hub-ready folders and the push: card metadata completed from results.json (validated with
huggingface_hub.ModelCard), the self-contained check, the dry run (changes nothing), and a real push through
huggingface_hub against a local HTTP server on 127.0.0.1 that records the requests it gets."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import (
    PROJECT_ROOT,
    run_script,
    run_without_lightarch,
    tiny_sparse_moe_config,
)
from huggingface_hub import ModelCard
from lightarch.evaluation.model_cards import (
    RESULT_KINDS,
    hub_model_card,
    measured_results,
    model_card_template,
    result_kind,
    validate_card,
)
from lightarch.hub import check_self_contained, plan_upload
from transformers import AutoModelForCausalLM

RESULTS = {
    "sparse_moe": {"heldout_perplexity": 12.5, "heldout_loss": 2.5257, "unigram_perplexity": 60.0,
                   "num_parameters": 1000},
    "passkey": {"accuracy_at_max_length": 0.75, "digit_accuracy_at_max_length": 0.9,
                "accuracy_by_depth_at_max_length": {"0.0": 1.0, "1.0": 0.5}, "data": {"max_length": 256}},
    "adaptive_depth": {"calibration": {"full_accuracy": {"easy": 0.98, "hard": 0.9},
                                       "estimator": {"threshold": 0.9, "easy": {"accuracy": 0.97, "mean_layers": 2.0},
                                                     "hard": {"accuracy": 0.9, "mean_layers": 4.0}},
                                       "confidence": {"threshold": 0.8,
                                                      "easy": {"accuracy": 0.96, "mean_layers": 2.5},
                                                      "hard": {"accuracy": 0.89, "mean_layers": 3.5}}}},
    "multimodal": {"data": {"dataset": "fashion_mnist"},
                   "heldout": {"vqa": {"accuracy": 0.6, "per_kind": {"what_is_shown": 0.8, "what_is_said": 0.4}},
                               "retrieval_r_at_1": {"image->text": 0.7, "audio->text": 0.9},
                               "alignment_error": {"error": 0.08, "pairs": {"image->text": 0.1,
                                                                            "text->image": 0.06}}}},
}
# How many model-index entries each record holds: every figure measured.
EXPECTED_COUNTS = {"sparse_moe": 2, "passkey": 4, "adaptive_depth": 10, "multimodal": 8}


def _front_matter(template: str) -> str:
    """The YAML front matter of a shipped template, placeholders filled with a JSON string."""
    head = model_card_template(template).split("---\n")[1]
    return head.replace("${model_name_yaml}", '"tiny"').replace("${dataset_type_yaml}", '"python-source"') \
        .replace("${dataset_name_yaml}", '"stdlib (*.py)"').replace("${heldout_perplexity}", "12.50")


def _card_folder(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "README.md").write_text(f"---\n{_front_matter(kind)}---\n\n# A {kind} model\n\nMeasured.\n")
    (folder / "results.json").write_text(json.dumps(RESULTS[kind]))
    return folder


# The recipes whose results.json `measured_results` reads (distilled, private, retrieval and safety cards: not yet).
@pytest.mark.parametrize("kind", RESULT_KINDS)
def test_every_template_becomes_a_valid_hub_card_with_every_measured_result(tmp_path, kind):
    folder = _card_folder(tmp_path, kind)
    text = hub_model_card(folder)
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0" and data["pipeline_tag"]
    assert "lightarch" in data["tags"] and "custom_code" in data["tags"]
    assert len(card.data.eval_results) == EXPECTED_COUNTS[kind]
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert card.text.strip().startswith(f"# A {kind} model")  # the body is kept
    if kind == "sparse_moe":
        assert values["Held-out perplexity"] == 12.5
        assert card.data.eval_results[0].dataset_type == "python-source"  # the template's data set is kept
    if kind == "multimodal":
        assert data["datasets"] == ["zalando-datasets/fashion_mnist"]
        assert values["Modality alignment error"] == 0.08 and values["R@1 audio->text"] == 0.9
        assert {r.metric_type for r in card.data.eval_results} == {"vqa_accuracy", "retrieval_recall",
                                                                   "modality_alignment_error"}
    assert validate_card(text) is not None


def test_base_model_from_an_adapter_and_given_datasets(tmp_path):
    folder = _card_folder(tmp_path, "sparse_moe")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "me/base"}))
    data = ModelCard(hub_model_card(folder, datasets=["me/corpus"])).data.to_dict()
    assert data["base_model"] == "me/base" and data["datasets"] == ["me/corpus"]
    assert ModelCard(hub_model_card(folder, base_model="me/other")).data.to_dict()["base_model"] == "me/other"


def test_bad_cards_and_records_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="model-index"):
        validate_card("---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [a]\n---\n")
    with pytest.raises(ValueError, match="library_name"):
        validate_card(hub_model_card(_card_folder(tmp_path, "passkey")).replace("library_name: transformers",
                                                                                "library_name: timm"))
    with pytest.raises(ValueError, match="training recipe"):
        result_kind({"loss": 1.0})
    with pytest.raises(ValueError, match="results.json"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "README.md").write_text("# x\n")
        hub_model_card(tmp_path / "empty")
    assert len(measured_results(RESULTS["passkey"])) == EXPECTED_COUNTS["passkey"]


# ------------------------------------------------------------------------------------------- a real folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny SparseMoe saved with its remote code, a card from the template's front matter and a results.json,
    plus what a training run leaves that must not be uploaded (a checkpoint, the output marker)."""
    folder = tmp_path_factory.mktemp("hub") / "tiny"
    AutoModelForCausalLM.from_config(tiny_sparse_moe_config()).save_pretrained(folder)
    (folder / "README.md").write_text(f"---\n{_front_matter('sparse_moe')}---\n\n# tiny\n")
    (folder / "results.json").write_text(json.dumps(RESULTS["sparse_moe"]))
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "optimizer.pt").write_bytes(b"x" * 10)
    (folder / "lightarch_output.json").write_text('{"script": "train.py"}')
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dry_run_lists_exactly_the_upload_and_changes_nothing(model_folder):
    before = _snapshot(model_folder)
    result = run_script("push_to_hub", "--folder", str(model_folder), "--repo_id", "me/tiny", "--dry_run",
                        "--private", "--skip_check")  # the check itself runs in the push test below
    assert result.returncode == 0, result.stderr[-3000:]
    assert _snapshot(model_folder) == before
    listed = [line.split()[0] for line in result.stdout.split("files (")[1].split("\n\n")[0].splitlines()[1:]]
    expected = sorted(name for name in before if not name.startswith("checkpoint-") and name != "lightarch_output.json")
    assert listed == expected and "model.safetensors" in listed and "modeling_sparse_moe.py" in listed
    assert "(private)" in result.stdout and "self-contained: not checked" in result.stdout
    assert "model-index:" in result.stdout.split("model card (README.md):")[1]


def test_a_folder_that_needs_lightarch_is_refused(model_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    path = broken / "modeling_sparse_moe.py"
    path.write_text("import lightarch.training\n" + path.read_text())
    with pytest.raises(ValueError, match="not self-contained(.|\n)*lightarch is not installed here"):
        check_self_contained(broken)
    with pytest.raises(ValueError, match="--folder"):
        plan_upload(tmp_path / "nope", "me/x")
    with pytest.raises(ValueError, match="--repo_id"):
        plan_upload(model_folder, "a/b/c", check=False)


class _RecordingHub(BaseHTTPRequestHandler):
    """The few Hub endpoints create_repo / create_branch / upload_folder call (read from huggingface_hub's source):
    repos/create, branch, validate-yaml, preupload (every file 'regular': no LFS) and commit (NDJSON)."""

    requests: list[dict] = []

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path, _, query = self.path.partition("?")
        record = {"path": path, "query": query, "auth": self.headers.get("Authorization"),
                  "content_type": self.headers.get("Content-Type")}
        if self.headers.get("Content-Type") == "application/x-ndjson":
            record["ndjson"] = [json.loads(line) for line in body.splitlines() if line.strip()]
        elif body:
            record["json"] = json.loads(body)
        self.requests.append(record)
        endpoint = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            return self._reply(200, {"url": f"{endpoint}/{record['json']['organization']}/{record['json']['name']}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {})
        parts = path.split("/")
        if path.startswith("/api/models/") and "branch" in parts:
            return self._reply(200, {})
        if path.startswith("/api/models/") and "preupload" in parts:
            files = record["json"]["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if path.startswith("/api/models/") and parts[-1] == "discussions":  # create_pr opens a pull request first
            return self._reply(200, {"num": 1})
        if path.startswith("/api/models/") and "commit" in parts:
            repo = "/".join(parts[3:5])
            pr = {"pullRequestUrl": f"{endpoint}/{repo}/discussions/1"} if "create_pr=1" in query else {}
            return self._reply(200, {"commitUrl": f"{endpoint}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                     **pr})
        return self._reply(404, {"error": f"not recorded: {path}"})

    def do_GET(self):
        path, _, query = self.path.partition("?")
        self.requests.append({"path": path, "query": query, "auth": self.headers.get("Authorization"),
                              "method": "GET"})
        parts = path.split("/")
        if path.startswith("/api/models/") and parts[-2:] == ["discussions", "1"]:
            return self._reply(200, {"title": "pr", "num": 1, "createdAt": "2026-12-01T00:00:00.000Z",
                                     "status": "draft", "repo": {"name": "/".join(parts[3:5]), "type": "model"},
                                     "isPullRequest": True, "events": [], "filesWithConflicts": [],
                                     "changes": {"base": "refs/heads/main"}})
        return self._reply(404, {"error": f"not recorded: {path}"})


@pytest.fixture
def local_hub():
    _RecordingHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _RecordingHub.requests
    server.shutdown()
    server.server_close()


def test_push_sends_the_repo_the_branch_and_every_file_and_the_card(model_folder, local_hub, tmp_path):
    endpoint, requests = local_hub
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_dummy_token_for_the_local_server",
           "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)  # only this subprocess talks to the (local) hub
    args = ["--folder", str(model_folder), "--repo_id", "me/tiny", "--private", "--revision", "dev",
            "--commit_message", "first push"]
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "push_to_hub.py"), *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [r["path"] for r in requests]
    create = requests[0]["json"]
    assert paths[0] == "/api/repos/create" and (create["organization"], create["name"]) == ("me", "tiny")
    assert create.get("private") is True or create.get("visibility") == "private", create
    assert "/api/models/me/tiny/branch/dev" in paths
    assert "/api/models/me/tiny/preupload/dev" in paths and paths[-1] == "/api/models/me/tiny/commit/dev"
    assert all(r["auth"] == "Bearer hf_dummy_token_for_the_local_server" for r in requests)
    header, *files = requests[-1]["ndjson"]
    assert header["key"] == "header" and header["value"]["summary"] == "first push"
    sent = {f["value"]["path"]: base64.b64decode(f["value"]["content"]) for f in files}
    assert sorted(sent) == sorted(n for n in _snapshot(model_folder)
                                  if not n.startswith("checkpoint-") and n != "lightarch_output.json")
    card = ModelCard(sent["README.md"].decode())
    assert card.data.to_dict()["library_name"] == "transformers"
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["Held-out perplexity"] == 12.5
    assert sent["model.safetensors"] == (model_folder / "model.safetensors").read_bytes()
    assert "commit:" in result.stdout
    assert "SELF-CONTAINED-OK SparseMoeForCausalLM generate" in result.stdout  # checked before anything was sent

    # what was pushed is a folder that loads and runs in a fresh process without lightarch
    pushed = tmp_path / "pushed"
    for name, content in sent.items():
        (pushed / name).parent.mkdir(parents=True, exist_ok=True)
        (pushed / name).write_bytes(content)
    run_without_lightarch(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(pushed)!r}, trust_remote_code=True)
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape == (1, 6)
        print("REMOTE-CODE-OK")
    """, tmp_path)

    # a pull request: no branch created; the pull request is opened, then the commit goes to its ref
    requests.clear()
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "push_to_hub.py"), "--folder",
                             str(model_folder), "--repo_id", "me/tiny", "--create_pr", "--skip_check"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any("/branch/" in r["path"] for r in requests)
    opened = next(r for r in requests if r["path"] == "/api/models/me/tiny/discussions")
    assert opened["json"]["pullRequest"] is True
    commit = [r for r in requests if "/commit/" in r["path"]]
    assert len(commit) == 1 and commit[0]["path"] == "/api/models/me/tiny/commit/refs%2Fpr%2F1"
    assert "pull request: " in result.stdout
    assert requests[0]["json"].get("private") is not True and requests[0]["json"].get("visibility") != "private"
