"""The KServe / Triton generate extension, as bytes in and documents out:
`POST /v2/models/{name}/generate` (one JSON answer) and `/generate_stream` (server-sent
events, one per piece of text).

    {"text_input": "Once upon a time", "parameters": {"max_tokens": 32, "temperature": 0}}
    -> {"model_name": "llm", "model_version": "1", "text_output": "...",
        "finish_reason": "length", "prompt_tokens": 6, "completion_tokens": 32}

Sampling and limits go in `parameters` (KServe's place) or beside `text_input` (where
Triton's LLM models take them): max_tokens, temperature, top_p, top_k, seed, stop
(a string or a list), ignore_eos, stop_token_ids; and routing: ttft_ms, tpot_ms, slo_ms,
policy, precision (as the OpenAI endpoints take them). Defaults are `hxc generate`'s:
greedy, 64 new tokens. Answers say the device and `slo_missed`. Errors are KServe's
`{"error": "..."}` with their status.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hxc.serve.lm import ROUTING_FIELDS, TextRequest, TextResult, routing_fields
from hxc.serve.protocol import ProtocolError

DEFAULT_MAX_TOKENS = 64  # as `hxc generate`
_PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stop_token_ids", *ROUTING_FIELDS)


def parse_generate(body: bytes) -> tuple[TextRequest, str | None]:
    """The request and its `id` (echoed back), checked."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"the request body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request body must be a JSON object")
    text = doc.get("text_input")
    if not isinstance(text, str):
        raise ProtocolError("'text_input' must be a string (the prompt)")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be a JSON object")
    given = {**params, **{k: doc[k] for k in _PARAMETERS if k in doc}}
    if (stream := given.get("stream")) is not None and not isinstance(stream, bool):
        raise ProtocolError("parameter 'stream' must be true or false")

    def number(name: str, default: float, ok) -> float:
        value = given.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ProtocolError(f"parameter {name!r} is out of range or not a number: {json.dumps(value)[:40]}")
        return float(value)

    def integer(name: str, default: int | None, low: int) -> int | None:
        value = given.get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ProtocolError(f"parameter {name!r} must be an integer of at least {low}, not {json.dumps(value)[:40]}")
        return value

    stop = given.get("stop", given.get("stop_words"))
    stops = (stop,) if isinstance(stop, str) and stop else tuple(stop) if isinstance(stop, list) else () if not stop else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise ProtocolError("parameter 'stop' must be a non-empty string or a list of them")
    ignore_eos = given.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ProtocolError("parameter 'ignore_eos' must be true or false")
    stop_ids = given.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        raise ProtocolError("parameter 'stop_token_ids' must be a list of token ids")
    request = TextRequest(
        prompt=text, max_tokens=integer("max_tokens", DEFAULT_MAX_TOKENS, 1),
        temperature=number("temperature", 0.0, lambda v: v >= 0), top_p=number("top_p", 1.0, lambda v: 0 < v <= 1),
        top_k=integer("top_k", 0, 0) or 0, seed=integer("seed", None, 0), stop=stops, ignore_eos=ignore_eos,
        stop_token_ids=tuple(stop_ids) if stop_ids is not None else None,
        **routing_fields(given, lambda message, name: ProtocolError(f"parameter {message}")),
    )  # fmt: skip
    return request, request_id


def response(model: str, version: str, result: TextResult, request_id: str | None) -> dict[str, Any]:
    doc = {"model_name": model, "model_version": version, "text_output": result.text, "finish_reason": result.finish_reason,
           "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "device": result.device,
           "slo_missed": result.slo_missed}  # fmt: skip
    return {**doc, "id": request_id} if request_id is not None else doc


def chunk(model: str, version: str, text: str, request_id: str | None, result: TextResult | None = None) -> dict[str, Any]:
    """One streamed event: a piece of text; the last one also says how it ended."""
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "text_output": text}
    if result is not None:
        doc.update(finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                   completion_tokens=result.completion_tokens, device=result.device, slo_missed=result.slo_missed)  # fmt: skip
    return {**doc, "id": request_id} if request_id is not None else doc


def metadata(model: str, version: str, platform: str) -> dict[str, Any]:
    """A language model's KServe metadata: text in, text out (what the generate extension takes)."""
    return {"name": model, "versions": [version], "platform": platform,
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]}  # fmt: skip
