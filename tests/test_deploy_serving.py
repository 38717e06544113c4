"""Continuous batching sized for a CPU, and `transformers serve --continuous-batching` on a saved lightarch folder."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import tiny_sparse_moe_config
from deploy_helpers import save_tiny_model, tiny_byte_config
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lightarch import SparseMoeForCausalLM
from lightarch.data.tokenizers import byte_level_tokenizer
from lightarch.deploy.serving import (
    TokenBudgetMiddleware,
    check_servable_folder,
    cpu_continuous_batching_config,
    paged_cache_bytes,
    request_token_budget,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_cpu_sized_manager_matches_generate_and_allocates_megabytes():
    """The warm-manager path of `transformers serve` (sdpa; generate_batch with paged|eager is in test_sparse_moe)."""
    config = tiny_sparse_moe_config(router_mode="top_p", num_shared_experts=1)
    model = SparseMoeForCausalLM(config).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], list(range(20, 60))]  # around the sliding window of 4
    expected = [model.generate(torch.tensor([p]), max_new_tokens=7, do_sample=False, eos_token_id=-1)[0, len(p):].tolist()
                for p in prompts]
    cb_config = cpu_continuous_batching_config(config, max_concurrent_requests=4, max_request_tokens=64)
    assert (cb_config.num_blocks, cb_config.page_size, cb_config.max_requests_per_batch) == (8, 32, 4)
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=-1, pad_token_id=0),
        continuous_batching_config=cb_config,
    )
    manager.start()
    try:
        request_ids = [manager.add_request(p, max_new_tokens=7) for p in prompts]
        results = {}
        deadline = time.monotonic() + 60
        while len(results) < len(prompts) and time.monotonic() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result.generated_tokens
        cache_bytes = manager.batch_processor.cache.cache_tensor.nbytes
    finally:
        manager.stop(block=True, timeout=30)
    assert [results.get(r) for r in request_ids] == expected
    estimate = paged_cache_bytes(config, cb_config)
    assert estimate <= cache_bytes <= 4 * estimate + 2**20  # megabytes, not transformers' RAM-sized default
    assert cache_bytes < 8 * 2**20


def test_cpu_continuous_batching_config_rejects_impossible_sizes():
    config = tiny_sparse_moe_config(max_position_embeddings=128)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        cpu_continuous_batching_config(config, max_request_tokens=129)
    with pytest.raises(ValueError, match="max_concurrent_requests must be >= 1"):
        cpu_continuous_batching_config(config, max_concurrent_requests=0)
    with pytest.raises(ValueError, match="page_size must be >= 4"):
        cpu_continuous_batching_config(config, page_size=2)
    cb_config = cpu_continuous_batching_config(config, max_concurrent_requests=1, max_request_tokens=40)
    assert request_token_budget(config, cb_config) == 64  # two 32-token pages
    assert request_token_budget(config) == 128


def _call_middleware(middleware, path, body):
    """Run the ASGI middleware on one request; returns (status, json or None, body the app received)."""
    received, sent = {}, []

    async def app(scope, receive, send):
        received["body"] = json.loads((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message):
        sent.append(message)

    middleware.app = app
    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(middleware(scope, receive, send))
    status = sent[0]["status"]
    payload = json.loads(sent[1]["body"]) if status != 200 else None
    return status, payload, received.get("body")


def test_token_budget_middleware_refuses_over_budget_requests_and_fills_max_tokens():
    tokenizer = byte_level_tokenizer()
    middleware = TokenBudgetMiddleware(None, tokenizer, budget=64, default_max_new_tokens=1000)
    messages = [{"role": "user", "content": "hello"}]  # "<|user|>hello\n<|assistant|>" = 27 byte tokens
    status, _, body = _call_middleware(middleware, "/v1/chat/completions", {"messages": messages, "max_tokens": 37})
    assert status == 200 and body["max_tokens"] == 37
    status, error, body = _call_middleware(middleware, "/v1/chat/completions", {"messages": messages, "max_tokens": 38})
    assert status == 400 and body is None
    assert "27 tokens and max_tokens is 38" in error["error"]["message"]
    assert "budget of 64" in error["error"]["message"] and "at most 37" in error["error"]["message"]
    status, _, body = _call_middleware(middleware, "/v1/chat/completions", {"messages": messages})
    assert status == 200 and body["max_tokens"] == 37  # absent: the remaining budget
    status, error, _ = _call_middleware(middleware, "/v1/completions", {"prompt": "x" * 64, "max_tokens": 1})
    assert status == 400 and "The prompt has 64 tokens" in error["error"]["message"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@contextmanager
def serving(folder, cwd, *args: str):
    """`scripts/serve.py --model_dir folder` on a free 127.0.0.1 port until healthy; yields (base URL, process)."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "serve.py"), "--model_dir", str(folder), "--port", str(port),
         "--host", "127.0.0.1", "--max_concurrent_requests", "4", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"server exited early:\n{process.stdout.read()}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy within 120 s"
            time.sleep(0.5)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_transformers_serve_continuous_batching_answers_concurrent_requests(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    folder = save_tiny_model(tmp_path / "model", router_mode="top_p", num_shared_experts=1)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    questions = ["hello", "what is a mixture of experts?", "2+2=", "sliding windows"]
    max_tokens = 6
    expected = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    with serving(folder, tmp_path) as (base, _):
        def ask(question):
            return _post(f"{base}/v1/chat/completions", {
                "model": str(folder), "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens, "temperature": 0,
            })

        with ThreadPoolExecutor(max_workers=len(questions)) as pool:
            answers = list(pool.map(ask, questions))
        assert [status for status, _ in answers] == [200] * len(questions), answers
        assert [a["choices"][0]["message"]["content"] for _, a in answers] == expected

        status, error = _post(f"{base}/v1/chat/completions", {
            "model": str(folder), "messages": [{"role": "user", "content": "hello"}], "max_tokens": 500,
        })
        assert status == 400 and "exceed this server's per-request token budget of 128" in error["error"]["message"]
        status, answer = ask(questions[0])  # the batching worker survived the refused request
        assert status == 200 and answer["choices"][0]["message"]["content"] == expected[0]


def test_serving_refuses_folders_it_cannot_serve(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    config, _ = check_servable_folder(folder)
    assert config.model_type == "lightarch_sparse_moe"
    with pytest.raises(ValueError, match="--attn_implementation 'sdpa_paged'"):
        check_servable_folder(folder, "sdpa_paged")
    with pytest.raises(ValueError, match="has no config.json"):
        check_servable_folder(tmp_path / "missing")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no chat template"):
        check_servable_folder(folder)


CHAT = [{"role": "user", "content": "hello"}]  # 27 byte tokens with the chat template
MALFORMED_REQUESTS = [  # (path, body, the field the 400 names, a part of its message)
    ("/v1/chat/completions", {}, "messages", "messages is required"),
    ("/v1/chat/completions", {"messages": []}, "messages", "messages is required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "must be a string or a list of text parts, got int"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages[0].content[0].text", "must be a string, got None"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role", "must be one of"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "abc"}, "max_tokens", "whole number"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2.7}, "max_tokens", "whole number"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens", "must be >= 1"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": -1}, "temperature", "[0, 2]"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 5}, "top_p", "(0, 1]"),
    ("/v1/chat/completions", {"messages": CHAT, "frequency_penalty": -1.5}, "frequency_penalty", "(-1, 2]"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 3}, "n", "one choice per request"),
    ("/v1/chat/completions", {"messages": CHAT, "generation_config": "{}"}, "generation_config", "not accepted"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": [None]}, "stop", "list of non-empty strings"),
    ("/v1/chat/completions", {"messages": CHAT, "presence_penalty": 1}, "presence_penalty", "not supported"),
    ("/v1/completions", {"prompt": ""}, "prompt", "non-empty string"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "non-empty string"),
    ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of", "one choice per request"),
    ("/v1/responses", {}, "input", "input is required"),
    ("/v1/responses", {"input": [{"type": "input_text", "text": None}]}, "input[0].text", "must be a string"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 1.5}, "max_output_tokens", "whole number"),
    ("/v1/responses", {"input": "hi", "instructions": 3}, "instructions", "must be a string"),
]


@pytest.mark.parametrize("path, body, param, message", MALFORMED_REQUESTS)
def test_malformed_requests_get_400_naming_the_field(path, body, param, message):
    """transformers' handlers answer these with HTTP 500, or accept them silently (2.7 tokens, n=3, top_p=5)."""
    middleware = TokenBudgetMiddleware(None, byte_level_tokenizer(), budget=64)
    status, error, received = _call_middleware(middleware, path, body)
    assert status == 400 and received is None
    assert error["error"]["param"] == param and message in error["error"]["message"], error


def test_every_generating_route_is_held_to_the_token_budget():
    """/v1/responses was unguarded: one over-long input killed the batching worker (503 for every later request)."""
    middleware = TokenBudgetMiddleware(None, byte_level_tokenizer(), budget=64, default_max_new_tokens=1000)
    status, error, _ = _call_middleware(middleware, "/v1/responses", {"input": "x" * 64})
    assert status == 400 and "The prompt has 86 tokens" in error["error"]["message"]
    status, error, _ = _call_middleware(middleware, "/v1/responses", {"input": "hello", "max_output_tokens": 38})
    assert status == 400 and "Lower max_output_tokens to at most 37" in error["error"]["message"]
    parts = [{"type": "input_text", "text": "hello"}]
    status, _, body = _call_middleware(middleware, "/v1/responses", {"input": parts})
    assert status == 200 and body["max_output_tokens"] == 37  # absent: the remaining budget
    status, _, body = _call_middleware(middleware, "/v1/responses", {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}], "max_output_tokens": 37.0})
    assert status == 200 and body["max_output_tokens"] == 37
    status, _, body = _call_middleware(middleware, "/v1/chat/completions", {"messages": CHAT,
                                                                           "max_completion_tokens": 37})
    assert status == 200 and body["max_completion_tokens"] == 37 and "max_tokens" not in body
    status, error, _ = _call_middleware(middleware, "/v1/chat/completions", {"messages": CHAT,
                                                                            "max_completion_tokens": 38})
    assert status == 400 and "max_completion_tokens is 38" in error["error"]["message"]


