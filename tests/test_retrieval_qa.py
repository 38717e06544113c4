"""WordNet QA with retrieved context (issue 18): the split, the knowledge base, exact match, the prompt layouts and
scripts/train_retrieval_qa.py end to end, on a small slice of WordNet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_script
from lightarch.data.wordnet_qa import (
    QUESTION_KINDS,
    WordnetQASettings,
    answer_span,
    best_reference,
    build_wordnet_qa,
    clean_lemma,
    normalize_answer,
    passage_text,
)
from lightarch.evaluation.metrics import load_metric
from lightarch.evaluation.model_cards import validate_card
from lightarch.retrieval.context import generate_with_context
from lightarch.retrieval.qa import (
    QAReaderSettings,
    answer_without_context,
    context_input_ids,
    qa_measured_results,
)
from lightarch.training.retrieval_qa import (
    ReaderDataset,
    ReaderTraining,
    eval_output_dir,
    evaluate_saved_reader,
    training_examples,
    training_retriever,
)

WORDNET = Path("/usr/share/wordnet")
pytestmark = pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="needs Debian's wordnet-base")


@pytest.fixture(scope="module")
def small_wordnet(tmp_path_factory) -> Path:
    """The first 1500 synsets of each of WordNet's data files (hypernyms outside the slice are simply absent)."""
    folder = tmp_path_factory.mktemp("wordnet")
    for part in ("noun", "verb", "adj", "adv"):
        lines = (WORDNET / f"data.{part}").read_text(encoding="latin-1").splitlines(keepends=True)
        header = [line for line in lines if line.startswith("  ")]
        body = [line for line in lines if not line.startswith("  ")]
        (folder / f"data.{part}").write_text("".join(header + body[:1500]), encoding="latin-1")
    return folder


def gloss_of(passage: str) -> str:
    return passage.rsplit(": ", 1)[0]  # "<gloss>: <lemmas> (a kind of <hypernym>)"


@pytest.fixture(scope="module")
def qa(small_wordnet):
    return build_wordnet_qa(WordnetQASettings(heldout_fraction=0.1, wordnet_dir=str(small_wordnet)))


def test_the_split_leaks_no_heldout_gloss_into_training_text(qa):
    heldout_glosses = {gloss_of(qa.passages[i]) for i, key in enumerate(qa.synsets) if key in qa.heldout}
    assert len(heldout_glosses) > 100 and all(len(qa.questions[s]) > 100 for s in ("train", "heldout"))
    examples = training_examples(qa, ReaderTraining(no_context_fraction=0.2), seed=0)
    assert len(examples) == len(qa.questions["train"])
    dataset = ReaderDataset(None, examples, training_retriever(qa), num_passages=3, max_passage_tokens=32)
    contexts = [dataset.passages(i) for i in range(len(dataset))]
    assert 0.7 * len(examples) < sum(map(bool, contexts)) < 0.9 * len(examples)  # ~20% without passages
    context_glosses = {gloss_of(p) for passages in contexts for p in passages}
    asked = {q.question.removeprefix("What word means ")[:-1] for _, q in examples if q.kind == "definition"}
    assert len(context_glosses) > 1000 and len(asked) > 1000
    assert not (context_glosses | asked) & heldout_glosses
    assert not {q.synset for _, q in examples} & qa.heldout


def test_every_question_has_its_gold_passage_in_the_knowledge_base(qa):
    assert len(qa.passages) == len(qa.synsets) == 6000  # held-out synsets are in the knowledge base too
    for split in ("train", "heldout"):
        kinds = {q.kind for q in qa.questions[split]}
        assert kinds == set(QUESTION_KINDS)
        for q in qa.questions[split]:
            gold = [qa.passages[i] for i in q.passages]
            assert all(qa.synsets[i] in qa.heldout for i in q.passages) == (split == "heldout")
            # the answer is what follows the prompt's stem in the gold passage: the reader copies it
            assert q.prompt.endswith(f"\nA: {q.stem}")
            if q.kind == "definition":
                gloss = q.question.removeprefix("What word means ")[:-1]
                assert q.stem == f"The word that means {gloss} is"
                assert any(p.startswith(f"{q.stem} {q.answers[0]}") for p in gold)
            else:
                word = re.sub(r"^(a|an) ", "", q.question.removeprefix("What is ")[:-1])
                assert q.stem.endswith(f"{word} is a kind of") and f"{q.stem} {q.answers[0]}." in gold[0]


def test_exact_match_accepts_any_lemma_and_normalises():
    answers = ("dog fennel", "Eupatorium capillifolium")
    em = load_metric("exact_match")

    def score(prediction: str) -> float:
        return em.compute(predictions=[normalize_answer(prediction)],
                          references=[normalize_answer(best_reference(prediction, answers))])["exact_match"]

    assert score("dog fennel") == score(" eupatorium  Capillifolium.") == score("Eupatorium_capillifolium") == 1.0
    assert score("dog") == score("fennel dog") == 0.0
    assert clean_lemma("galore(ip)") == "galore" and clean_lemma("Canis_familiaris") == "Canis familiaris"
    assert passage_text(["dalmatian", "coach dog"], "a breed", "dog") == (
        "The word that means a breed is dalmatian, coach dog. A coach dog is a kind of dog.")
    assert passage_text(["Ascaphidae"], "a family", "amphibian family") == (
        "The word that means a family is Ascaphidae. Ascaphidae is a kind of amphibian family.")
    # a generated answer ends at the passage's next separator; a period inside a name does not end it
    assert [answer_span(t) for t in (" coach dog, carriage dog", "dog. A dog is", "St.Louis;", "aplasia\nQ")] == [
        "coach dog", "dog", "St.Louis", "aplasia"]


