"""vLLM's OpenAI-server wire format for the simulated replica: request reading, bodies, chunks.

Shapes follow vLLM's pydantic models as it serialises them (compact JSON):
- non-streaming bodies are `model_dump()`: every field, nulls included;
- chat chunks are `model_dump_json(exclude_unset=True)`: the first carries
  `delta: {"role": "assistant", "content": ""}`, later ones `delta: {"content": ...}`, and the last
  one adds `finish_reason` and `stop_reason`; completion chunks use `exclude_unset=False` (so
  `"usage": null` appears in each);
- the usage chunk (`stream_options.include_usage`) has `choices: []`, then comes `data: [DONE]`.
- errors: `{"error": {"message", "type", "param", "code"}}` with `code` = the HTTP status.

`usage.prompt_tokens_details.cached_tokens` is always present here; real vLLM adds it only with
`--enable-prompt-tokens-details` and only when it is non-zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from skylb_extproc.errors import BadRequest
from skylb_extproc.parsing.openai import prompt_text_for_chat

CHAT = "chat"
COMPLETION = "completion"
# vLLM: 16 for completions; for chat it defaults to max_model_len - prompt tokens, which without
# an EOS model would generate for minutes: the simulator uses 64.
DEFAULT_MAX_TOKENS = {COMPLETION: 16, CHAT: 64}
GENERATION_PROMPT = "<|assistant|>"  # what a chat template appends before the model's answer

_FILLER = " lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor."
_FILLER = _FILLER + " " * (-len(_FILLER) % 4)  # 4 characters per token, like the estimate


class ApiError(Exception):
    """An error answered as vLLM's ErrorResponse."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.err_type, "param": self.param}
        return dumps({"error": {**error, "code": self.status}})


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


@dataclass(frozen=True, slots=True)
class SimRequest:
    """What the simulated engine needs from a request body."""

    kind: str  # CHAT | COMPLETION
    model: str
    prompt: str
    max_tokens: int
    stream: bool
    include_usage: bool


def dumps(obj: object) -> bytes:
    """Compact JSON, as pydantic's model_dump_json and Starlette's JSONResponse write it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def filler_text(start: int, count: int) -> str:
    """Deterministic output text of tokens [start, start + count): 4 characters per token."""
    size = len(_FILLER)
    begin = (4 * start) % size
    reps = (begin + 4 * count) // size + 1
    return (_FILLER * reps)[begin : begin + 4 * count]


def parse_request(kind: str, raw: bytes, *, served_model: str, strict_model: bool) -> SimRequest:
    """Read and validate a body; raises ApiError (400, or 404 for an unknown model when strict)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("Request body must be a JSON object.")
    model = _model(data, served_model, strict_model)
    prompt = _chat_prompt(data) if kind == CHAT else _completion_prompt(data)
    stream = _optional(data, "stream", bool, False)
    options = _optional(data, "stream_options", dict, None)
    if options is not None and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream")
    if _optional(data, "n", int, 1) != 1:
        raise bad_request("The simulated replica supports only n=1.", "n")
    _optional(data, "ignore_eos", bool, False)  # accepted; the simulator never stops early
    return SimRequest(
        kind=kind,
        model=model,
        prompt=prompt,
        max_tokens=_max_tokens(data, kind),
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
    )


def _optional(data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"'{key}' must be of type {kind.__name__}.", key)
    return value


def _model(data: dict[str, Any], served_model: str, strict: bool) -> str:
    model = _optional(data, "model", str, served_model)
    assert isinstance(model, str)
    if strict and model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return model


def _max_tokens(data: dict[str, Any], kind: str) -> int:
    value = DEFAULT_MAX_TOKENS[kind]
    fields = ("max_tokens", "max_completion_tokens") if kind == CHAT else ("max_tokens",)
    for key in fields:  # the newer max_completion_tokens wins, as in vLLM
        value = _optional(data, key, int, value)
    return int(value)


def _chat_prompt(data: dict[str, Any]) -> str:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", "messages")
    try:
        return prompt_text_for_chat(messages) + GENERATION_PROMPT
    except BadRequest as exc:
        raise bad_request(exc.message, "messages") from None


def _completion_prompt(data: dict[str, Any]) -> str:
    """One prompt: a string, or a single-element batch, or token ids (rendered as text)."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        return " ".join(map(str, prompt))
    raise bad_request(
        "'prompt' must be a string or token ids (one prompt per request in the simulator).",
        "prompt",
    )


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- response bodies ----------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, object]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def full_body(
    req: SimRequest, rid: str, created: int, text: str, usage_: dict[str, object]
) -> bytes:
    """The non-streaming response; finish_reason is always "length" (no EOS is simulated)."""
    head = {"id": rid, "object": _object(req, chunk=False), "created": created, "model": req.model}
    if req.kind == CHAT:
        message: dict[str, object] = {
            "role": "assistant",
            "content": text,
            "reasoning_content": None,
            "tool_calls": [],
        }
        choice: dict[str, object] = {"index": 0, "message": message, "logprobs": None}
        choice.update(finish_reason="length", stop_reason=None)
        return dumps({**head, "choices": [choice], "usage": usage_, "prompt_logprobs": None})
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
    choice.update(stop_reason=None, prompt_logprobs=None)
    return dumps({**head, "choices": [choice], "usage": usage_})


def stream_chunks(
    req: SimRequest, rid: str, created: int, *, first: bool, text: str, last: bool
) -> list[bytes]:
    """SSE events for new output text; a chat stream opens with the role chunk."""
    head = {"id": rid, "object": _object(req, chunk=True), "created": created, "model": req.model}
    events: list[bytes] = []
    if req.kind == CHAT:
        if first:
            delta: dict[str, object] = {"role": "assistant", "content": ""}
            opening = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            events.append(_sse({**head, "choices": [opening]}))
        choice: dict[str, object] = {"index": 0, "delta": {"content": text}, "logprobs": None}
        if last:
            choice.update(finish_reason="length", stop_reason=None)
        else:
            choice["finish_reason"] = None
        events.append(_sse({**head, "choices": [choice]}))
        return events
    finish = "length" if last else None
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    choice["stop_reason"] = None
    events.append(_sse({**head, "choices": [choice], "usage": None}))
    return events


def usage_chunk(req: SimRequest, rid: str, created: int, usage_: dict[str, object]) -> bytes:
    head = {"id": rid, "object": _object(req, chunk=True), "created": created, "model": req.model}
    return _sse({**head, "choices": [], "usage": usage_})


DONE = b"data: [DONE]\n\n"


def _sse(obj: object) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def _object(req: SimRequest, *, chunk: bool) -> str:
    if req.kind == CHAT:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"