def test_fields_the_batching_worker_would_apply_to_every_request_are_refused():
    """transformers' batching worker builds its logits processors once, from the first request's generation config (a
    first request's logit_bias then biases every later answer), and never reads stop strings."""
    tokenizer = byte_level_tokenizer()
    batching = TokenBudgetMiddleware(None, tokenizer, budget=64, continuous_batching=True)
    for name, value in (("logit_bias", {"5": 3}), ("frequency_penalty", 0.5), ("stop", ["x"])):
        status, error, _ = _call_middleware(batching, "/v1/chat/completions", {"messages": CHAT, name: value})
        assert status == 400 and error["error"]["param"] == name
        assert f"{name} is not supported with continuous batching" in error["error"]["message"]
    sequential = TokenBudgetMiddleware(None, tokenizer, budget=64)
    status, _, body = _call_middleware(sequential, "/v1/chat/completions", {"messages": CHAT, "logit_bias": {"5": 3}})
    assert status == 200 and body["logit_bias"] == {"5": 3.0}  # float: transformers' sequence_bias refuses ints
    assert isinstance(body["logit_bias"]["5"], float)


def test_a_pinned_server_refuses_loading_and_unloading_models():
    for path in ("/load_model", "/reset", "/v1/audio/transcriptions"):
        middleware = TokenBudgetMiddleware(None, byte_level_tokenizer(), budget=64, pinned_model="outputs/m")
        status, error, received = _call_middleware(middleware, path, {"model": "/any/other/folder"})
        assert status == 403 and received is None
        assert f"POST {path} is refused: this server is pinned to outputs/m" in error["error"]["message"]
    middleware = TokenBudgetMiddleware(None, byte_level_tokenizer(), budget=64)  # not pinned: transformers decides
    status, _, received = _call_middleware(middleware, "/load_model", {"model": "m"})
    assert status == 200 and received == {"model": "m"}


