"""Passkey retrieval and long context: the task (lightarch.data.passkey), the training recipe
(lightarch.training.passkey), the evaluation (lightarch.evaluation.passkey) and the prefill benchmark
(lightarch.evaluation.benchmarks.long_context) on micro configs. The three scripts run end to end in subprocesses, as a
user runs them (train -> eval, the benchmark, a bad option, --help); everything else calls the library."""

import ast
import json
import logging
import random
import shutil
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from conftest import PNG_MAGIC, PROJECT_ROOT, run_script
from lightarch import SparseMoeConfig, SparseMoeForCausalLM
from lightarch.data.passkey import (
    FILLER_SENTENCES,
    NUM_DIGITS,
    CurriculumDataset,
    PasskeyCurriculum,
    PasskeyTask,
    build_tokenizer,
    collate_whole_batch,
    passkey_from_text,
)
from lightarch.evaluation.benchmarks.long_context import (
    parse_overrides,
    run_benchmark,
    run_in_subprocess,
    skip_reason,
    variant_names,
)
from lightarch.evaluation.benchmarks.long_context_report import rerender, write_results
from lightarch.evaluation.passkey import (
    CARD_MARKERS,
    evaluate_passkey_folder,
    merge_result_folders,
    parse_depths,
    parse_lengths,
    save_results,
    score,
    update_model_card,
    verdict,
)
from lightarch.training import passkey as passkey_recipe
from lightarch.training.cli import config_from_preset
from lightarch.training.passkey import check_passkey_run, position_encoding_summary, train_passkey

TINY_BENCH_OVERRIDES = ("hidden_size=32,intermediate_size=64,moe_intermediate_size=16,num_attention_heads=2,"
                        "num_key_value_heads=1,vocab_size=128,sliding_window=32,prefill_chunk_size=128,"
                        "num_hidden_layers=3,num_experts=4,max_experts_per_token=2")
# The `passkey` preset shrunk to a 2-layer micro model: rotary sliding layer + NoPE global layer, as the preset.
MICRO_PASSKEY = ('hidden_size=32,intermediate_size=64,num_hidden_layers=2,layer_types=["sliding_attention",'
                 '"full_attention"],no_rope_layers=[1,0],num_attention_heads=2,num_key_value_heads=1,sliding_window=16,'
                 'num_experts=2,num_experts_per_tok=1,max_experts_per_token=1,moe_intermediate_size=16,'
                 'prefill_chunk_size=64')
MICRO_CURRICULUM = PasskeyCurriculum(min_length=80, max_length=112, tokens_per_batch=256)


