"""Cross-modal retrieval (lightarch.retrieval.crossmodal): a faiss index over the multimodal model's aligned embeddings,
searched by queries of any modality, against a brute-force numpy cosine oracle; its non-pickle folder and integrity
check; the recall measurement; scripts/search_multimodal.py end to end on a tiny saved model (synthetic data)."""

import json

import numpy as np
import pytest
import torch
from conftest import PNG_MAGIC, run_script
from lightarch import (
    MultiModalConfig,
    MultiModalForConditionalGeneration,
    MultiModalProcessor,
)
from lightarch.data.multimodal import (
    CLASS_NAMES,
    build_tokenizer,
    class_texts,
    synthetic_pools,
)
from lightarch.evaluation.metrics import load_metric
from lightarch.retrieval.crossmodal import (
    DATA_FILES,
    CrossModalIndex,
    CrossModalIndexIntegrityError,
    model_fingerprint,
)
from lightarch.retrieval.crossmodal_evaluation import (
    DIRECTIONS,
    build_indexes,
    check_search_output_dir,
    class_recall,
    measure_model,
    parse_search_options,
    resolve_baseline,
)
from lightarch.training.cli import config_from_preset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = json.dumps({
    "decoder_config": {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2},
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64},
    "audio_config": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64},
})


def tiny_model(seed: int = 0):
    """A randomly initialised tri-modal model (the training preset, shrunk) and its processor."""
    config = config_from_preset(MultiModalConfig, "trimodal-qa", TINY)
    torch.manual_seed(seed)
    model = MultiModalForConditionalGeneration(config).eval()
    return model, MultiModalProcessor.from_config(config, build_tokenizer())


@pytest.fixture(scope="module")
def setup():
    model, processor = tiny_model()
    pool = synthetic_pools(train_images_per_class=1, eval_images_per_class=3)["eval"]  # 30 images, 10 clips
    return model, processor, pool


def oracle_embeddings(model, processor, items, modality, sampling_rate=None) -> np.ndarray:
    """(N, D) unit-length aligned embeddings straight from the model's get_*_features, in numpy."""
    with torch.no_grad():
        if modality == "image":
            out = model.get_image_features(pixel_values=processor.alignment_batch(images=list(items))["pixel_values"])
        elif modality == "audio":
            batch = processor.alignment_batch(audio=list(items), sampling_rate=sampling_rate)
            out = model.get_audio_features(input_features=batch["input_features"],
                                           input_features_mask=batch["input_features_mask"])
        else:
            batch = processor.alignment_batch(text=list(items))
            out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    array = out.pooler_output.double().numpy()
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def image_index(setup, kind="flat", **options) -> CrossModalIndex:
    model, processor, pool = setup
    metadata = [{"label": int(c), "class": CLASS_NAMES[c]} for c in pool.image_labels]
    return CrossModalIndex.build(model, processor, list(pool.images), "image", metadata, kind, batch_size=7,
                                 **options)


@pytest.mark.parametrize("query_modality", ["text", "audio", "image"])
def test_search_matches_a_brute_force_cosine_oracle(setup, query_modality):
    model, processor, pool = setup
    index = image_index(setup)
    queries = {"text": ["sneaker", "a picture of a dress", "bag"], "audio": pool.clips[:4],
               "image": list(pool.images[5:8])}[query_modality]
    ids, scores = index.search(queries, query_modality, k=6, sampling_rate=pool.sampling_rate)
    assert ids.shape == scores.shape == (len(queries), 6) and ids.dtype == np.int64
    gallery = oracle_embeddings(model, processor, pool.images, "image")
    similarity = oracle_embeddings(model, processor, queries, query_modality, pool.sampling_rate) @ gallery.T
    expected = -np.sort(-similarity, axis=1)[:, :6]  # (Q, 6) the oracle's best cosine scores, best first
    np.testing.assert_allclose(scores, expected, atol=1e-5)  # the same scores, in rank order
    np.testing.assert_allclose(np.take_along_axis(similarity, ids, axis=1), expected, atol=1e-5)  # of those items
    if query_modality == "image":  # an indexed image finds itself first, with cosine 1
        assert ids[:, 0].tolist() == [5, 6, 7] and np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_approximate_index_finds_the_exact_neighbours(setup):
    exact, approximate = image_index(setup), image_index(setup, "hnsw")
    queries = exact.embeddings[:10]
    _, exact_scores = exact.search_embeddings(queries, 5)
    _, hnsw_scores = approximate.search_embeddings(queries, 5)
    np.testing.assert_allclose(hnsw_scores, exact_scores, atol=1e-5)  # 30 items: HNSW is exhaustive here
    assert approximate.config.index == "hnsw" and exact.config.index == "flat"


