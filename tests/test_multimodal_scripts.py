"""The tri-modal data set (lightarch.data.multimodal), the training recipe (lightarch.training.multimodal), the
evaluation of saved runs, and both scripts (train_multimodal, eval_multimodal) end to end as subprocesses.

Never needs the apt packages: Fashion-MNIST is replaced by tiny generated IDX files, espeak-ng by a fake executable
that writes a WAV the way espeak-ng does (streaming header), and the end-to-end run uses `--dataset synthetic`.
"""

import gzip
import json
import math
import os
import re
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PNG_MAGIC, PROJECT_ROOT, run_script
from lightarch.data.multimodal import (
    CLASS_NAMES,
    FASHION_MNIST_FILES,
    FOOTWEAR,
    HELDOUT_VOICES,
    INSTALL_COMMAND,
    QUESTION_KINDS,
    TRAIN_VOICES,
    WORN_ON,
    MissingDataError,
    Voice,
    alignment_examples,
    check_espeak,
    check_fashion_mnist,
    class_texts,
    fashion_mnist_pools,
    generate_questions,
    load_fashion_mnist,
    parse_wav,
    read_idx,
    speak,
    split_words,
    synthetic_pools,
    vocabulary,
    write_idx,
)
from lightarch.evaluation.multimodal import (
    answer_accuracy,
    class_similarity_matrix,
    modality_alignment_error,
    recall_at_1,
)

# the README's `-n 2 --dist loadgroup` runs this module on one xdist worker, so its module-scoped training run runs once
pytestmark = pytest.mark.xdist_group("test_multimodal_scripts")


# ------------------------------------------------------------------------------------------------------ fixtures


def fake_fashion_mnist(root: Path, per_class: dict[str, int]) -> Path:
    """IDX files named like the package's; every train pixel is 1 + label, every test pixel 101 + label."""
    root.mkdir(parents=True, exist_ok=True)
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class[split])
        offset = 1 if split == "train" else 101
        images = np.broadcast_to((labels + offset)[:, None, None], (len(labels), 28, 28)).astype(np.uint8)
        write_idx(root / image_file, images)
        write_idx(root / label_file, labels)
    return root


FAKE_ESPEAK = textwrap.dedent('''\
    #!{python}
    """Stands in for espeak-ng: a tone whose frequency encodes the text, with espeak-ng's streaming WAV header."""
    import math, struct, sys, zlib
    args = sys.argv[1:]
    if args == ["--version"]:
        print("fake espeak-ng 0.0"); sys.exit(0)
    with open({calls!r}, "a") as log:
        log.write(" ".join(args) + "\\n")
    text = args[-1]
    frequency = 200 + zlib.crc32(text.encode()) % 800
    rate, n = 22050, 4000
    samples = [int(8000 * math.sin(2 * math.pi * frequency * i / rate)) for i in range(n)]
    header = b"RIFF" + struct.pack("<I", 0x7FFFF024) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
             2 * rate, 2, 16) + b"data" + struct.pack("<I", 0x7FFFF000)
    sys.stdout.buffer.write(header + struct.pack(f"<{{n}}h", *samples))
''')


