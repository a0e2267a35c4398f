"""The OpenAI API's text endpoints, as bytes in and documents out: `/v1/completions`,
`/v1/chat/completions` and `/v1/models` (what the `openai` client, and every tool built
on it, speaks).

No HTTP here: `parse_completion` / `parse_chat` turn a request body into a checked
`ParsedRequest` (a `lm.TextRequest` and how to answer), and the `*_response` /
`*_chunk` functions build the documents a response or a server-sent event carries.
Every mistake is an `OpenAIError` with its status and the parameter at fault; what
the API has and hxc does not do (n > 1, logprobs, tools, penalties, echo, suffix) is
a 400 that says so, never silently ignored.

Defaults are the API's: temperature 1 and top_p 1 (sampling; `temperature: 0` is
greedy, identical to `hxc generate`), 16 tokens for a completion and the rest of the
context for a chat reply. Extra sampling fields that vLLM also takes: `top_k`,
`ignore_eos`, `stop_token_ids`.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hxc.serve.lm import TextRequest, TextResult, routing_fields
from hxc.serve.protocol import ProtocolError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the API's default for /v1/completions
MAX_STOP_STRINGS = 16
OWNER = "hxc"
# Fields the API has that hxc does not do: refused unless absent or at their neutral value.
_NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "presence_penalty": (0, 0.0),
            "frequency_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False, 0), "top_logprobs": (0,), "tools": ([],),
            "tool_choice": ("none",), "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (False, True),
            "audio": (), "modalities": (["text"],), "prediction": ()}  # fmt: skip
_WHAT = {"n": "n > 1 (several choices per request)", "best_of": "best_of > 1", "echo": "echo", "suffix": "suffix",
         "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias",
         "logprobs": "logprobs", "top_logprobs": "top_logprobs", "tools": "tools (function calling)",
         "tool_choice": "tool_choice (function calling)", "functions": "functions (function calling)",
         "function_call": "function_call (function calling)", "parallel_tool_calls": "parallel_tool_calls",
         "audio": "audio output", "modalities": "modalities other than text", "prediction": "predicted outputs"}  # fmt: skip


class OpenAIError(ProtocolError):
    """A request the API refuses: its status, the parameter at fault, the API's code."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:  # fmt: skip
        super().__init__(message, status, retry_after_s=retry_after_s)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ParsedRequest:
    model: str
    text: TextRequest
    stream: bool
    include_usage: bool
    chat: bool


def error_doc(e: ProtocolError) -> dict[str, Any]:
    """The API's error object for `e`."""
    status = e.status
    kind = ("invalid_request_error" if status < 500 and status not in (401, 404, 429) else
            "authentication_error" if status == 401 else "not_found_error" if status == 404 else
            "rate_limit_error" if status == 429 else "server_error")  # fmt: skip
    code = getattr(e, "code", None) or {404: "model_not_found", 503: "overloaded", 413: "request_too_large"}.get(status)
    return {"error": {"message": str(e), "type": kind, "param": getattr(e, "param", None), "code": code}}


def error_body(e: ProtocolError) -> bytes:
    return json.dumps(error_doc(e)).encode()


# --- requests ----------------------------------------------------------------------------------


def parse_completion(body: bytes) -> ParsedRequest:
    doc = _object(body)
    model = _model(doc)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, list):
        if not prompt:
            raise OpenAIError("'prompt' is empty", param="prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise OpenAIError("'prompt' must be a string or a list of token ids; a batch of several prompts is not supported "
                              "(send one request per prompt)", param="prompt")  # fmt: skip
    elif not isinstance(prompt, str):
        raise OpenAIError("'prompt' must be a string or a list of token ids", param="prompt")
    text = _text_request(doc, prompt=prompt, max_tokens=_max_tokens(doc, ("max_tokens",), COMPLETION_DEFAULT_MAX_TOKENS))
    stream, usage = _stream(doc)
    return ParsedRequest(model, text, stream, usage, chat=False)


def parse_chat(body: bytes) -> ParsedRequest:
    doc = _object(body)
    model = _model(doc)
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects", param="messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        if m.get("tool_calls") or m["role"] in ("tool", "function"):
            raise OpenAIError(f"messages[{i}]: tool calls and tool results are not supported", param=f"messages[{i}]")
        checked.append({"role": m["role"], "content": _content(m.get("content"), i)})
    response_format = doc.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise OpenAIError("response_format other than {\"type\": \"text\"} is not supported", param="response_format")
    max_tokens = _max_tokens(doc, ("max_completion_tokens", "max_tokens"), None)
    text = _text_request(doc, messages=checked, max_tokens=max_tokens)
    stream, usage = _stream(doc)
    return ParsedRequest(model, text, stream, usage, chat=True)