def test_save_load_round_trip_gives_the_same_results(setup, tmp_path):
    model, processor, pool = setup
    for kind in ("flat", "ivf"):
        index = image_index(setup, kind, nprobe=1)
        before = index.search(["sandal", "shirt"], "text", k=5)
        index.save_pretrained(tmp_path / kind)
        files = {p.name for p in (tmp_path / kind).iterdir()}
        assert files == {*DATA_FILES, "manifest.json"}  # numpy, faiss and JSON only: nothing to unpickle
        loaded = CrossModalIndex.from_pretrained(tmp_path / kind, model=model, processor=processor)
        after = loaded.search(["sandal", "shirt"], "text", k=5)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
        assert loaded.items == index.items and loaded.labels.tolist() == pool.image_labels.tolist()
        assert (loaded.config.index, loaded.config.nprobe, loaded.modality) == (kind, 1, "image")
    # Without a model it still searches embeddings, and says how to embed raw queries.
    bare = CrossModalIndex.from_pretrained(tmp_path / "flat")
    np.testing.assert_array_equal(bare.search_embeddings(loaded.embeddings[:2], 3)[0][:, 0], [0, 1])
    with pytest.raises(ValueError, match="model= and processor="):
        bare.search(["sandal"], "text")


def test_an_index_refuses_a_model_with_other_weights(setup, tmp_path):
    image_index(setup).save_pretrained(tmp_path / "index")
    other, processor = tiny_model(seed=1)
    assert model_fingerprint(other) != model_fingerprint(setup[0])
    with pytest.raises(ValueError, match="^model: .*fingerprint"):
        CrossModalIndex.from_pretrained(tmp_path / "index", model=other, processor=processor)


@pytest.mark.parametrize("name", DATA_FILES)
def test_a_tampered_file_is_refused_naming_it(setup, tmp_path, name):
    image_index(setup).save_pretrained(tmp_path)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(CrossModalIndexIntegrityError, match=name.replace(".", r"\.") + ": sha256 does not match"):
        CrossModalIndex.from_pretrained(tmp_path)


def test_missing_file_or_manifest_is_refused(setup, tmp_path):
    image_index(setup).save_pretrained(tmp_path)
    (tmp_path / "items.json").unlink()
    with pytest.raises(CrossModalIndexIntegrityError, match=r"items\.json: missing"):
        CrossModalIndex.from_pretrained(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CrossModalIndexIntegrityError, match=r"manifest\.json: missing or not a lightarch-crossmodal"):
        CrossModalIndex.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        CrossModalIndex.from_pretrained(tmp_path / "absent")


def test_bad_arguments_are_refused_naming_them(setup):
    model, processor, pool = setup
    with pytest.raises(ValueError, match="^modality must be one of"):
        CrossModalIndex.build(model, processor, list(pool.images), "video")
    with pytest.raises(ValueError, match="^items must be a non-empty"):
        CrossModalIndex.build(model, processor, [], "image")
    with pytest.raises(ValueError, match="^metadata must have one dict per item"):
        CrossModalIndex.build(model, processor, list(pool.images), "image", metadata=[{"label": 0}])
    with pytest.raises(ValueError, match="^metadata must be JSON-serialisable"):
        CrossModalIndex.build(model, processor, list(pool.images[:2]), "image", metadata=[{"x": object()}] * 2)
    index = image_index(setup)
    with pytest.raises(ValueError, match="^modality must be one of"):
        index.search(["sneaker"], "smell")
    with pytest.raises(ValueError, match="^query_items must be a non-empty"):
        index.search([], "text")
    with pytest.raises(ValueError, match=r"^k must be in \[1, 30\]"):
        index.search(["sneaker"], "text", k=31)
    with pytest.raises(ValueError, match="^index must be one of"):
        CrossModalIndex.from_embeddings(index.embeddings, "image", index="annoy")


def test_class_recall_matches_a_naive_reference(setup):
    model, processor, pool = setup
    indexes = build_indexes(model, processor, pool, batch_size=16)
    assert {m: len(i) for m, i in indexes.items()} == {"image": 30, "audio": 10, "text": 4 * len(CLASS_NAMES)}
    assert indexes["text"].items[5] == {"label": 1, "class": CLASS_NAMES[1], "text": class_texts(1)[1]}
    gallery = oracle_embeddings(model, processor, pool.images, "image")
    queries = oracle_embeddings(model, processor, pool.clips, "audio", pool.sampling_rate)
    ranked = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")  # (Q, G)
    for k in (1, 3, 10):
        naive = np.mean([pool.clip_labels[q] in pool.image_labels[ranked[q, :k]] for q in range(len(queries))])
        measured = class_recall(indexes["image"], indexes["audio"].embeddings, indexes["audio"].labels, [k])
        assert measured == {f"recall@{k}": pytest.approx(naive)}
    # And the metric is the shipped retrieval_recall module.
    assert load_metric("retrieval_recall").compute(predictions=[[1, 0]], references=[0], k=[1, 2]) == {
        "recall@1": 0.0, "recall@2": 1.0, "count": 1}


