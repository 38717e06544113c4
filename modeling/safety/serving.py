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


# ---------------------------------------------------------------------- every generating route, streamed or not
# (What the serve.py middleware, lightarch.deploy.serving.SafetyMiddleware, reads and writes on each OpenAI route.)
CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
FILTER_ERROR_TEXT = ("This answer was stopped: the server's safety filter failed while checking it, so the rest is "
                     "withheld. Please try again later.")


def _parts_text(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and isinstance(p.get("text"), str))


def request_text(path: str, body: dict) -> str:
    """The user text of a request on `path`: the last user message (chat, and a responses `input` list), the
    `prompt` (completions), or a responses `input` string / text parts; "" when there is none (the request's own
    validation then answers it)."""
    if path == RESPONSES:
        value = body.get("input")
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" not in value[0]:
            return _parts_text(value)
        users = [item for item in value or [] if isinstance(item, dict) and item.get("role") == "user"]
        return _parts_text(users[-1].get("content")) if users else ""
    return last_user_text(body)


def answer_text(path: str, payload: dict) -> str:
    """The assistant text of a non-streamed answer on `path` ("" when it has none, e.g. only tool calls)."""
    if path == RESPONSES:
        return "".join(_parts_text(item.get("content")) for item in payload.get("output") or []
                       if isinstance(item, dict) and item.get("type") == "message")
    choice = (payload.get("choices") or [{}])[0]
    if path == COMPLETIONS:
        return choice.get("text") or ""
    return _parts_text((choice.get("message") or {}).get("content"))


def delta_text(path: str, event: dict) -> str:
    """The new assistant text one streamed SSE event carries ("" for role, tool-call, usage and lifecycle events)."""
    if path == RESPONSES:
        delta = event.get("delta") if event.get("type") == "response.output_text.delta" else None
        return delta if isinstance(delta, str) else ""
    choice = (event.get("choices") or [{}])[0]
    if path == COMPLETIONS:
        return choice.get("text") or ""
    content = (choice.get("delta") or {}).get("content")
    return content if isinstance(content, str) else ""


def _response_message(text: str) -> dict:
    return {"type": "message", "id": f"msg-safety-{uuid.uuid4().hex[:12]}", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def replace_answer(path: str, payload: dict, text: str, safety_json: dict) -> dict:
    """`payload` (a non-streamed answer on `path`) with its assistant text replaced by `text`, the finish reason
    "content_filter" (responses: status "incomplete", reason "content_filter") and the verdict under `safety`."""
    payload = dict(payload, safety=safety_json)
    if path == RESPONSES:
        payload.update(output=[_response_message(text)], status="incomplete",
                       incomplete_details={"reason": "content_filter"}, output_text=text)
        return payload
    choice = dict((payload.get("choices") or [{}])[0], index=0, finish_reason="content_filter")
    if path == COMPLETIONS:
        choice["text"] = text
    else:
        choice["message"] = {"role": "assistant", "content": text}
    payload["choices"] = [choice]
    return payload


def safe_completion(path: str, safety: SafetyFilter, verdict: SafetyVerdict, model: str) -> dict:
    """A complete answer object of the route's kind (chat.completion, text_completion or response) whose text is the
    safe response to a blocked prompt, with the verdict under `safety` (returned with HTTP 200)."""
    if path == CHAT:
        return safe_chat_completion(safety, verdict, model)
    shell = ({"id": f"resp-safety-{uuid.uuid4().hex[:12]}", "object": "response", "created_at": int(time.time()),
              "model": model, "output": []} if path == RESPONSES else
             {"id": f"cmpl-safety-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
              "model": model, "choices": [{"index": 0, "text": ""}],
              "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
    return replace_answer(path, shell, safety.safe_response(verdict), verdict_payload(verdict))


def safe_stream_event(path: str, text: str, safety_json: dict, last_event: dict | None) -> dict:
    """The final SSE event of a stream stopped by the filter: the safe `text`, finish reason "content_filter" and
    the verdict under `safety`; ids and model copied from `last_event` (the last event forwarded) when there is one."""
    last = last_event or {}
    if path == RESPONSES:
        response = dict(last.get("response") or {"id": f"resp-safety-{uuid.uuid4().hex[:12]}", "object": "response"})
        return {"type": "response.incomplete",
                "response": replace_answer(path, response, text, safety_json)}
    event = {key: last[key] for key in ("id", "created", "model") if key in last}
    event["object"] = "text_completion" if path == COMPLETIONS else "chat.completion.chunk"
    choice = {"index": 0, "finish_reason": "content_filter"}
    if path == COMPLETIONS:
        choice["text"] = text
    else:
        choice["delta"] = {"content": text}
    return dict(event, choices=[choice], safety=safety_json)


def filter_error_payload(error: BaseException, where: str) -> dict:
    """The `safety` field when the filter itself failed (`where`: "prompt" or "answer"): fail closed, say why."""
    return {"decision": "error", "category": None, "violations": [],
            "explanation": f"the safety filter failed while checking the {where} ({type(error).__name__}: {error}); "
                           "failing closed"}