def micro_training_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(use_cpu=True, max_steps=3, per_device_train_batch_size=1, learning_rate=2e-3, warmup_steps=0,
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(output_dir=str(output_dir), **{**values, **overrides})


@pytest.fixture(scope="module")
def task():
    return PasskeyTask(build_tokenizer())


# --------------------------------------------------------------------------------------------------- passkey task


def test_tokenizer_one_token_per_digit_and_word(task):
    tokenizer = task.tokenizer
    ids = tokenizer("The pass key is 71432.", add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["The", "pass", "key", "is", "7", "1", "4", "3", "2", "."]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer("Here we go.")["input_ids"][0] == tokenizer.bos_token_id  # <bos> prepended


@pytest.mark.parametrize("length", [90, 128, 257, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_prompt_has_exact_length_and_key_at_depth(task, length, depth):
    prompt = task.build(length, depth, rng=random.Random(length))
    assert len(prompt.input_ids) == length
    assert prompt.input_ids[-len(task.question_ids):] == task.question_ids
    # the key line is where the prompt says, with the passkey digits in it, twice
    key_line = task.key_line_ids(prompt.passkey)
    assert prompt.input_ids[prompt.key_start:prompt.key_end] == key_line
    assert prompt.answer_ids == [task.digit_ids[int(d)] for d in prompt.passkey]
    text = task.tokenizer.decode(prompt.input_ids[prompt.key_start:prompt.key_end]).replace(" ", "")
    assert text.count(prompt.passkey) == 2
    # depth: fraction of the filler before the key, within half of the longest sentence of the request
    filler_start = len(task.bos_ids) + len(task.intro_ids)
    filler_total = length - task.min_length
    before = prompt.key_start - filler_start
    assert prompt.depth == pytest.approx(before / filler_total)
    longest_sentence = max(map(len, task.sentence_ids))
    assert abs(before - depth * filler_total) <= longest_sentence / 2 + 1e-9
    if depth == 0.0:
        assert prompt.key_start == filler_start
    if depth == 1.0:
        assert prompt.key_end == length - len(task.question_ids)


def test_prompt_validation_and_determinism(task):
    with pytest.raises(ValueError, match="at least"):
        task.build(task.min_length - 1, 0.5)
    with pytest.raises(ValueError, match="depth"):
        task.build(200, 1.5)
    first = task.build(300, 0.3, rng=random.Random(7))
    again = task.build(300, 0.3, rng=random.Random(7))
    other = task.build(300, 0.3, rng=random.Random(8))
    assert first == again and first.passkey != other.passkey
    assert len(first.passkey) == NUM_DIGITS
    # the minimal prompt has no filler at all
    assert len(task.build(task.min_length, 0.5, passkey="12345").input_ids) == task.min_length
    # filler cycles through the sentences
    text = task.tokenizer.decode(task.build(400, 0.5, passkey="12345").input_ids)
    for sentence in FILLER_SENTENCES:
        assert sentence.rstrip(".") in text


@pytest.mark.parametrize("length", [120, 400])
def test_distractors_are_other_numbers_at_sentence_boundaries(task, length):
    """Distractor prompts keep the exact length and the key line; the other numbers sit between whole filler
    sentences, differ from the key, and without distractors a prompt is what it always was."""
    prompt = task.build(length, 0.5, rng=random.Random(3), distractors=3)
    assert len(prompt.input_ids) == length
    assert prompt.input_ids[prompt.key_start:prompt.key_end] == task.key_line_ids(prompt.passkey)
    words = task.tokenizer.decode(prompt.input_ids).split(" ")
    numbers = ["".join(words[i + 1 : i + 1 + NUM_DIGITS]) for i, word in enumerate(words[:-1])
               if word == "is" and words[i + 1].isdigit()]
    assert numbers.count(prompt.passkey) == 1 and len(numbers) == 4  # "pass key is K" + 3 distractors
    assert all(len(n) == NUM_DIGITS and n != prompt.passkey for n in numbers if n != prompt.passkey)
    # removing the distractor sentences leaves intro, whole filler sentences, key line and question
    text = task.tokenizer.decode(prompt.input_ids)
    for number in numbers:
        if number != prompt.passkey:
            spaced = " ".join(number)
            assert any(f"The {w} is {spaced} ." in text for w in ("sky", "grass", "sun"))
    assert task.build(300, 0.3, rng=random.Random(7), distractors=0) == task.build(300, 0.3, rng=random.Random(7))
    with pytest.raises(ValueError, match="distractors do not fit"):
        task.build(task.min_length + 5, 0.5, distractors=2)
    with pytest.raises(ValueError, match="distractors must be >= 0"):
        task.build(300, 0.5, distractors=-1)


def test_training_example_labels_only_answer_and_echo(task):
    example = task.training_example(150, random.Random(0), label_key_echo=True)
    assert len(example["input_ids"]) == len(example["labels"]) == 150
    labelled = [(i, label) for i, label in enumerate(example["labels"]) if label != -100]
    assert len(labelled) == 2 * NUM_DIGITS
    assert all(example["input_ids"][i] == label and label in task.digit_ids for i, label in labelled)
    assert [i for i, _ in labelled][-NUM_DIGITS:] == list(range(150 - NUM_DIGITS, 150))  # the answer at the end
    without_echo = task.training_example(150, random.Random(0), label_key_echo=False)
    assert sum(label != -100 for label in without_echo["labels"]) == NUM_DIGITS


def test_training_examples_with_distractors_label_the_key_not_the_other_numbers(task):
    """Up to N other numbers per example, as many as fit (none in the shortest prompts); the labels stay on the key's
    echo and the answer, which is the key."""
    rng = random.Random(0)
    counts = []
    for length in (96, 160, 256):
        for _ in range(20):
            example = task.training_example(length, rng, label_key_echo=True, distractors=4)
            assert len(example["input_ids"]) == length
            digits = sum(token in task.digit_ids for token in example["input_ids"])
            counts.append((length, (digits - 3 * NUM_DIGITS) // NUM_DIGITS))  # key twice + answer, then distractors
            labelled = [label for label in example["labels"] if label != -100]
            assert labelled[:NUM_DIGITS] == labelled[NUM_DIGITS:] == example["input_ids"][-NUM_DIGITS:]
    assert all(0 <= n <= 4 for _, n in counts) and max(n for _, n in counts) == 4
    room_at_96 = (96 - NUM_DIGITS - task.min_length) // 9  # each distractor line is 9 tokens
    assert all(n <= room_at_96 for length, n in counts if length == 96)


def test_training_example_edge_depths(task):
    """edge_depth_fraction=1 puts every key at depth 0.0 (right after the introduction) or 1.0 (right before the
    question), both ends drawn; 0 keeps them strictly inside for nearly all examples of a long prompt."""
    rng = random.Random(0)
    key_line = task.key_line_length
    after_intro = len(task.bos_ids) + len(task.intro_ids)

    def key_start(example):  # the key line: the first digit token's position minus the key line prefix
        first_digit = next(i for i, t in enumerate(example["input_ids"]) if t in task.digit_ids)
        return first_digit - len(task.key_parts[0])

    edges = [key_start(task.training_example(400, rng, edge_depth_fraction=1.0)) for _ in range(40)]
    before_question = 400 - NUM_DIGITS - len(task.question_ids) - key_line
    assert set(edges) == {after_intro, before_question}
    inside = [key_start(task.training_example(400, rng, edge_depth_fraction=0.0)) for _ in range(40)]
    assert sum(start in (after_intro, before_question) for start in inside) <= 2


def test_scoring(task):
    assert score("71432", "71432") == {"exact": 1.0, "digits": 1.0}
    assert score("71433", "71432") == {"exact": 0.0, "digits": 0.8}
    assert score("7143", "71432")["exact"] == 0.0
    assert score("714321", "71432")["exact"] == 0.0  # an extra digit is not an exact match
    assert score("", "71432") == {"exact": 0.0, "digits": 0.0}
    assert passkey_from_text(" 7 1 4 3 2 . Remember it") == "71432"
    assert passkey_from_text("The 71432") == ""
    ids = [task.digit_ids[7], task.digit_ids[1], task.tokenizer.convert_tokens_to_ids("."), task.digit_ids[3]]
    assert task.passkey_from_ids(ids) == "71?3"
    assert task.passkey_from_ids(torch.tensor([task.digit_ids[d] for d in (7, 1, 4, 3, 2, 9)])) == "71432"


# ------------------------------------------------------------------------------------------ the training recipe


def test_passkey_preset_is_the_readme_model(task):
    """993K parameters, three rotary sliding layers with a 32-token window, one global NoPE layer with temperature
    tuning (floor_scale 128), over the passkey tokenizer's vocabulary: what train_passkey trains by default."""
    config = SparseMoeConfig.from_preset("passkey")
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert config.no_rope_layers == [1, 1, 0, 1] and config.sliding_window == 32
    assert config.attn_temperature_tuning and config.floor_scale == 128 and config.attn_scale == 0.1
    assert (config.router_mode, config.num_experts, config.num_experts_per_tok) == ("top_k", 4, 2)
    assert config.vocab_size == len(task.tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        task.tokenizer.pad_token_id, task.tokenizer.bos_token_id, task.tokenizer.eos_token_id)
    assert sum(p.numel() for p in SparseMoeForCausalLM(config).parameters()) == 993_408
    check_passkey_run(config, micro_training_args("unused"), PasskeyCurriculum())  # the default run is valid
    assert position_encoding_summary(config) == (
        "rotary (base 10000.0) on the sliding layers, none (NoPE) on the global layers; Llama 4 attention "
        "temperature tuning on NoPE layers (floor_scale 128, attn_scale 0.1)")


def test_script_defaults_are_the_library_defaults():
    """scripts/train_passkey.py repeats the curriculum defaults for its --help (it must not import lightarch to
    answer it): they must be PasskeyCurriculum's. Read from the script's source, not by importing it."""
    tree = ast.parse((PROJECT_ROOT / "scripts" / "train_passkey.py").read_text())
    arguments = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "PasskeyArguments")
    defaults = {}
    for statement in arguments.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.value, ast.Call):
            default = next(k.value for k in statement.value.keywords if k.arg == "default")
            defaults[statement.target.id] = ast.literal_eval(default)
    assert defaults["preset"] == "passkey"
    assert {k: defaults[k] for k in asdict(PasskeyCurriculum())} == asdict(PasskeyCurriculum())


def test_curriculum_grows_lengths_and_keeps_tokens_per_batch(task):
    curriculum = PasskeyCurriculum(min_length=96, max_length=1024, curriculum_fraction=0.5, tokens_per_batch=2048)
    dataset = CurriculumDataset(task, curriculum, total_batches=100, seed=0)
    assert dataset.length_cap(0) == 96 and dataset.length_cap(50) == 1024 and dataset.length_cap(99) == 1024
    assert dataset.length_cap(25) == 96 + (1024 - 96) // 2
    batch = collate_whole_batch([next(iter(dataset))])
    assert batch["input_ids"].shape == batch["labels"].shape
    length = batch["input_ids"].shape[1]
    assert length % 16 == 0 and 96 <= length <= 1024
    assert batch["input_ids"].shape[0] == 2048 // length
    with pytest.raises(ValueError, match="per_device_train_batch_size must be 1"):
        collate_whole_batch([batch, batch])


def test_bad_runs_are_refused_naming_the_option(task, tmp_path):
    config, args = SparseMoeConfig.from_preset("passkey"), micro_training_args(tmp_path)
    with pytest.raises(ValueError, match="--min_length must be >= 68"):
        check_passkey_run(config, args, PasskeyCurriculum(min_length=20))
    for bad, message in ((dict(max_length=90), "--max_length"), (dict(curriculum_fraction=0), "--curriculum_fraction"),
                         (dict(edge_depth_fraction=1.5), "--edge_depth_fraction"),
                         (dict(distractors=-1), "--distractors")):
        with pytest.raises(ValueError, match=message):
            PasskeyCurriculum(**bad)
    with pytest.raises(ValueError, match="--per_device_train_batch_size must be 1"):
        check_passkey_run(config, micro_training_args(tmp_path, per_device_train_batch_size=4), PasskeyCurriculum())
    with pytest.raises(ValueError, match="--max_steps must be positive"):
        check_passkey_run(config, micro_training_args(tmp_path, max_steps=-1), PasskeyCurriculum())
    with pytest.raises(ValueError, match="--eval_samples"):
        check_passkey_run(config, args, PasskeyCurriculum(), eval_samples=0)
    # the preset's vocabulary and special tokens are the tokenizer's; an override that breaks them is refused
    with pytest.raises(ValueError, match="vocab_size=40: the passkey tokenizer has 56 tokens"):
        check_passkey_run(config_from_preset(SparseMoeConfig, "passkey", "vocab_size=40"), args, PasskeyCurriculum())
    with pytest.raises(ValueError, match="bos_token_id=5"):
        check_passkey_run(config_from_preset(SparseMoeConfig, "passkey", "bos_token_id=5"), args, PasskeyCurriculum())


def test_position_encoding_from_overrides():
    config = config_from_preset(SparseMoeConfig, "passkey", "no_rope_layers=null,floor_scale=64,attn_scale=0.2")
    assert config.no_rope_layers is None and config.floor_scale == 64 and config.attn_scale == 0.2
    assert position_encoding_summary(config) == (
        "rotary (base 10000.0) on the sliding layers, rotary (base 10000.0) on the global layers")
    # a JSON list value keeps its commas
    config = config_from_preset(SparseMoeConfig, "passkey", 'num_hidden_layers=2,layer_types=["sliding_attention",'
                                                            '"full_attention"],no_rope_layers=[0,1],attn_scale=0.5')
    assert config.no_rope_layers == [0, 1] and config.attn_scale == 0.5
    assert position_encoding_summary(config).startswith("none (NoPE) on the sliding layers, rotary (base 10000.0) "
                                                        "on the global layers; Llama 4")


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("passkey") / "model"
    config = config_from_preset(SparseMoeConfig, "passkey", MICRO_PASSKEY)
    results = train_passkey(config, micro_training_args(output_dir), MICRO_CURRICULUM, eval_samples=1)
    return output_dir, results


def test_train_passkey_writes_a_loadable_folder(trained_folder, task):
    output_dir, results = trained_folder
    assert results["train_steps"] == 3 and results["train_time_seconds"] > 0 and not results["stopped_by_time_budget"]
    assert 0.0 <= results["accuracy_at_max_length"] <= 1.0 and results["eval_prompts_at_max_length"] == 5
    for name in ("config.json", "model.safetensors", "tokenizer.json", "results.json", "README.md", "training.png"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "training.png").read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["train_steps"] == 3 and saved["data"] == asdict(MICRO_CURRICULUM)
    card = (output_dir / "README.md").read_text()
    assert "${" not in card and "| 112 |" in card
    assert not list(output_dir.parent.glob(".*tmp*"))  # the atomic save left nothing behind
    assert "none (NoPE) on the global layers" in card and "Not measured yet" in card

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.no_rope_layers == [1, 0]
    assert model.config.prefill_chunk_size == 64 and model.config.attn_temperature_tuning  # the rest from the preset
    assert tokenizer.get_vocab() == task.tokenizer.get_vocab()
    prompt = PasskeyTask(tokenizer).build(100, 0.5, passkey="12345")
    assert prompt.input_ids == task.build(100, 0.5, passkey="12345").input_ids


def test_train_passkey_saves_the_model_before_the_card(tmp_path, monkeypatch, caplog):
    """A failing model card loses nothing: model, tokenizer and results.json are saved first, and the error names
    the folder. (The time budget, here already spent after one step, stops training but still saves.)"""

    def broken_card(results, config):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(passkey_recipe, "render_card", broken_card)
    output_dir = tmp_path / "model"
    config = config_from_preset(SparseMoeConfig, "passkey", MICRO_PASSKEY)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="template exploded"):
        train_passkey(config, micro_training_args(output_dir), MICRO_CURRICULUM, eval_samples=1,
                      time_budget_minutes=1e-9)
    assert str(output_dir) in caplog.text
    results = json.loads((output_dir / "results.json").read_text())
    assert results["stopped_by_time_budget"] and results["train_steps"] == 1
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert model.config.no_rope_layers == [1, 0]
    assert not (output_dir / "README.md").exists()


# ------------------------------------------------------------------------------------------------- the evaluation


def test_evaluate_saved_model_table_heatmap_and_card(trained_folder, tmp_path):
    output_dir, _ = trained_folder
    results = evaluate_passkey_folder(output_dir, [96, 160], [0.0, 0.5, 1.0], 2, show_progress=False)
    save_results(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["lengths"] == [96, 160] and saved["depths"] == [0.0, 0.5, 1.0]
    assert saved["train_length"] == 112  # read from the model folder
    cells = saved["evaluation"]["cells"]
    assert set(cells) == {"96", "160"} and all(set(row) == {"0.0", "0.5", "1.0"} for row in cells.values())
    for row in cells.values():
        for cell in row.values():
            assert cell["count"] == 2 and 0.0 <= cell["exact"] <= cell["digits"] <= 1.0
            assert all(len(p["predicted"]) == 5 and len(p["passkey"]) == 5 for p in cell["predictions"])
    table = (tmp_path / "results.md").read_text()
    assert "| 96 (train) |" in table and "| 160 |" in table and saved["verdict"] in table
    assert saved["verdict"].startswith("trained at <= 112 tokens")
    assert (tmp_path / "heatmap.png").read_bytes().startswith(PNG_MAGIC)

    # the default output folder is inside the model folder, and the table goes into the model card, between its
    # markers, replacing what was there (twice: same card)
    copy = tmp_path / "copy"
    shutil.copytree(output_dir, copy)
    results["model"] = str(copy)
    save_results(results)
    assert (copy / "long_context_eval" / "results.json").is_file()
    card = (copy / "README.md").read_text()
    assert "Not measured yet" not in card and "| 96 (train) |" in card and saved["verdict"] in card
    assert card.count(CARD_MARKERS[0]) == 1 and "## Use" in card and "--lengths 96,160 --samples 2" in card
    assert update_model_card(copy, results)
    assert (copy / "README.md").read_text() == card
    assert not update_model_card(tmp_path, results)  # no card there: nothing written

    with pytest.raises(ValueError, match="shorter than the shortest passkey prompt"):
        evaluate_passkey_folder(output_dir, [50], [0.5], 1, show_progress=False)
    with pytest.raises(ValueError, match="--model .*no saved model"):
        evaluate_passkey_folder(tmp_path / "nothing", [96], [0.5], 1, show_progress=False)
    with pytest.raises(ValueError, match="--samples"):
        evaluate_passkey_folder(output_dir, [96], [0.5], 0, show_progress=False)


def test_shards_of_a_grid_merge_into_one_table(trained_folder, tmp_path):
    output_dir, _ = trained_folder
    first = evaluate_passkey_folder(output_dir, [96, 160], [0.0, 1.0], 1, show_progress=False)
    shard = evaluate_passkey_folder(output_dir, [128], [0.0, 1.0], 1, show_progress=False)
    save_results(first, tmp_path / "first")
    save_results(shard, tmp_path / "shard")
    merged = merge_result_folders([tmp_path / "first", tmp_path / "shard" / "results.json"])
    assert merged["lengths"] == [96, 128, 160] and merged["merged_from"] == 2
    assert merged["evaluation"]["cells"]["128"] == shard["evaluation"]["cells"]["128"]
    assert merged["evaluation"]["overall"]["96"] == first["evaluation"]["overall"]["96"]
    save_results(merged, tmp_path / "merged")
    assert "| 128 |" in (tmp_path / "merged" / "results.md").read_text()
    # a cell measured twice pools its prompts
    pooled = merge_result_folders([tmp_path / "first", tmp_path / "first"])
    assert pooled["evaluation"]["cells"]["96"]["0.0"]["count"] == 2 and pooled["arguments"]["samples"] == 2

    distracted = evaluate_passkey_folder(output_dir, [128], [0.0, 1.0], 1, distractors=2, show_progress=False)
    save_results(distracted, tmp_path / "distracted")
    assert "2 other 5-digit numbers in each filler" in (tmp_path / "distracted" / "results.md").read_text()
    with pytest.raises(ValueError, match="different --distractors"):
        merge_result_folders([tmp_path / "first", tmp_path / "distracted"])
    hole = json.loads(json.dumps(first))
    hole["lengths"], hole["evaluation"]["cells"] = [160], {"160": {"0.0": first["evaluation"]["cells"]["160"]["0.0"]}}
    (tmp_path / "hole").mkdir()
    (tmp_path / "hole" / "results.json").write_text(json.dumps(hole))
    with pytest.raises(ValueError, match="do not cover the grid"):
        merge_result_folders([tmp_path / "shard", tmp_path / "hole"])
    with pytest.raises(ValueError, match="--merge: no results.json"):
        merge_result_folders([tmp_path / "nothing"])


def test_lengths_and_depths_options():
    assert parse_lengths("1K,512,200000,1K") == [512, 1024, 200000]
    assert parse_depths("1,0,0.5") == [0.0, 0.5, 1.0]
    for bad in ("", "0", "1K,x"):
        with pytest.raises(ValueError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("", "1.5", "a"):
        with pytest.raises(ValueError, match="--depths"):
            parse_depths(bad)


def test_verdict_sentence():
    overall = {"1024": {"exact": 1.0}, "2048": {"exact": 0.95}, "4096": {"exact": 0.4}, "8192": {"exact": 0.0}}
    text = verdict(overall, [1024, 2048, 4096, 8192], 1024, 0.9)
    assert text == ("trained at <= 1024 tokens; accuracy >= 90% up to 2048 tokens (2x the training length), falls "
                    "to 40% at 4096 and 0% at 8192.")
    weak = {"1024": {"exact": 0.64}, "2048": {"exact": 0.6}, "4096": {"exact": 0.24}, "32768": {"exact": 0.08}}
    assert verdict(weak, [1024, 2048, 4096, 32768], 1024, 0.9) == (
        "trained at <= 1024 tokens; accuracy 64% at 1024 tokens (below 90% already there), within 15 points of that "
        "up to 2048 tokens, falls to 24% at 4096 and 8% at 32768.")
    perfect = {"1024": {"exact": 1.0}, "32768": {"exact": 1.0}}
    assert verdict(perfect, [1024, 32768], 256, 0.9) == (
        "trained at <= 256 tokens; accuracy >= 90% up to 32768 tokens, the longest length evaluated (128x the "
        "training length).")


# --------------------------------------------------------------------------------------------------- benchmark


def test_bench_long_context_tiny(tmp_path):
    overrides = parse_overrides(TINY_BENCH_OVERRIDES)
    results = run_benchmark([512, 256], variant_names(["hybrid", "dense", "streaming"]), overrides,
                            isolation="inprocess", repeats=1, num_threads=1, end_to_end_length=300,
                            end_to_end_new_tokens=3, output_dir=tmp_path)
    text = write_results(tmp_path, results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and saved["complete"]
    expected = {"hybrid/windowed", "hybrid/mask", "hybrid/full", "dense/windowed", "dense/mask", "dense/mistral",
                "streaming/windowed"}
    assert set(saved["prefill"]) == expected
    for name, rows in saved["prefill"].items():
        assert set(rows) == {"256", "512"}, name
        for row in rows.values():
            assert row["status"] == "ok", (name, row)
            assert row["seconds"] > 0 and row["cpu_seconds"] >= 0 and row["peak_rss_mb"] > 0
            assert row["rss_increase_mb"] >= 0 and row["tokens_per_s"] > 0
    # implementations of the same function agree before anything is timed
    assert set(saved["equivalence_max_abs_logit_diff"]) == {"hybrid/mask", "dense/mask", "dense/mistral"}
    assert all(v < 1e-3 for v in saved["equivalence_max_abs_logit_diff"].values())
    # streaming: the cache holds sinks + window per layer, whatever n
    streaming = saved["prefill"]["streaming/windowed"]
    assert streaming["256"]["cached_tokens"] == streaming["512"]["cached_tokens"] == 3 * (4 + 32 - 1)
    # the hybrid's global layer keeps every token, its sliding layers keep window - 1
    assert saved["prefill"]["hybrid/windowed"]["512"]["cached_tokens"] == 512 + 2 * 31
    e2e = saved["end_to_end_generate"]
    assert e2e["status"] == "ok" and e2e["generated_tokens"] == 3 and e2e["seconds"] > 0
    assert e2e["decode_tokens_per_s"] > 0
    md = (tmp_path / "results.md").read_text()
    assert md == text
    for name in expected:
        assert name in md
    assert "| 256 |" in md and "| 512 |" in md and "## Targets" in md and "limits 600 s" in md
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)
    assert rerender(tmp_path) == md  # --render_only: the same report from results.json


def test_bench_options_are_checked():
    assert variant_names(["dense"], ["dense/mask"]) == ["dense/mask"]
    with pytest.raises(ValueError, match="--families: unknown 'sparse'"):
        variant_names(["sparse"])
    with pytest.raises(ValueError, match="--variants: unknown"):
        variant_names(["dense"], ["hybrid/full"])
    with pytest.raises(ValueError, match="--config_overrides: SparseMoeConfig has no field 'hiden_size'"):
        parse_overrides("hiden_size=32")
    with pytest.raises(ValueError, match="--isolation"):
        run_benchmark([256], ["dense/windowed"], isolation="thread")


def test_bench_single_measurement_in_a_fresh_process():
    """The subprocess isolation: one real child process reports its own peak RSS, and is killed at the limit."""
    spec = {"family": "dense", "variant": "windowed", "n": 128, "kind": "prefill", "new_tokens": 0, "seed": 0,
            "num_threads": 1, "overrides": parse_overrides(TINY_BENCH_OVERRIDES)}
    result = run_in_subprocess(spec, max_seconds=120, max_memory_mb=8000)
    assert result["status"] == "ok", result
    assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 50 and result["seconds"] > 0
    killed = run_in_subprocess(dict(spec, n=4096), max_seconds=120, max_memory_mb=1)
    assert killed["status"] == "OOM" and "killed" in killed["detail"]


def test_bench_skip_logic():
    ok = {"status": "ok", "seconds": 10.0, "rss_increase_mb": 100.0, "baseline_rss_mb": 500.0}
    quadratic = [(1000, dict(ok, seconds=1.0)), (2000, dict(ok, seconds=4.0))]
    assert skip_reason(quadratic, 4000, 100, 10_000) is None  # predicted 16 s
    assert skip_reason(quadratic, 16000, 100, 10_000).startswith("skipped (predicted 256 s")
    assert skip_reason(quadratic, 16000, 100, 10_000, predictive=False) is None
    assert skip_reason([(1000, {"status": "OOM"})], 2000, 100, 10_000) == "skipped (OOM at n=1000)"
    memory = [(1000, dict(ok, seconds=0.1)), (2000, dict(ok, seconds=0.2, rss_increase_mb=400.0))]
    assert "MB" in skip_reason(memory, 8000, 100, 2000)


# ------------------------------------------------------------------------------------ the scripts, as a user runs them


def test_train_then_eval_scripts_end_to_end(tmp_path):
    model_dir = tmp_path / "model"
    train = run_script("train_passkey", "--config_overrides", MICRO_PASSKEY, "--min_length", "80", "--max_length",
                       "112", "--tokens_per_batch", "256", "--max_steps", "2", "--warmup_steps", "0",
                       "--eval_samples", "1", "--num_threads", "1", "--output_dir", str(model_dir))
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["train_steps"] == 2 and results["torch_num_threads"] == 1
    assert results["training_arguments"]["learning_rate"] == 2e-3  # the script's TrainingArguments defaults
    assert (model_dir / "README.md").is_file() and (model_dir / "training.png").is_file()

    evaluation = run_script("eval_long_context", "--model", str(model_dir), "--lengths", "96,128", "--depths", "0,1",
                            "--samples", "1", "--num_threads", "1")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "| 96 (train) |" in evaluation.stdout
    assert json.loads((model_dir / "long_context_eval" / "results.json").read_text())["lengths"] == [96, 128]
    assert "| 128 |" in (model_dir / "README.md").read_text()  # the default run fills the card

    merged = run_script("eval_long_context", "--merge", f"{model_dir / 'long_context_eval'},{tmp_path / 'none'}")
    assert merged.returncode == 2 and "--merge: no results.json" in merged.stderr


def test_train_passkey_bad_option_is_one_line_naming_it(tmp_path):
    result = run_script("train_passkey", "--min_length", "20", "--output_dir", str(tmp_path))
    assert result.returncode == 2
    assert "error: --min_length must be >= 68" in result.stderr and "Traceback" not in result.stderr


def test_bench_script_end_to_end(tmp_path):
    result = run_script("bench_long_context", "--lengths", "256", "--families", "streaming", "--config_overrides",
                        TINY_BENCH_OVERRIDES, "--isolation", "inprocess", "--repeats", "1", "--num_threads", "1",
                        "--generate_length", "0", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 256 |" in result.stdout and (tmp_path / "results.png").is_file()
    assert set(json.loads((tmp_path / "results.json").read_text())["prefill"]) == {"streaming/windowed"}


@pytest.mark.parametrize("script", ["bench_long_context", "train_passkey", "eval_long_context"])
def test_help_documents_every_option(script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--output_dir" in result.stdout and "--num_threads" in result.stdout
    assert "python scripts/" in result.stdout  # the docstring's examples