class _Recorder:
    """Records the input ids of every `model.generate` call and stops at once (eos)."""

    def __init__(self, model, eos: int) -> None:
        self.model, self.eos, self.calls = model, eos, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, input_ids, **kwargs):
        self.calls.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([[self.eos]])], dim=1)


def test_the_prompt_layouts_match_between_training_and_evaluation(qa):
    from lightarch.data.tokenizers import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(qa.passages[:500], 300, show_progress=False)
    recorder = _Recorder(torch.nn.Linear(1, 1), tokenizer.eos_token_id)
    question = qa.questions["heldout"][0]
    passages = ["a, b (a kind of c): d", "e: f"]

    class Fixed:
        def retrieve(self, query, k):
            return passages[:k]

    settings = QAReaderSettings(num_passages=2, max_passage_tokens=48)
    generate_with_context(recorder, tokenizer, question.prompt, Fixed(), 4, settings.ralm_config(), overlap=False)
    answer_without_context(recorder, tokenizer, question.prompt, 4)
    with_passages = context_input_ids(tokenizer, passages, question.prompt, 48)
    no_passages = context_input_ids(tokenizer, [], question.prompt, 48)
    assert recorder.calls == [with_passages, no_passages]
    assert no_passages == [tokenizer.bos_token_id] + tokenizer(question.prompt, add_special_tokens=False)["input_ids"]
    question_ids = tokenizer(question.prompt, add_special_tokens=False)["input_ids"]
    for question_loss in (False, True):
        dataset = ReaderDataset(tokenizer, [(True, question), (False, question)], Fixed(), 2, 48, question_loss)
        for item, prompt in zip(dataset, (with_passages, no_passages)):
            assert item["input_ids"][: len(prompt)] == prompt
            answer = tokenizer.decode(item["input_ids"][len(prompt):], skip_special_tokens=True)
            assert answer == " " + question.answers[0]
            context = len(prompt) - len(question_ids) + 1  # bos, passages and the question's first token
            assert set(item["labels"][:context]) == {-100}  # never a loss on the passages
            labelled = item["labels"][context : len(prompt)]
            assert labelled == (prompt[context:] if question_loss else [-100] * len(labelled))
            assert item["labels"][len(prompt):] == item["input_ids"][len(prompt):]


def test_bad_settings_name_the_option(tmp_path):
    for make, option in ((lambda: QAReaderSettings(num_passages=0), "--num_passages"),
                         (lambda: WordnetQASettings(heldout_fraction=1.5), "--heldout_fraction"),
                         (lambda: WordnetQASettings(wordnet_dir=str(tmp_path)), "--wordnet_dir"),
                         (lambda: WordnetQASettings(max_passage_chars=0), "--max_passage_chars"),
                         (lambda: ReaderTraining(no_context_fraction=1.0), "--no_context_fraction")):
        with pytest.raises(ValueError, match=option):
            make()
    with pytest.raises(ValueError, match="--model_dir"):
        eval_output_dir(tmp_path)  # not a trained reader's folder
    result = run_script("train_retrieval_qa", "--eval_only", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "--model_dir" in result.stderr and "Traceback" not in result.stderr


def test_the_script_trains_evaluates_saves_and_re_evaluates(small_wordnet, tmp_path):
    out = tmp_path / "reader"
    result = run_script("train_retrieval_qa", "--wordnet_dir", str(small_wordnet), "--heldout_fraction", "0.1",
                        "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_train_questions", "64",
                        "--eval_per_kind", "3", "--max_answer_tokens", "4", "--output_dir", str(out),
                        "--config_overrides", "vocab_size=300,hidden_size=32,intermediate_size=64,"
                        "moe_intermediate_size=16,num_hidden_layers=2,layer_types=[\"full_attention\",\"full_attention\"]")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["factual_accuracy"] <= 1.0 and results["model_dir"] == out.as_posix()
    assert set(results["qa"]["kinds"]) == set(QUESTION_KINDS) and results["qa"]["overall"]["count"] == 6
    assert {"README.md", "results.md", "qa.png", "qa_settings.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert QAReaderSettings.from_folder(out).data.wordnet_dir == str(small_wordnet)
    card = validate_card((out / "README.md").read_text(encoding="utf-8"))
    expected = {r.metric_name: r.metric_value for r in qa_measured_results(results)}
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == pytest.approx(expected)
    assert expected["EM with retrieval (all)"] == results["factual_accuracy"] and len(expected) == 9

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == results["num_parameters"]

    evaluate_saved_reader(out, eval_per_kind=3, show_progress=False)  # what --eval_only runs: all from the folder
    redone = json.loads((out / "qa_eval" / "results.json").read_text())
    assert redone["factual_accuracy"] == results["factual_accuracy"]  # same questions, same greedy answers
    assert redone["qa"]["overall"] == results["qa"]["overall"]
    # eval_retrieval.py --qa_model_dir keeps this summary and prints the same table
    from lightarch.retrieval.evaluation import qa_summary, qa_table
    from lightarch.retrieval.qa import qa_markdown

    summary = qa_summary(redone)
    assert summary["factual_accuracy"] == redone["factual_accuracy"] and summary["model_dir"] == out.as_posix()
    assert qa_markdown(redone["qa"], summary["num_passages"]).strip() in "\n".join(qa_table({"qa": summary}))
    assert qa_table({}) == []
