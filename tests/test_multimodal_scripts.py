"""The tri-modal data set (modeling/multimodal_data.py) and the multimodal scripts (train_multimodal, eval_multimodal).

Never needs the apt packages: Fashion-MNIST is replaced by tiny generated IDX files, espeak-ng by a fake executable
that writes a WAV the way espeak-ng does (streaming header), and the end-to-end run uses `--dataset synthetic`.
"""

import gzip
import importlib.util
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling.multimodal_data import (
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
    answer_accuracy,
    check_espeak,
    check_fashion_mnist,
    class_texts,
    class_similarity_matrix,
    fashion_mnist_pools,
    generate_questions,
    load_fashion_mnist,
    modality_alignment_error,
    parse_wav,
    read_idx,
    recall_at_1,
    speak,
    split_words,
    synthetic_pools,
    vocabulary,
    write_idx,
)

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


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
