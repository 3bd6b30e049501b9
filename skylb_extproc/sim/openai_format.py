"""vLLM's OpenAI-server wire format for the simulated replica: request reading, bodies, chunks.

Shapes are those of vLLM 0.32 (checked against the real server by tests/contract, which runs the
same assertions on both and compares their shapes key by key):
- non-streaming bodies are `model_dump()`: every field, nulls included;
- chat chunks: the first carries `delta: {"role": "assistant", "content": ""}` (and
  `prompt_token_ids` / `prompt_text`, null), later ones `delta: {"content": ...}` with
  `token_ids: null`, the last one adds `finish_reason` and `stop_reason`; completion chunks carry
  `stop_reason`, `prompt_token_ids` and `token_ids` in every choice; no chunk has a `usage` key
  except the usage chunk (`stream_options.include_usage`: `choices: []`), and the chunk that ends
  the stream (the usage chunk, else the last one) carries `system_fingerprint`; then
  `data: [DONE]`;
- `usage.prompt_tokens_details` always holds `cached_tokens` (with `--enable-prompt-tokens-details`,
  which our vLLM replicas set); chat responses add `created_cache_tokens` (full prompt blocks this
  request wrote to the cache);
- errors: `{"error": {"message", "type", "param", "code"}}` with `code` = the HTTP status; request
  validation (pydantic) answers type "Bad Request" with `param` = the field's location
  (`body.max_tokens`), vLLM's own checks answer "BadRequestError" with the parameter's name and
  end their message with `(parameter=..., value=...)`;
- a prompt plus max_tokens longer than max_model_len is not an error: generation stops there.
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


SYSTEM_FINGERPRINT = "vllm-0.32.0-sim"


def bad_request(message: str, param: str | None = None, value: object = None) -> ApiError:
    """vLLM's own checks: the message ends with `(parameter=..., value=...)` when it has one."""
    if param is not None:
        extra = f", value={value}" if value is not None else ""
        message = f"{message} (parameter={param}{extra})"
    return ApiError(400, message, "BadRequestError", param)


def validation_error(kind: str, loc: str, msg: str, value: object) -> ApiError:
    """The request failed vLLM's pydantic model: type "Bad Request", param = the location."""
    detail = {"type": kind, "loc": loc, "msg": msg, "input": _describe(value)}
    return ApiError(400, f"1 validation error:\n  {detail}", "Bad Request", loc)


def _describe(value: object) -> str:
    # pydantic's error rendering as vLLM passes it on: containers by size, scalars as text
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return str(value)


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


