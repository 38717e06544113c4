"""What a server needs from the filter (no web framework here): check a request's prompt, and shape a blocked
request or answer as a normal OpenAI-style chat completion (HTTP 200) carrying the safe text and the verdict's
reason, never an error. The `serve.py` middleware (lightarch.deploy) calls these."""

from __future__ import annotations

import time
import uuid

from .filter import SafetyFilter, SafetyVerdict


def last_user_text(body: dict) -> str:
    """The text of the last user message of a /v1/chat/completions body (string or text parts), or `prompt`."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def verdict_payload(verdict: SafetyVerdict) -> dict:
    """The verdict as JSON: decision, category, one-line explanation, each violation's source."""
    return {"decision": verdict.decision, "category": verdict.category, "explanation": verdict.explanation,
            "violations": [{"source": v.source, "category": v.category, "rule_id": v.rule_id,
                            "span": list(v.span) if v.span else None, "score": v.score, "explanation": v.explanation}
                           for v in verdict.violations]}


def safe_chat_completion(safety: SafetyFilter, verdict: SafetyVerdict, model: str) -> dict:
    """A complete `chat.completion` object whose answer is the safe response (finish_reason "content_filter")."""
    return {"id": f"chatcmpl-safety-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": "content_filter",
                         "message": {"role": "assistant", "content": safety.safe_response(verdict)}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "safety": verdict_payload(verdict)}


def screen_chat_request(safety: SafetyFilter, body: dict) -> dict | None:
    """None when the request may go to the model, else the safe completion to return instead (HTTP 200)."""
    verdict = safety.check(last_user_text(body), role="user")
    return None if verdict.allowed else safe_chat_completion(safety, verdict, str(body.get("model", "")))