def test_a_dead_batching_worker_fails_its_request_and_is_replaced():
    """transformers keeps a dead continuous-batching worker: every later request got 503 until a restart."""
    from transformers.cli.serving.utils import GenerationState

    from lightarch.deploy.serving import keep_worker_alive

    torch.manual_seed(0)
    config = tiny_byte_config()
    model = SparseMoeForCausalLM(config).eval()
    tokenizer = byte_level_tokenizer()
    gen_config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    prompt = [5, 6, 7, 8]
    expected = model.generate(torch.tensor([prompt]), generation_config=gen_config)[0, len(prompt):].tolist()
    state = GenerationState(continuous_batching=True, cb_config=cpu_continuous_batching_config(
        config, max_concurrent_requests=2, max_request_tokens=64))
    keep_worker_alive(state)
    try:
        manager = state.get_manager("m", use_cb=True)
        manager.init_cb(model, gen_config)
        with pytest.raises(RuntimeError, match="input_ids is empty"):  # the request that kills the worker fails
            asyncio.run(manager.generate_non_streaming(model, tokenizer, {"input_ids": []}, gen_config, "bad"))
        deadline = time.monotonic() + 30
        while state.is_cb_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not state.is_cb_alive()
        fresh = state.get_manager("m", use_cb=True)  # the next request gets a live worker, not a 503
        assert fresh is not manager and state.is_cb_alive()
        fresh.init_cb(model, gen_config)
        _, _, generated = asyncio.run(fresh.generate_non_streaming(model, tokenizer, {"input_ids": prompt},
                                                                   gen_config, "good"))
        assert list(generated) == expected
    finally:
        state.shutdown()


