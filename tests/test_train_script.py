"""scripts/train.py end to end, with a tiny model on a few standard-library files (the whole file runs in well under
90 s on 2 CPU cores): outputs, loading, resume, argument validation, atomic saving."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PNG_MAGIC
from lightarch.data.corpus import BlockDataset, split_by_file, token_blocks
from lightarch.training.callbacks import MoeStatsCallback, TimeBudgetCallback
from lightarch.training.checkpoints import atomic_save_pretrained, last_complete_checkpoint
from lightarch.evaluation.model_cards import render_model_card
from lightarch.evaluation.perplexity import unigram_perplexity

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
train_script = importlib.util.module_from_spec(_spec)
sys.modules["train_script"] = train_script  # dataclasses look their module up there
_spec.loader.exec_module(train_script)

TINY = [
    "--hidden_size", "32", "--num_hidden_layers", "4", "--num_attention_heads", "2", "--num_key_value_heads", "1",
    "--num_experts", "4", "--moe_intermediate_size", "32", "--max_experts_per_token", "2", "--sliding_window", "8",
    "--block_size", "32", "--vocab_size", "320", "--max_train_files", "4", "--max_eval_files", "2",
    "--max_file_bytes", "12000", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1", "--sample_max_new_tokens", "8",
    "--disable_tqdm", "True",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model gains nothing from a second thread, and spinning OpenMP threads are very slow on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(output_dir: Path, *extra: str) -> dict:
    return train_script.main(TINY + ["--output_dir", str(output_dir), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run: 6 steps, checkpoints at steps 3 and 6."""
    output_dir = tmp_path_factory.mktemp("train") / "run"
    results = run(output_dir, "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3")
    return output_dir, results


def read_front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    header, _ = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header)