@pytest.fixture
def fake_espeak(tmp_path) -> tuple[str, Path]:
    calls = tmp_path / "espeak_calls.txt"
    calls.touch()
    path = tmp_path / "bin" / "espeak-ng"
    path.parent.mkdir()
    path.write_text(FAKE_ESPEAK.format(python=sys.executable, calls=str(calls)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path), calls


# -------------------------------------------------------------------------------------------------- IDX parsing


def test_idx_round_trip_plain_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        assert np.array_equal(read_idx(write_idx(tmp_path / name, array)), array)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i.idx", ints)), ints)
    # the header is the MNIST layout: 00 00 08 03, then big-endian sizes
    raw = gzip.decompress((tmp_path / "a.idx.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 8, 3]) and struct.unpack(">3I", raw[4:16]) == (2, 3, 4)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.idx")
    good = write_idx(tmp_path / "t.idx", np.zeros((4, 5), dtype=np.uint8)).read_bytes()
    (tmp_path / "short.idx").write_bytes(good[:-3])
    with pytest.raises(ValueError, match=r"needs 20 data bytes, the file has 17"):
        read_idx(tmp_path / "short.idx")


def test_load_fashion_mnist_from_generated_files(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm", {"train": 3, "test": 2})
    images, labels = load_fashion_mnist("train", root)
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images[:, 0, 0], labels + 1)
    images, labels = load_fashion_mnist("test", root)
    assert images.shape == (20, 28, 28) and np.array_equal(images[:, 5, 5], labels + 101)
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation", root)


# --------------------------------------------------------------------------------------------- missing packages


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(MissingDataError) as error:
        check_fashion_mnist(tmp_path)
    message = str(error.value)
    assert "dataset-fashion-mnist" in message and INSTALL_COMMAND in message
    assert "train-images-idx3-ubyte.gz" in message and "--dataset synthetic" in message
    assert INSTALL_COMMAND == "sudo apt-get install dataset-fashion-mnist espeak-ng"


def test_missing_espeak_names_the_package(tmp_path):
    with pytest.raises(MissingDataError, match="espeak-ng is not installed") as error:
        check_espeak("no-such-espeak-ng-executable")
    assert INSTALL_COMMAND in str(error.value)


def test_missing_both_packages_one_error_listing_both(tmp_path):
    with pytest.raises(MissingDataError) as error:
        fashion_mnist_pools(root=tmp_path, executable="no-such-espeak-ng-executable", cache_dir=tmp_path / "c")
    message = str(error.value)
    assert "Fashion-MNIST is not installed" in message and "espeak-ng is not installed" in message
    assert message.count(INSTALL_COMMAND) == 1


# ------------------------------------------------------------------------------------------------------- speech


def test_parse_wav_reads_espeak_streaming_header():
    samples = np.array([0, 16384, -16384, 32767], dtype="<i2")
    header = (b"RIFF" + struct.pack("<I", 0x7FFFF024) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 22050,
              44100, 2, 16) + b"data" + struct.pack("<I", 0x7FFFF000))  # sizes unknown when writing to a pipe
    waveform, rate = parse_wav(header + samples.tobytes())
    assert rate == 22050 and waveform.dtype == np.float32
    np.testing.assert_allclose(waveform, samples / 32768.0)
    with pytest.raises(ValueError, match="not a WAV"):
        parse_wav(b"OggS" + b"\x00" * 40)


def test_speak_caches_clips_on_disk(tmp_path, fake_espeak):
    executable, calls = fake_espeak
    voice = Voice("en-us", 170, 50)
    first = speak("ankle boot", voice, tmp_path / "cache", executable)
    again = speak("ankle boot", voice, tmp_path / "cache", executable)
    other = speak("sneaker", voice, tmp_path / "cache", executable)
    assert first.dtype == np.float32 and 0 < len(first) <= 4000 and np.abs(first).max() > 0.1
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[:1000], other[:1000])
    logged = calls.read_text().splitlines()
    assert len(logged) == 2  # the second "ankle boot" came from the cache
    assert logged[0].split() == ["-v", "en-us", "-s", "170", "-p", "50", "--stdout", "ankle", "boot"]


def test_real_data_pools_hold_out_test_images_and_voices(tmp_path, fake_espeak):
    executable, calls = fake_espeak
    root = fake_fashion_mnist(tmp_path / "fm", {"train": 6, "test": 3})
    train_voices, eval_voices = [Voice("en-us", 170, 50), Voice("en-gb", 140, 35)], [Voice("en-us-nyc", 170, 50)]
    pools = fashion_mnist_pools(4, 2, train_voices, eval_voices, root=root, cache_dir=tmp_path / "c",
                                executable=executable, show_progress=False)
    train, evaluation = pools["train"], pools["eval"]
    assert np.bincount(train.image_labels).tolist() == [4] * 10 and np.bincount(evaluation.image_labels).tolist() == [2] * 10
    assert set(train.images[:, 0, 0]) <= set(range(1, 11))  # from the train file
    assert set(evaluation.images[:, 0, 0]) <= set(range(101, 111))  # from the test file
    assert len(train.clips) == 20 and len(evaluation.clips) == 10
    assert {v.split()[0] for v in train.clip_voices} == {"en-us", "en-gb"}
    assert {v.split()[0] for v in evaluation.clip_voices} == {"en-us-nyc"}
    assert train.sampling_rate == 22050
    with pytest.raises(ValueError, match="held out"):
        fashion_mnist_pools(4, 2, train_voices, train_voices[:1], root=root, cache_dir=tmp_path / "c",
                            executable=executable)


def test_default_voices_are_disjoint():
    assert not set(TRAIN_VOICES) & set(HELDOUT_VOICES)
    synthetic = synthetic_pools()
    assert not set(synthetic["train"].clip_voices) & set(synthetic["eval"].clip_voices)


# ---------------------------------------------------------------------------------------------------- questions


