"""The main job, lightarch.training.sparse_moe, with a tiny model on a few standard-library files: outputs, loading,
resume, saving before the card and plots, option checks. scripts/train.py itself runs end to end in a subprocess, as a
user runs it (a run and a resumed run, a bad option, --help); everything else calls the library."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from conftest import PNG_MAGIC, PROJECT_ROOT, run_script
from lightarch import SparseMoeConfig
from lightarch.data.corpus import (
    BlockDataset,
    check_corpus_options,
    heldout_texts,
    load_corpus,
    split_by_file,
    token_blocks,
)
from lightarch.evaluation.model_cards import render_model_card
from lightarch.evaluation.perplexity import unigram_perplexity
from lightarch.training import sparse_moe
from lightarch.training.callbacks import MoeStatsCallback, TimeBudgetCallback
from lightarch.training.checkpoints import atomic_save_pretrained, last_complete_checkpoint
from lightarch.training.cli import config_from_preset
from lightarch.training.sparse_moe import check_train_options, prepare_data, train_sparse_moe

TINY_MODEL = ("hidden_size=32,num_attention_heads=2,num_key_value_heads=1,num_experts=4,moe_intermediate_size=32,"
              "max_experts_per_token=2,sliding_window=8,vocab_size=320")
TINY_CORPUS = dict(max_train_files=4, max_eval_files=2, max_file_bytes=12000)
TINY = [
    "--config_overrides", TINY_MODEL, "--block_size", "32", "--max_train_files", "4", "--max_eval_files", "2",
    "--max_file_bytes", "12000", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1",
    "--sample_max_new_tokens", "8", "--disable_tqdm", "True",
]


# tiny models (see conftest.one_thread); one xdist worker under the README's `--dist loadgroup`, so the module-scoped
# training run runs once
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("test_train_script")]


def run_train(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python scripts/train.py` with the tiny model, as a user runs it."""
    return run_script("train", *TINY, "--output_dir", str(output_dir), *extra, cwd=output_dir.parent)


def tiny_config(extra_overrides: str = "") -> SparseMoeConfig:
    return config_from_preset(SparseMoeConfig, "tiny", TINY_MODEL + extra_overrides)


def tiny_training_args(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                  per_device_eval_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
                  eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=42)
    return TrainingArguments(**{**values, **overrides})


def train_in_process(output_dir: Path, corpus=None, extra_overrides: str = "", **training) -> dict:
    """The library recipe, as scripts/train.py calls it, on the tiny model."""
    config = tiny_config(extra_overrides)
    data = prepare_data(corpus or load_corpus(**TINY_CORPUS), config.vocab_size, block_size=32)
    return train_sparse_moe(config, tiny_training_args(output_dir, **training), data, sample_max_new_tokens=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of the script: 6 steps, checkpoints at steps 3 and 6."""
    output_dir = tmp_path_factory.mktemp("train") / "run"
    result = run_train(output_dir, "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, json.loads((output_dir / "results.json").read_text())


def read_front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    header, _ = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header)


def test_outputs(trained):
    output_dir, saved = trained
    names = {p.name for p in output_dir.iterdir()}
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
                 "results.json", "loss_curves.png", "expert_load.png", "sample.txt", "modeling_sparse_moe.py",
                 "checkpoint-3", "checkpoint-6"):
        assert name in names, name
    assert not [p for p in output_dir.parent.iterdir() if p.name.startswith(".run.")]  # no temporary folders left

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


def test_the_tiny_preset_with_overrides_is_the_trained_config(trained):
    output_dir, _ = trained
    config = AutoModelForCausalLM.from_pretrained(output_dir).config
    expected = tiny_config()
    for name in ("hidden_size", "num_experts", "router_mode", "max_experts_per_token", "layer_types", "sliding_window",
                 "max_position_embeddings", "router_top_p"):
        assert getattr(config, name) == getattr(expected, name), name
    assert config.router_mode == "top_p" and config.vocab_size == 320
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)  # the tokenizer's


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

    result = run_train(resumed_dir, "--max_steps", "8", "--save_steps", "4", "--eval_steps", "4",
                        "--resume_from_checkpoint", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((resumed_dir / "results.json").read_text())
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
    corpus_file = tmp_path / "my: corpus.txt"  # a name that would break an unquoted YAML header
    corpus_file.write_text(Path(os.__file__).read_text()[:40_000])
    output_dir = tmp_path / "out"
    results = train_in_process(output_dir, load_corpus(train_file=corpus_file), gradient_accumulation_steps=2,
                               gradient_checkpointing=True)
    assert results["train_steps"] == 2 and results["data"]["train_files"] == 1
    assert results["tokens_seen"] == 2 * 2 * 4 * 32
    meta = read_front_matter((output_dir / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "my: corpus.txt"
    assert not list(output_dir.glob("checkpoint-*"))
    assert AutoModelForCausalLM.from_pretrained(output_dir).config.vocab_size == 320


def test_the_main_job_updates_the_balanced_router_biases(tmp_path):
    """DeepSeek-V3 auxiliary-loss-free balancing is registered by the recipe's Trainer (RouterBiasUpdateCallback)."""
    train_in_process(tmp_path / "out", extra_overrides=",router_bias_update_rate=0.01")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    biases = [layer.mlp.gate.e_score_correction_bias for layer in model.model.layers]
    assert len(biases) == 4 and any(bias.abs().sum() > 0 for bias in biases)  # without the callback: all zero


@pytest.mark.parametrize("failing", ["plot_loss_curves", "render_model_card"])
def test_a_failing_card_or_plot_never_loses_the_model(tmp_path, monkeypatch, caplog, failing):
    def explode(*args, **kwargs):
        raise RuntimeError(f"{failing} failed")

    monkeypatch.setattr(sparse_moe, failing, explode)
    output_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match=f"{failing} failed"):
        train_in_process(output_dir)
    assert f"saved, complete, in {output_dir}" in caplog.text  # the error names where the model is
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert type(model).__name__ == "SparseMoeForCausalLM" and model.config.vocab_size == 320
    assert AutoTokenizer.from_pretrained(output_dir).bos_token_id == model.config.bos_token_id
    assert json.loads((output_dir / "results.json").read_text())["train_steps"] == 2
    assert not (output_dir / "README.md").exists()