def _object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise OpenAIError(f"the request body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise OpenAIError("the request body must be a JSON object")
    for name, neutral in _NEUTRAL.items():
        value = doc.get(name)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            raise OpenAIError(f"{_WHAT[name]} is not supported by this server", param=name, code="unsupported_parameter")
    return doc


def _model(doc: Mapping[str, Any]) -> str:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("'model' is required: the name of a served model (GET /v1/models lists them)", param="model")
    return model


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(f"messages[{i}]: only text content parts are supported", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise OpenAIError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_tokens(doc: Mapping[str, Any], names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        value = doc.get(name)
        if value is None:
            continue
        if not _integer(value) or value < 1:
            raise OpenAIError(f"'{name}' must be an integer of at least 1, not {json.dumps(value)[:40]}", param=name)
        return value
    return default


def _text_request(doc: Mapping[str, Any], **given: Any) -> TextRequest:
    temperature = doc.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _number(temperature) or not 0 <= temperature <= 2:
        raise OpenAIError(f"'temperature' must be a number from 0 to 2, not {json.dumps(temperature)[:40]}", param="temperature")
    top_p = doc.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _number(top_p) or not 0 < top_p <= 1:
        raise OpenAIError(f"'top_p' must be a number in (0, 1], not {json.dumps(top_p)[:40]}", param="top_p")
    top_k = doc.get("top_k", 0)
    top_k = 0 if top_k is None or top_k == -1 else top_k  # vLLM's -1: every token
    if not _integer(top_k) or top_k < 0:
        raise OpenAIError(f"'top_k' must be 0 (off) or a positive integer, not {json.dumps(top_k)[:40]}", param="top_k")
    seed = doc.get("seed")
    if seed is not None and (not _integer(seed) or not 0 <= seed < 2**63):
        raise OpenAIError(f"'seed' must be a non-negative integer, not {json.dumps(seed)[:40]}", param="seed")
    stop = doc.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else () if stop is None else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise OpenAIError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", param="stop")
    stop_ids = doc.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or not all(_integer(t) for t in stop_ids)):
        raise OpenAIError("'stop_token_ids' must be a list of token ids", param="stop_token_ids")
    ignore_eos = doc.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise OpenAIError("'ignore_eos' must be true or false", param="ignore_eos")
    if ignore_eos and stop_ids:
        raise OpenAIError("'ignore_eos' and 'stop_token_ids' do not go together", param="ignore_eos")
    routing = routing_fields(doc, lambda message, name: OpenAIError(message, param=name))
    return TextRequest(temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed, stop=stops,
                       stop_token_ids=tuple(stop_ids) if stop_ids else None, ignore_eos=ignore_eos, **routing, **given)  # fmt: skip


def _stream(doc: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise OpenAIError("'stream' must be true or false", param="stream")
    options = doc.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise OpenAIError("'stream_options' is only allowed with 'stream': true", param="stream_options")
    if not isinstance(options, dict):
        raise OpenAIError("'stream_options' must be an object", param="stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise OpenAIError("'stream_options.include_usage' must be true or false", param="stream_options")
    return stream, usage


# --- responses ---------------------------------------------------------------------------------


class Response:
    """The documents of one request's answer: ids and timestamps fixed at the start."""

    def __init__(self, request: ParsedRequest) -> None:
        self.request = request
        self.chat = request.chat
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.request.model,
                "system_fingerprint": None}  # fmt: skip

    def whole(self, result: TextResult) -> dict[str, Any]:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": result.finish_reason}  # fmt: skip
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": usage(result)}

    def chunk(self, text: str | None = None, *, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed chunk: new text, or the last one (with finish_reason)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            object_ = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            object_ = "text_completion"
        doc = {**self._head(object_), "choices": [choice]}
        if self.request.include_usage:
            doc["usage"] = None  # every chunk but the last says there is none yet
        return doc

    def usage_chunk(self, result: TextResult) -> dict[str, Any]:
        """The last chunk of `stream_options.include_usage`: no choices, the usage."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": usage(result)}


def usage(result: TextResult) -> dict[str, Any]:
    # `slo_missed` beside OpenAI's counts: whether the request missed a target of its own
    # (ttft_ms, tpot_ms, slo_ms), as predicted when it was routed or as measured.
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens, "slo_missed": result.slo_missed}  # fmt: skip


def models_list(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_doc(n, created) for n in names]}


def model_doc(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


def sse(doc: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: {json}` (or `data: [DONE]`) and a blank line."""
    data = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()