def test_questions_answers_follow_from_the_labels():
    pool = synthetic_pools(train_images_per_class=5)["train"]
    questions = generate_questions(pool, per_kind=60, seed=3)
    assert [q.kind for q in questions[: len(QUESTION_KINDS)]] == list(QUESTION_KINDS)
    assert len(questions) == 60 * len(QUESTION_KINDS)
    answers_seen: dict[str, set] = {}
    for q in questions:
        template, modalities = QUESTION_KINDS[q.kind]
        assert q.prompt == template and tuple(m for m, _ in q.inputs) == modalities
        assert q.prompt.count("<image>") == len(q.image_indices) and q.prompt.count("<audio>") == len(q.clip_indices)
        images = [int(pool.image_labels[i]) for i in q.image_indices]
        clips = [int(pool.clip_labels[i]) for i in q.clip_indices]
        expected = {
            "what_is_shown": lambda: CLASS_NAMES[images[0]],
            "what_is_said": lambda: CLASS_NAMES[clips[0]],
            "where_worn": lambda: WORN_ON[images[0]],
            "voice_names_shown": lambda: "yes" if images[0] == clips[0] else "no",
            "worn_on_feet": lambda: "first" if images[0] in FOOTWEAR else "second",
        }[q.kind]()
        assert q.answer == expected
        if q.kind == "worn_on_feet":
            assert (images[0] in FOOTWEAR) != (images[1] in FOOTWEAR)  # exactly one is footwear
        answers_seen.setdefault(q.kind, set()).add(q.answer)
    assert answers_seen["voice_names_shown"] == {"yes", "no"} and answers_seen["worn_on_feet"] == {"first", "second"}
    assert len(answers_seen["what_is_shown"]) == 10
    assert generate_questions(pool, 60, seed=3) == questions  # reproducible
    with pytest.raises(ValueError, match="unknown question kinds"):
        generate_questions(pool, 1, 0, kinds=["what_is_smelled"])


def test_alignment_examples_are_same_class_and_balanced():
    pool = synthetic_pools()["train"]
    examples = alignment_examples(pool, 50, seed=0)
    assert np.bincount([e.label for e in examples]).tolist() == [5] * 10
    for e in examples:
        assert pool.image_labels[e.image] == e.label and pool.clip_labels[e.clip] == e.label
        assert e.text in class_texts(e.label)
    words = set(vocabulary())
    assert all(set(split_words(text)) <= words for label in range(10) for text in class_texts(label))
    assert {"ankle", "boot", "t-shirt", "yes", "first", "feet"} <= words and "<image>" not in words


# -------------------------------------------------------------------------------------------------- measurements


def test_retrieval_and_alignment_error_against_oracles():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 4)
    directions = rng.normal(size=(10, 16))
    aligned = {m: (directions[labels] + 0.05 * rng.normal(size=(40, 16)), labels) for m in ("image", "audio", "text")}
    assert recall_at_1(*aligned["image"], *aligned["audio"]) == 1.0
    perfect = modality_alignment_error(aligned)
    assert perfect["error"] == 0.0 and len(perfect["pairs"]) == 6
    unrelated = {m: (rng.normal(size=(400, 16)), np.repeat(np.arange(10), 40)) for m in ("image", "audio")}
    assert 0.75 < modality_alignment_error(unrelated)["error"] < 1.0
    # swap two classes' audio embeddings: exactly 2 of 10 classes misaligned in image->audio and audio->image
    swapped = dict(aligned)
    audio_labels = labels.copy()
    audio_labels[labels == 0], audio_labels[labels == 1] = 1, 0
    swapped["audio"] = (aligned["audio"][0], audio_labels)
    result = modality_alignment_error(swapped)
    assert result["pairs"]["image->audio"] == pytest.approx(0.2) and result["pairs"]["image->text"] == 0.0
    assert recall_at_1(*aligned["image"], *swapped["audio"]) == pytest.approx(0.8)
    matrix = class_similarity_matrix(*aligned["image"], *aligned["text"])
    assert matrix.shape == (10, 10) and np.all(np.diag(matrix) > 0.9)


def test_answer_accuracy_per_kind():
    pool = synthetic_pools()["eval"]
    questions = generate_questions(pool, per_kind=4, seed=0)
    predictions = [q.answer.upper() + " " if q.kind != "what_is_said" else "nothing" for q in questions]
    result = answer_accuracy(questions, predictions)
    assert result["per_kind"]["what_is_said"] == 0.0 and result["per_kind"]["what_is_shown"] == 1.0
    assert result["accuracy"] == pytest.approx(1 - 1 / len(QUESTION_KINDS)) and result["count"] == len(questions)
    with pytest.raises(ValueError, match="predictions"):
        answer_accuracy(questions, predictions[:-1])