def test_outputs(trained):
    output_dir, results = trained
    names = {p.name for p in output_dir.iterdir()}
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
                 "results.json", "loss_curves.png", "expert_load.png", "sample.txt", "modeling_sparse_moe.py",
                 "checkpoint-3", "checkpoint-6"):
        assert name in names, name
    assert not [p for p in output_dir.parent.iterdir() if p.name.startswith(".run.")]  # no temporary folders left

    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["heldout_perplexity"] == pytest.approx(results["heldout_perplexity"])
    assert saved["train_steps"] == 6 and [s for s, _ in saved["train_loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert saved["num_parameters"] > saved["active_parameters_per_token_mean"] > 0
    assert len(saved["experts_per_token"]) == 4
    assert all(1.0 <= v <= 2.0 for v in saved["experts_per_token"].values())
    for load in saved["expert_load"].values():
        assert len(load) == 4 and sum(load) == pytest.approx(1.0)
    assert saved["unigram_perplexity"] > 1 and saved["heldout_perplexity"] > 1

    card = (output_dir / "README.md").read_text()
    meta = read_front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and {"lightarch", "moe"} <= set(meta["tags"])
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric["value"] == pytest.approx(saved["heldout_perplexity"], abs=0.006)
    assert f"| **{saved['heldout_perplexity']:.2f}** |" in card
    assert f"| {saved['unigram_perplexity']:.2f} |" in card
    assert "${" not in card

    for name in ("loss_curves.png", "expert_load.png"):
        data = (output_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    sample = (output_dir / "sample.txt").read_text()
    assert sample.startswith("def fibonacci(n):") and sample.strip() == saved["sample"].strip()


def test_folder_loads_with_auto_classes(trained):
    output_dir, _ = trained
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert type(model).__name__ == "SparseMoeForCausalLM"
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.bos_token_id == model.config.bos_token_id and tokenizer.pad_token is not None
    inputs = tokenizer("import os\n", return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 5
    assert isinstance(tokenizer.decode(output[0], skip_special_tokens=True), str)


def test_folder_loads_with_trust_remote_code_without_lightarch(trained, tmp_path):
    output_dir, _ = trained
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "assert 'lightarch' not in sys.modules\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(output_dir)!r}, trust_remote_code=True)\n"
        f"tok = AutoTokenizer.from_pretrained({str(output_dir)!r}, trust_remote_code=True)\n"
        "ids = tok('x = 1\\n', return_tensors='pt')\n"
        "print(type(model).__module__, model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    module, length = result.stdout.split()
    assert module.startswith("transformers_modules.") and int(length) > 3


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    """Killed after checkpoint-3 (checkpoint-6 lost, a half-written checkpoint-5 left behind), then restarted."""
    output_dir, first = trained
    resumed_dir = tmp_path / "run"
    shutil.copytree(output_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint-6")
    (resumed_dir / "checkpoint-5").mkdir()  # a save cut short: no trainer_state.json
    (resumed_dir / "checkpoint-5" / "config.json").write_text("{}")
    assert last_complete_checkpoint(resumed_dir) == str(resumed_dir / "checkpoint-3")

    results = run(resumed_dir, "--max_steps", "8", "--save_steps", "4", "--eval_steps", "4",
                  "--resume_from_checkpoint", "True")
    assert results["resumed_from"] == str(resumed_dir / "checkpoint-3")
    assert results["train_steps"] == 8
    state = json.loads((resumed_dir / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    logged_steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged_steps == [1, 2, 3, 4, 5, 6, 7, 8]  # steps 1-3 from the checkpoint, then 4-8: no restart at 0
    history = dict((step, loss) for step, loss in results["train_loss_history"])
    assert sorted(history) == list(range(1, 9))
    # Same tokenizer, blocks, batch order, RNG (and a constant learning rate): steps 4-6 repeat the same losses.
    first_history = dict((step, loss) for step, loss in first["train_loss_history"])
    for step in (1, 2, 3, 4, 5, 6):
        assert history[step] == pytest.approx(first_history[step], rel=1e-4), step
    assert AutoModelForCausalLM.from_pretrained(resumed_dir).config.vocab_size == 320


def test_train_file_and_trainer_flags(tmp_path):
    corpus = tmp_path / "my: corpus.txt"  # a name that would break an unquoted YAML header
    corpus.write_text(Path(os.__file__).read_text()[:40_000])
    output_dir = tmp_path / "out"
    results = run(output_dir, "--train_file", str(corpus), "--max_steps", "2", "--gradient_accumulation_steps", "2",
                  "--gradient_checkpointing", "True", "--eval_strategy", "no", "--save_strategy", "no")
    assert results["train_steps"] == 2 and results["data"]["train_files"] == 1
    assert results["tokens_seen"] == 2 * 2 * 4 * 32
    meta = read_front_matter((output_dir / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "my: corpus.txt"
    assert not list(output_dir.glob("checkpoint-*"))
    assert AutoModelForCausalLM.from_pretrained(output_dir).config.vocab_size == 320


def test_resume_without_checkpoint_fails_fast(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "empty", "--resume_from_checkpoint", "True")
    assert exit_info.value.code == 2
    assert "--resume_from_checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, option",
    [
        (["--train_file", "/no/such/corpus.txt"], "--train_file"),
        (["--block_size", "1"], "--block_size"),
        (["--validation_fraction", "-0.1"], "--validation_fraction"),
        (["--vocab_size", "100"], "--vocab_size"),
        (["--num_key_value_heads", "3"], "num_key_value_heads"),
        (["--router_top_p", "1.5"], "router_top_p"),
        (["--config_overrides", "not_a_field=1"], "--config_overrides"),
        (["--max_position_embeddings", "16"], "--max_position_embeddings"),
    ],
)
def test_bad_input_fails_fast_naming_the_option(tmp_path, capsys, args, option):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "out", *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was prepared or trained


def test_refuses_to_replace_a_foreign_output_dir(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        run(tmp_path)
    assert "--output_dir" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--router_mode", "--full_attention_interval", "--train_file", "--block_size", "--vocab_size",
                   "--validation_fraction", "--config_overrides", "--resume_from_checkpoint", "--max_steps"):
        assert option in text
    assert "outputs/sparse_moe" in text  # the script's TrainingArguments defaults are shown


class _Exploding:
    """Writes part of its files, then fails (like a crash in the middle of `save_pretrained`)."""

    def save_pretrained(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half a model")
        raise OSError("disk full")


def test_atomic_save_never_leaves_a_half_written_model(tmp_path):
    from conftest import tiny_sparse_moe_config
    from lightarch import SparseMoeForCausalLM

    destination = tmp_path / "model"
    model = SparseMoeForCausalLM(tiny_sparse_moe_config())

    with pytest.raises(OSError):  # no previous save: the destination must not appear
        atomic_save_pretrained(destination, model, _Exploding())
    assert not destination.exists() and list(tmp_path.iterdir()) == []

    atomic_save_pretrained(destination, model, extra_files={"results.json": "{}", "plot.png": PNG_MAGIC})
    (destination / "checkpoint-2").mkdir()
    before = {p.name: p.read_bytes() for p in destination.iterdir() if p.is_file()}

    with pytest.raises(OSError):  # a previous save: it must stay complete and unchanged
        atomic_save_pretrained(destination, SparseMoeForCausalLM(tiny_sparse_moe_config()), _Exploding(),
                               keep=["checkpoint-*"])
    assert {p.name: p.read_bytes() for p in destination.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    reloaded = AutoModelForCausalLM.from_pretrained(destination)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name

    other = SparseMoeForCausalLM(tiny_sparse_moe_config())  # a successful save replaces it, keeping checkpoints
    atomic_save_pretrained(destination, other, extra_files={"README.md": "new"})
    names = {p.name for p in destination.iterdir()}
    assert "checkpoint-2" in names and "README.md" in names and "results.json" not in names
    assert torch.equal(AutoModelForCausalLM.from_pretrained(destination).lm_head.weight, other.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    atomic_save_pretrained(destination, extra_files={"notes.txt": "only this"}, keep=())  # full replacement
    assert [p.name for p in destination.iterdir()] == ["notes.txt"]


def test_data_helpers():
    paths = [f"pkg/module_{i}.py" for i in range(200)]
    train, heldout = split_by_file(paths, 0.1)
    assert split_by_file(list(reversed(paths)), 0.1) == (train, heldout)  # deterministic, order-independent
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 200 and 5 < len(heldout) < 40

    blocks = BlockDataset(token_blocks(list(range(10)), 4))
    assert len(blocks) == 2 and blocks[1]["input_ids"].tolist() == [4, 5, 6, 7]

    # Train counts 0:3, 1:1 (+1 smoothing over 3 tokens: 4/7, 2/7, 1/7); held-out targets are 0 and 2.
    ppl = unigram_perplexity(torch.tensor([[0, 0, 0, 1]]), torch.tensor([[1, 0, 2]]), vocab_size=3)
    assert ppl == pytest.approx((7 / 4 * 7 / 1) ** 0.5)

    assert render_model_card("a ${x} {b}", {"x": 1}) == "a 1 {b}"
    with pytest.raises(KeyError):
        render_model_card("${missing}", {})


def test_time_budget_stops_training_with_a_checkpoint():
    import time
    from types import SimpleNamespace

    from transformers import TrainerControl

    args = SimpleNamespace(save_strategy="steps", eval_strategy="steps")
    state = SimpleNamespace(global_step=3, max_steps=100, eval_steps=50)
    relaxed, control = TimeBudgetCallback(time.perf_counter() + 3600, eval_step_equivalents=10), TrainerControl()
    relaxed.on_step_begin(args, state, control)
    relaxed.on_step_end(args, state, control)
    assert not control.should_training_stop and relaxed.stopped_at_step is None

    tight, control = TimeBudgetCallback(time.perf_counter() + 5, reserve_seconds=10), TrainerControl()
    tight.on_step_begin(args, state, control)
    tight.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save and control.should_evaluate
    assert tight.stopped_at_step == 3


def test_stats_callback_matches_router_statistics():
    from types import SimpleNamespace

    from conftest import tiny_sparse_moe_config
    from lightarch import SparseMoeForCausalLM, router_statistics

    model = SparseMoeForCausalLM(tiny_sparse_moe_config(router_mode="top_p", router_top_p=0.4)).eval()
    stats = MoeStatsCallback(model)
    input_ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
        model.generate(input_ids[:, :4], max_new_tokens=2, do_sample=False)  # no labels: not recorded
    stats.on_evaluate(None, SimpleNamespace(global_step=7), None)
    entry = stats.eval_history[-1]
    expected = router_statistics(output.router_logits, output.router_indices, model.config.num_experts)
    assert entry["step"] == 7 and entry["tokens"] == 2 * 11
    assert entry["loss"] == pytest.approx(float(output.loss - output.aux_loss), rel=1e-5)
    assert entry["experts_per_token"] == pytest.approx(expected["experts_per_token"].tolist(), rel=1e-6)
    assert torch.allclose(torch.tensor(entry["expert_load"], dtype=torch.float64), expected["expert_load"].double(), rtol=1e-6)
    stats.remove_hooks()


def test_config_overrides_parse_json_key_values_and_bracketed_lists():
    from lightarch.training.cli import parse_config_overrides

    assert parse_config_overrides('{"hidden_size": 64}') == {"hidden_size": 64}
    assert parse_config_overrides("hidden_size=64, router_mode=top_p,no_rope_layers=[1,0,1]") == {
        "hidden_size": 64, "router_mode": "top_p", "no_rope_layers": [1, 0, 1]}
    with pytest.raises(ValueError, match="'sliding' is not key=value"):
        parse_config_overrides("hidden_size=64,sliding")


@pytest.mark.parametrize("module", ["scripts.train", "scripts.train_multimodal", "scripts.eval_multimodal"])
def test_importing_a_script_leaves_the_openmp_wait_policy_alone(module):
    """The training scripts ask OpenMP for passive waiting in their own run only. Set on import, it leaked into
    processes the importer spawned (scripts/bench_inference.py's continuous-batching worker ran 2.3x slower)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"import os, {module}; print('policy', os.environ.get('OMP_WAIT_POLICY'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "policy None" in result.stdout