def _request(url: str, body: dict | None = None, raw: bytes | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """POST JSON (or `raw` bytes) to `url`, or GET it when both are None: (status, body bytes)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _sse_events(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


def _well_formed(path: str, stream: bool, raw: bytes) -> bool:
    """A complete answer of the route's OpenAI shape, with text."""
    if stream:
        events = _sse_events(raw)
        if path == "/v1/responses":
            done = [e for e in events if e.get("type") == "response.completed"]
            return len(done) == 1 and isinstance(done[0]["response"]["output"][0]["content"][0]["text"], str)
        return bool(events) and "error" not in events[-1] and events[-1]["choices"][0]["finish_reason"] == "length"
    answer = json.loads(raw)
    if path == "/v1/chat/completions":
        return isinstance(answer["choices"][0]["message"]["content"], str) and len(answer["choices"]) == 1
    if path == "/v1/completions":
        return isinstance(answer["choices"][0]["text"], str) and answer["usage"]["completion_tokens"] == 4
    return answer["status"] == "completed" and isinstance(answer["output"][0]["content"][0]["text"], str)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_server_survives_concurrent_valid_and_invalid_requests_on_every_route(tmp_path):
    """A bounded load test on 127.0.0.1: every valid request answered in its route's shape, every invalid one a 4xx
    (never 500 / 503), the server healthy throughout, and its memory flat."""
    pytest.importorskip("fastapi")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the server's RSS from /proc")
    folder = save_tiny_model(tmp_path / "model")
    long_text = "x" * 300  # > the 128-token budget
    valid = [
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                  "max_completion_tokens": 4, "temperature": 0}),
        ("/v1/completions", {"prompt": "def add(", "max_tokens": 4}),
        ("/v1/completions", {"prompt": "def add(", "max_tokens": 4, "stream": True}),
        ("/v1/responses", {"input": "hello", "max_output_tokens": 4, "stream": False}),
        ("/v1/responses", {"input": "hello", "max_output_tokens": 4}),  # streams by default
    ]
    invalid = [(path, body) for path, body, _, _ in MALFORMED_REQUESTS] + [
        ("/v1/responses", {"input": long_text, "stream": False}),  # killed the worker before
        ("/v1/responses", {"input": long_text}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 500}),
        ("/v1/completions", {"prompt": long_text, "max_tokens": 4}),
        ("/v1/systemone", {"state": long_text, "questions": {"q": {"type": "noul", "instructions": "?"}}}),
        ("/v1/systemone", {"questions": {}}),
        ("/v1/chat/completions", {"messages": CHAT, "model": "/some/other/model"}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "logit_bias": {"5": 3}}),  # HTTP 500 before
        ("/load_model", {"model": str(folder)}),
        ("/reset", {}),
        ("/v1/audio/transcriptions", {"model": str(folder)}),
    ]
    with serving(folder, tmp_path) as (base, process):
        def send(item):
            kind, path, body = item
            status, raw = _request(base + path, body) if path != "raw" else _request(
                base + "/v1/chat/completions", raw=b"{not json")
            if kind == "valid":
                return status == 200 and _well_formed(path, bool(body.get("stream", path == "/v1/responses")), raw)
            return 400 <= status < 500 and status != 404

        work = [("valid", p, b) for p, b in valid] + [("invalid", p, b) for p, b in invalid] + [("invalid", "raw", {})]
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(send, work))  # warm-up: the batching worker, the caches
            rss_before = _rss_bytes(process.pid)
            for _ in range(3):
                results = list(pool.map(send, work * 2))
                failed = [item for item, ok in zip(work * 2, results) if not ok]
                assert not failed, failed
                assert _request(base + "/health")[0] == 200
        rss_after = _rss_bytes(process.pid)
        assert _request(base + "/v1/models")[0] == 200
    assert rss_after - rss_before < 100 * 2**20, (rss_before, rss_after)