# ------------------------------------------------------------------------------------------------------- scripts

MICRO_MODEL = json.dumps({
    "decoder_config": {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2},
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64},
    "audio_config": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64},
})
MICRO_DATA = dict(dataset="synthetic", train_images_per_class=6, eval_images_per_class=3, eval_questions_per_kind=4)
MICRO_TRAINING = dict(max_steps=6, per_device_train_batch_size=8, per_device_eval_batch_size=16, logging_steps=2,
                      save_steps=3, warmup_steps=0, dataloader_num_workers=0, disable_tqdm=True)
MICRO_TRAIN = ["--config_overrides", MICRO_MODEL, "--num_threads", "1"] + [
    f"--{name}={value}" for name, value in {**MICRO_DATA, **MICRO_TRAINING}.items()]


def micro_config(overrides: str = MICRO_MODEL):
    from lightarch import MultiModalConfig
    from lightarch.training.cli import config_from_preset

    return config_from_preset(MultiModalConfig, "trimodal-qa", overrides)


def micro_training_args(output_dir, **overrides):
    """The TrainingArguments scripts/train_multimodal.py builds for MICRO_TRAIN."""
    from transformers import TrainingArguments

    values = dict(use_cpu=True, save_strategy="steps", save_total_limit=1, report_to="none", seed=42,
                  learning_rate=2e-3, lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0,
                  logging_first_step=True, remove_unused_columns=False)
    return TrainingArguments(output_dir=str(output_dir), **{**values, **MICRO_TRAINING, **overrides})