def test_bad_input_fails_fast_with_one_line_naming_the_option(tmp_path):
    output_dir = tmp_path / "out"
    result = run_train(output_dir, "--block_size", "1")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--block_size must be >= 2" in errors[0] and "Traceback" not in result.stderr
    assert not output_dir.exists()  # nothing was prepared or trained


@pytest.mark.parametrize(
    "options, option",
    [
        (dict(train_file="/no/such/corpus.txt"), "--train_file"),
        (dict(validation_fraction=-0.1), "--validation_fraction"),
        (dict(validation_file="heldout.txt"), "--validation_file requires --train_file"),
        (dict(max_train_files=0), "--max_train_files"),
        (dict(source_dir="/no/such/folder"), "--source_dir"),
    ],
)
def test_bad_corpus_options_name_the_option(options, option):
    values = {**{name: p.default for name, p in inspect.signature(load_corpus).parameters.items()}, **options}
    with pytest.raises(ValueError, match=option):
        check_corpus_options(**values)


RUN_OPTIONS = dict(block_size=32, tokenizer_min_frequency=2, time_budget_minutes=0, sample_prompt="x",
                   sample_max_new_tokens=8)


@pytest.mark.parametrize(
    "overrides, run_options, option",
    [
        ("", dict(block_size=1), "--block_size"),
        ("max_position_embeddings=16", {}, "--block_size 32 exceeds the model's max_position_embeddings"),
        ("vocab_size=100", {}, "vocab_size 100"),
        ("", dict(tokenizer_min_frequency=0), "--tokenizer_min_frequency"),
        ("", dict(sample_prompt=""), "--sample_prompt"),
    ],
)
def test_bad_run_options_name_the_option(tmp_path, overrides, run_options, option):
    config = config_from_preset(SparseMoeConfig, "tiny", overrides or None)
    with pytest.raises(ValueError, match=option):
        check_train_options(config, tiny_training_args(tmp_path / "out"), **{**RUN_OPTIONS, **run_options})


@pytest.mark.parametrize("overrides, option", [("num_key_value_heads=3", "num_key_value_heads"),
                                               ("router_top_p=1.5", "router_top_p"),
                                               ("not_a_field=1", "--config_overrides")])
def test_bad_model_overrides_name_the_field(overrides, option):
    with pytest.raises(ValueError, match=option):
        config_from_preset(SparseMoeConfig, "tiny", overrides)


def test_resume_without_checkpoint_and_a_foreign_output_dir_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--resume_from_checkpoint True: no complete checkpoint"):
        check_train_options(tiny_config(), tiny_training_args(tmp_path / "empty", resume_from_checkpoint="True"),
                            **RUN_OPTIONS)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--output_dir .* is not empty"):
        check_train_options(tiny_config(), tiny_training_args(tmp_path), **RUN_OPTIONS)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_help_explains_options_and_shows_the_library_defaults():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "train.py"), "--help"],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    for option in ("--preset", "--config_overrides", "--train_file", "--block_size", "--validation_fraction",
                   "--resume_from_checkpoint", "--max_steps", "--help_all"):
        assert option in text, option
    assert "output_dir=outputs/sparse_moe" in text  # the script's TrainingArguments defaults are shown
    assert "(default: tiny)" in text and "tiny" in SparseMoeConfig.presets()
    # The corpus options' defaults are load_corpus's (what heldout_texts falls back to): they must not drift apart.
    entries = {" ".join(entry.split()).split(" ", 1)[0]: " ".join(entry.split())
               for entry in result.stdout.split("options:", 1)[1].split("\n  --")}
    for name, parameter in inspect.signature(load_corpus).parameters.items():
        expected = "None" if parameter.default is None else str(parameter.default)
        assert f"(default: {expected})" in entries[name], (name, entries.get(name))


def test_heldout_texts_falls_back_to_the_main_jobs_split_through_the_library(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"data": {"eval_files": "not a list"}}))
    texts, source = heldout_texts(tmp_path, max_files=2)
    assert texts == load_corpus(max_eval_files=2).eval_texts and len(texts) == 2
    assert "the main job's default held-out split" in source
    assert "scripts" not in sys.modules and "scripts.train" not in sys.modules


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