def test_measure_model_covers_every_direction_and_the_approximate_kinds(setup):
    model, processor, pool = setup
    measured = measure_model(model, processor, pool, ks=(1, 5), approximate=("hnsw", "ivf"), ef_search=16, nprobe=1)
    assert list(measured["recall"]) == [f"{q}->{g}" for q, g in DIRECTIONS]
    assert all(set(r) == {"recall@1", "recall@5"} for r in measured["recall"].values())
    assert list(measured["curves"]["text->image"]) == [f"recall@{k}" for k in range(1, 6)]
    rows = {(r["index"], r["gallery"]): r for r in measured["approximate"]}
    assert set(rows) == {("hnsw", "image"), ("hnsw", "audio"), ("ivf", "image"), ("ivf", "audio")}
    assert set(rows[("hnsw", "image")]["directions"]) == {"text->image", "audio->image"}
    assert all(0.0 <= r["neighbour_recall@5"] <= 1.0 for r in rows.values())
    assert [e["query_modality"] for e in measured["examples"]] == ["text", "text", "text", "text", "audio", "image"]
    assert all(len(e["hits"]) == 5 and "class" in e["hits"][0] for e in measured["examples"])


# ------------------------------------------------------------------------------------------------------- script


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A train_multimodal-shaped folder: aligned/ and no_alignment/ tiny models, results.json naming the data."""
    run = tmp_path_factory.mktemp("cm") / "multimodal"
    for name, seed in (("aligned", 0), ("no_alignment", 1)):
        model, processor = tiny_model(seed)
        model.save_pretrained(run / name)
        processor.save_pretrained(run / name)
    (run / "results.json").write_text(json.dumps({
        "seed": 0, "data_args": {"dataset": "synthetic", "train_images_per_class": 1, "eval_images_per_class": 2}}))
    return run


def test_script_end_to_end_on_a_tiny_saved_model(saved_run, tmp_path):
    result = run_script("search_multimodal", "--model_dir", str(saved_run / "aligned"), "--ks", "1,3",
                        "--disable_tqdm", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    output = saved_run / "crossmodal_search"  # the default: beside the model folder
    assert "| text->image |" in result.stdout and "'sneaker' (text) -> image:" in result.stdout
    results = json.loads((output / "results.json").read_text())
    assert list(results["models"]) == ["aligned", "no_alignment"]  # the sibling run is the default baseline
    assert results["data"] == {"dataset": "synthetic", "seed": 0, "images": 20, "clips": 10, "texts": 40,
                               "voice_names": ["synth-heldout"]}
    assert set(results["models"]["aligned"]["recall"]["audio->image"]) == {"recall@1", "recall@3"}
    assert (output / "recall.png").read_bytes()[:8] == PNG_MAGIC
    assert "| audio->image |" in (output / "results.md").read_text()
    # The saved indexes reload (integrity-checked) with the model and give the recorded example hits.
    model, processor = tiny_model(0)
    index = CrossModalIndex.from_pretrained(output / "indexes" / "image", model=model, processor=processor)
    ids, _ = index.search(["sneaker"], "text", k=5)
    assert ids[0].tolist() == [h["id"] for h in results["models"]["aligned"]["examples"][0]["hits"]]
    # A second run may replace its own output; an input folder is never an output.
    assert check_search_output_dir(saved_run / "aligned", None, None) == output
    with pytest.raises(ValueError, match="--output_dir .* is the input --baseline_dir"):
        check_search_output_dir(saved_run / "aligned", saved_run / "no_alignment", saved_run / "no_alignment")


def test_script_options_are_checked_naming_them(saved_run, tmp_path):
    assert parse_search_options("10,1,5", "hnsw, ivf") == ([10, 1, 5], ["hnsw", "ivf"])
    assert parse_search_options("1", "") == ([1], [])
    for ks, approximate, message in (("1,x", "", "--ks must be"), ("0", "", "--ks must be"),
                                     ("1", "annoy", r"--approximate: \['annoy'\] unknown"),
                                     ("1", "flat", "--approximate: .*flat is the exact reference")):
        with pytest.raises(ValueError, match=message):
            parse_search_options(ks, approximate)
    assert resolve_baseline(saved_run / "aligned", None) == saved_run / "no_alignment"  # the sibling run
    assert resolve_baseline(saved_run / "aligned", "none") is None
    assert resolve_baseline(saved_run / "no_alignment", None) is None  # never the model itself
    with pytest.raises(ValueError, match="^--baseline_dir .*absent: no saved model"):
        resolve_baseline(saved_run / "aligned", tmp_path / "absent")
    # The script turns them into one-line usage errors (exit 2), before loading any model.
    result = run_script("search_multimodal", "--model_dir", str(saved_run), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "--model_dir" in result.stderr and "no saved model" in result.stderr
    assert "Traceback" not in result.stderr