def micro_run(output_dir, ablation: bool = True, **training):
    """The library call the script makes for MICRO_TRAIN (one torch thread, like the script)."""
    from lightarch.data.multimodal import MultiModalData
    from lightarch.training.multimodal import train_multimodal

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_multimodal(micro_config(), micro_training_args(output_dir, **training),
                                MultiModalData(**MICRO_DATA), ablation=ablation)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """scripts/train_multimodal.py end to end: one micro run of both models on the synthetic fixture (seconds)."""
    output_dir = tmp_path_factory.mktemp("mm") / "run"
    result = run_script("train_multimodal", *MICRO_TRAIN, "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, json.loads((output_dir / "results.json").read_text())


def test_trimodal_qa_preset_is_the_training_default_and_fits_the_tokenizer():
    from lightarch import MultiModalConfig
    from lightarch.data.multimodal import build_tokenizer

    config, tokenizer = MultiModalConfig.from_preset("trimodal-qa"), build_tokenizer()
    decoder = config.decoder_config
    assert decoder.vocab_size == len(tokenizer) == 74
    assert (decoder.pad_token_id, decoder.bos_token_id, decoder.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert (config.image_token_id, config.audio_token_id) == tuple(tokenizer.convert_tokens_to_ids(["<image>",
                                                                                                    "<audio>"]))
    assert config.alignment_pairs == ["text_image", "text_audio"] and config.alignment_loss_weight == 1.0
    # otherwise the "tiny" architecture
    tiny = MultiModalConfig.from_preset("tiny")
    assert decoder.num_hidden_layers == tiny.decoder_config.num_hidden_layers == 3
    assert config.vision_config.to_dict() == tiny.vision_config.to_dict()
    assert config.audio_config.to_dict() == tiny.audio_config.to_dict()


def test_help_runs_fast_and_lists_the_options():
    result = run_script("train_multimodal", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--preset", "--config_overrides", "--ablation", "--dataset", "--time_budget_minutes",
                   "--resume_from_checkpoint", "--help_all"):
        assert option in result.stdout, option
    result = run_script("eval_multimodal", "--help")
    assert result.returncode == 0 and "--model_dir" in result.stdout and "--eval_questions_per_kind" in result.stdout


def _check_measurements(heldout: dict) -> None:
    vqa = heldout["vqa"]
    assert 0.0 <= vqa["accuracy"] <= 1.0 and set(vqa["per_kind"]) == set(QUESTION_KINDS)
    assert vqa["count"] == 4 * len(QUESTION_KINDS)
    assert all(0.0 <= v <= 1.0 for v in vqa["per_kind"].values())
    r1 = heldout["retrieval_r_at_1"]
    assert set(r1) == {"image->text", "text->image", "audio->text", "text->audio", "image->audio", "audio->image"}
    assert all(0.0 <= v <= 1.0 for v in r1.values())
    error = heldout["alignment_error"]
    assert 0.0 <= error["error"] <= 1.0 and len(error["pairs"]) == 6


def test_micro_training_writes_both_models(trained):
    output_dir, results = trained
    for name in ("results.json", "results.md", "training.png"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "training.png").read_bytes()[:8] == PNG_MAGIC
    assert results["runs"].keys() == {"aligned", "no_alignment"}
    assert "| VQA accuracy, all kinds |" in (output_dir / "results.md").read_text()
    runs = results["runs"]
    assert runs["aligned"]["alignment_loss_weight"] == 1.0 and runs["no_alignment"]["alignment_loss_weight"] == 0.0
    assert runs["aligned"]["alignment_pairs_trained"] == ["text_image", "text_audio"]
    assert runs["aligned"]["train_steps"] == runs["no_alignment"]["train_steps"] == 6
    assert results["vqa_accuracy_gain"] == pytest.approx(
        runs["aligned"]["heldout"]["vqa"]["accuracy"] - runs["no_alignment"]["heldout"]["vqa"]["accuracy"])
    for variant in ("aligned", "no_alignment"):
        folder = output_dir / variant
        for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                     "modeling_multimodal.py", "processing_multimodal.py", "README.md", "results.json",
                     "training.png"):
            assert (folder / name).is_file(), f"{variant}/{name}"
        card = (folder / "README.md").read_text()
        assert "${" not in card and "## Results (held-out images and voices)" in card
        saved = json.loads((folder / "results.json").read_text())
        _check_measurements(saved["heldout"])
        config = json.loads((folder / "config.json").read_text())
        assert config["alignment_loss_weight"] == runs[variant]["alignment_loss_weight"]
        assert config["decoder_config"]["num_hidden_layers"] == 2  # --config_overrides over the preset
        # Trainer logged every loss part; the ablation still measures alignment (without training it)
        logged = [e for e in saved["history"] if "generation_loss" in e]
        assert logged and all(math.isfinite(e["generation_loss"]) for e in logged)
        assert all({"alignment_loss", "text_image_loss", "text_audio_loss", "image_audio_loss"} <= set(e)
                   for e in logged)
    aligned_log = [e for e in json.loads((output_dir / "aligned" / "results.json").read_text())["history"]
                   if "loss" in e and "generation_loss" in e]
    assert any(abs(e["loss"] - e["generation_loss"] - e["alignment_loss"]) < 0.05 * e["loss"] for e in aligned_log)
    ablation_log = [e for e in json.loads((output_dir / "no_alignment" / "results.json").read_text())["history"]
                    if "loss" in e and "generation_loss" in e]
    assert all(e["loss"] == pytest.approx(e["generation_loss"], rel=1e-3) for e in ablation_log)


def test_eval_reloads_the_saved_models_and_matches_training(trained):
    output_dir, results = trained
    result = run_script("eval_multimodal", "--model_dir", str(output_dir), "--disable_tqdm", "True",
                        "--num_threads", "1")  # the data settings and the seed come from training's results.json
    assert result.returncode == 0, result.stderr[-3000:]
    folder = output_dir / "eval"
    evaluation = json.loads((folder / "results.json").read_text())
    assert evaluation["models"].keys() == {"aligned", "no_alignment"}
    assert (folder / "retrieval.png").read_bytes()[:8] == PNG_MAGIC
    assert "modality alignment error" in (folder / "results.md").read_text()
    assert evaluation["data"]["dataset"] == "synthetic" and evaluation["data"]["images"] == 30
    for variant in ("aligned", "no_alignment"):
        measured = evaluation["models"][variant]
        _check_measurements(measured)
        # the models loaded from disk (AutoModelForImageTextToText, trust_remote_code) give the training numbers
        trained_numbers = results["runs"][variant]["heldout"]
        assert measured["vqa"] == trained_numbers["vqa"]
        for direction, value in trained_numbers["retrieval_r_at_1"].items():
            assert measured["retrieval_r_at_1"][direction] == pytest.approx(value)
        assert measured["alignment_error"]["error"] == pytest.approx(trained_numbers["alignment_error"]["error"])
    assert evaluation["vqa_accuracy_gain"] == pytest.approx(results["vqa_accuracy_gain"])


def test_eval_data_settings_follow_the_command_line_then_training(tmp_path):
    from lightarch.evaluation.multimodal import find_models, heldout_data

    record = {"data_args": {"dataset": "synthetic", "eval_images_per_class": 3, "num_threads": 1}}
    data = heldout_data(record, dataset=None, eval_images_per_class=5)
    assert (data.dataset, data.eval_images_per_class, data.eval_questions_per_kind) == ("synthetic", 5, 100)
    assert heldout_data({}).dataset == "fashion_mnist"
    with pytest.raises(ValueError, match="--model_dir .* holds no saved model"):
        find_models(tmp_path)


def test_resume_keeps_finished_runs_and_continues_unfinished_ones(trained, tmp_path):
    output_dir, results = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(output_dir), str(copy)], check=True)
    (copy / "no_alignment" / "results.json").unlink()  # as if the process died before the ablation's final save
    (copy / "aligned" / "README.md").unlink()  # and the aligned card was never written
    resumed = micro_run(copy, resume_from_checkpoint="True")
    assert resumed["runs"]["aligned"]["heldout"] == results["runs"]["aligned"]["heldout"]  # kept, not retrained
    assert "${" not in (copy / "aligned" / "README.md").read_text()  # written again
    ablation = resumed["runs"]["no_alignment"]
    assert ablation["resumed_from"].endswith("checkpoint-6") and ablation["train_steps"] == 6
    assert ablation["heldout"]["vqa"] == results["runs"]["no_alignment"]["heldout"]["vqa"]