def parse_request(
    kind: str, raw: bytes, *, served_model: str, strict_model: bool, max_model_len: int
) -> SimRequest:
    """Read and validate a body as vLLM does; raises ApiError (400, or 404 for an unknown model
    when strict). Checks run in vLLM's order: the request model's fields, then its own rules."""
    data = _json_object(raw)
    model = _model(data, served_model, strict_model)
    stream = _bool(data, "stream", False)
    max_tokens = _max_tokens(data, kind)
    if kind == CHAT:
        messages = _messages(data)
    options = data.get("stream_options")
    if options is not None and not stream:
        raise bad_request(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    if _lax_int(data, "n", 1) != 1:
        raise bad_request("The simulated replica supports only n=1.", "n")
    _bool(data, "ignore_eos", False)  # accepted; the simulator never stops early
    if max_tokens < 1:
        raise bad_request(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
    if max_tokens > max_model_len:
        raise bad_request(
            f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            "max_tokens",
            max_tokens,
        )
    prompt = _chat_prompt(messages) if kind == CHAT else _completion_prompt(data)
    return SimRequest(
        kind=kind,
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


def check_prompt_length(tokens: int, max_model_len: int) -> None:
    """vLLM's rule on the tokenized prompt (it counts at most max_model_len + 1 tokens)."""
    if tokens > max_model_len:
        counted = max_model_len + 1
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains at least {counted} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            counted,
        )


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise validation_error("missing", "body", "Field required", None)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        loc = f"body.{exc.pos}"
        raise validation_error("json_invalid", loc, "JSON decode error", {}) from None
    except UnicodeDecodeError:
        raise validation_error("json_invalid", "body", "JSON decode error", {}) from None
    if not isinstance(data, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise validation_error("model_attributes_type", "body", msg, data)
    return data


def _bool(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        msg = "Input should be a valid boolean, unable to interpret input"
        raise validation_error("bool_parsing", f"body.{key}", msg, value)
    return value


def _lax_int(data: dict[str, Any], key: str, default: int) -> int:
    """pydantic's lax integers: 5, 5.0 and "5" are 5; 1.5, "x" and true are errors."""
    value = data.get(key)
    if value is None:
        return default
    loc = f"body.{key}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise validation_error("int_type", loc, "Input should be a valid integer", value)
    if isinstance(value, float):
        if not value.is_integer():
            msg = "Input should be a valid integer, got a number with a fractional part"
            raise validation_error("int_from_float", loc, msg, value)
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            msg = "Input should be a valid integer, unable to parse string as an integer"
            raise validation_error("int_parsing", loc, msg, value) from None
    return value


def _model(data: dict[str, Any], served_model: str, strict: bool) -> str:
    model = data.get("model")
    if model is None:
        return served_model
    if not isinstance(model, str):
        raise validation_error("string_type", "body.model", "Input should be a valid string", model)
    if strict and model != served_model:
        message = f"The model `{model}` does not exist. Valid aliases: {served_model}."
        raise ApiError(404, message, "NotFoundError", "model")
    return model


def _max_tokens(data: dict[str, Any], kind: str) -> int:
    value = DEFAULT_MAX_TOKENS[kind]
    fields = ("max_tokens", "max_completion_tokens") if kind == CHAT else ("max_tokens",)
    for key in fields:  # the newer max_completion_tokens wins, as in vLLM
        value = _lax_int(data, key, value)
    return value


def _messages(data: dict[str, Any]) -> list[Any]:
    messages = data.get("messages")
    if messages is None:
        raise validation_error("missing", "body.messages", "Field required", data)
    if not isinstance(messages, list):
        raise validation_error(
            "list_type", "body.messages", "Input should be a valid list", messages
        )
    if not messages:
        raise bad_request(
            "Cannot apply chat template to an empty conversation. Provide at least one message."
        )
    return messages


def _chat_prompt(messages: list[Any]) -> str:
    try:
        return prompt_text_for_chat(messages) + GENERATION_PROMPT
    except BadRequest as exc:
        # vLLM's message union reports every variant; the location is what clients act on.
        raise validation_error("missing", "body.messages", exc.message, messages) from None


def _completion_prompt(data: dict[str, Any]) -> str:
    """One prompt: a string, or a single-element batch, or token ids (rendered as text)."""
    prompt = data.get("prompt")
    if prompt is None or prompt in ("", []):
        raise bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
        )
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        return " ".join(map(str, prompt))
    if not isinstance(prompt, list):
        raise validation_error(
            "string_type", "body.prompt", "Input should be a valid string", prompt
        )
    raise bad_request("The simulated replica serves one prompt per request.", "prompt")


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- response bodies ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    created_cache_tokens: int  # full prompt blocks this request computed and cached


def usage_body(req: SimRequest, u: Usage, *, chunk: bool) -> dict[str, object]:
    """`usage` as vLLM 0.32 serialises it: the details differ by endpoint and by streaming."""
    details: dict[str, object] = {"cached_tokens": u.cached_tokens}
    if req.kind == CHAT:
        details["created_cache_tokens"] = u.created_cache_tokens
    elif not chunk:
        details["created_cache_tokens"] = None
    if not chunk:
        details["multimodal_tokens"] = None
    body: dict[str, object] = {
        "prompt_tokens": u.prompt_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "completion_tokens": u.completion_tokens,
        "prompt_tokens_details": details,
    }
    if not chunk:
        body["completion_tokens_details"] = None
    return body


def full_body(req: SimRequest, rid: str, created: int, text: str, u: Usage) -> bytes:
    """The non-streaming response; finish_reason is always "length" (no EOS is simulated)."""
    head = {"id": rid, "object": _object(req, chunk=False), "created": created, "model": req.model}
    tail = {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
    if req.kind == CHAT:
        message: dict[str, object] = {"role": "assistant", "content": text}
        message.update(refusal=None, annotations=None, audio=None, function_call=None)
        message["reasoning"] = None
        choice: dict[str, object] = {"index": 0, "message": message, "logprobs": None}
        choice.update(finish_reason="length", stop_reason=None, token_ids=None)
        choice["routed_experts"] = None
        prompt_info = {"prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        choice.update(stop_reason=None, token_ids=None, prompt_logprobs=None)
        choice.update(prompt_token_ids=None, routed_experts=None)
        prompt_info = {}
    return dumps(
        {
            **head,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage_body(req, u, chunk=False),
            **prompt_info,
            **tail,
        }
    )


def stream_chunks(
    req: SimRequest, rid: str, created: int, *, first: bool, text: str, last: bool
) -> list[bytes]:
    """SSE events for new output text; a chat stream opens with the role chunk."""
    head = {"id": rid, "object": _object(req, chunk=True), "created": created, "model": req.model}
    # The chunk that ends the stream names the engine, unless a usage chunk follows.
    ending = {"system_fingerprint": SYSTEM_FINGERPRINT} if last and not req.include_usage else {}
    events: list[bytes] = []
    finish: dict[str, object] = (
        {"finish_reason": "length", "stop_reason": None} if last else {"finish_reason": None}
    )
    if req.kind == CHAT:
        if first:
            delta: dict[str, object] = {"role": "assistant", "content": ""}
            opening = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            prompt_info = {"prompt_token_ids": None, "prompt_text": None}
            events.append(_sse({**head, "choices": [opening], **prompt_info}))
        choice: dict[str, object] = {"index": 0, "delta": {"content": text}, "logprobs": None}
        choice.update(finish, token_ids=None)
        events.append(_sse({**head, "choices": [choice], **ending}))
        return events
    choice = {"index": 0, "text": text, "logprobs": None, **finish}
    choice.update(stop_reason=None, prompt_token_ids=None, token_ids=None)
    events.append(_sse({**head, "choices": [choice], **ending}))
    return events


def usage_chunk(req: SimRequest, rid: str, created: int, u: Usage) -> bytes:
    head = {"id": rid, "object": _object(req, chunk=True), "created": created, "model": req.model}
    usage = usage_body(req, u, chunk=True)
    return _sse({**head, "choices": [], "usage": usage, "system_fingerprint": SYSTEM_FINGERPRINT})


DONE = b"data: [DONE]\n\n"


def _sse(obj: object) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def _object(req: SimRequest, *, chunk: bool) -> str:
    if req.kind == CHAT:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"
