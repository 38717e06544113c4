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
from pathlib import Path

import pytest
import torch
from conftest import tiny_sparse_moe_config
from deploy_helpers import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lightarch import SparseMoeForCausalLM
from lightarch.deploy.serving import (
    TokenBudgetMiddleware,
    check_servable_folder,
    cpu_continuous_batching_config,
    paged_cache_bytes,
    request_token_budget,
)
from lightarch.data.tokenizers import byte_level_tokenizer

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

    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "serve.py"), "--model_dir", str(folder), "--port", str(port),
         "--host", "127.0.0.1", "--max_concurrent_requests", "4"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


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