def test_a_failing_model_card_never_loses_the_trained_model(tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForImageTextToText

    import lightarch.training.multimodal as recipe

    def broken_plot(*args, **kwargs):
        raise RuntimeError("the plot broke")

    monkeypatch.setattr(recipe, "plot_losses", broken_plot)
    with pytest.raises(RuntimeError, match="the plot broke"):
        micro_run(tmp_path / "run", ablation=False, max_steps=2, save_strategy="no")
    folder = tmp_path / "run" / "aligned"
    assert str(folder) in caplog.text and "saved, complete" in caplog.text
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert model.config.alignment_loss_weight == 1.0
    assert json.loads((folder / "results.json").read_text())["train_steps"] == 2


@pytest.mark.parametrize(
    "overrides, training, message",
    [
        ("alignment_pairs=[\"text_smell\"]", {}, "alignment_pairs"),
        ("alignment_loss_weight=0", {}, "--ablation True"),
        ("[1, 2]", {}, "JSON object"),
        ("image_token_id=6", {}, "--config_overrides image_token_id=6"),
        ('{"decoder_config": {"vocab_size": 50}}', {}, "--config_overrides decoder_config.vocab_size=50"),
        ("", {"per_device_train_batch_size": 1}, "in-batch negatives"),
        ("", {"resume_from_checkpoint": "some/checkpoint-3"}, "takes True"),
    ],
)
def test_bad_training_options_are_refused_naming_them(overrides, training, message, tmp_path):
    from lightarch.training.multimodal import check_multimodal_run

    with pytest.raises(ValueError, match=re.escape(message)):
        check_multimodal_run(micro_config(overrides), micro_training_args(tmp_path / "out", **training))


def test_train_script_refuses_a_foreign_output_dir_and_names_missing_packages(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = run_script("train_multimodal", *MICRO_TRAIN, "--output_dir", str(foreign))
    assert result.returncode == 2 and "is not empty" in result.stderr and "Traceback" not in result.stderr
    result = run_script("train_multimodal", *MICRO_TRAIN, "--output_dir", str(tmp_path / "out"), "--dataset",
                        "fashion_mnist", "--fashion_mnist_dir", str(tmp_path / "nothing"), "--espeak_executable",
                        "no-such-espeak")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert INSTALL_COMMAND in result.stderr and "dataset-fashion-mnist" in result.stderr


def test_readme_multimodal_snippet_runs():
    """The Python block of the README's Multimodal section runs as written (offline, seconds)."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme[readme.index("## Multimodal"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.config.alignment_pairs == ["text_image", "text_audio"]
    assert not any(p.requires_grad for p in model.model.vision_model.parameters())


def test_model_card_snippet_runs_in_a_fresh_process_without_lightarch(trained, tmp_path):
    """The card's usage code loads the saved folder through remote code where lightarch is not importable."""
    output_dir, _ = trained
    card = (output_dir / "aligned" / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert str((output_dir / "aligned").as_posix()) in snippet
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    check = snippet + "\nimport sys\nassert 'lightarch' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("[") and result.stdout.strip().endswith("]")  # the decoded answers
