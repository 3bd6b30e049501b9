"""OpenAI-style request bodies -> RouteRequest.

The router needs four things from a body: the model, the prompt text (for prefix affinity), whether
the client streams, and max_tokens. Everything else passes through untouched: we never rewrite the
body, so we validate only what we read — but that strictly, because a body the balancer cannot
read is a 400 at the balancer, with a message naming the field, never a 500 at a replica.

The prompt text of a chat is `<|role|>content\\n` per message, so a conversation that grows by one
turn yields a text that *starts with* the previous turn's text: prefix hashing then sees the
shared history. Non-text content parts contribute their canonical JSON so that equal images or
tool calls hash equally.

The body is decoded and parsed exactly once (a 220 KB prompt must not be copied twice).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NoReturn

from skylb_extproc.errors import BadRequest
from skylb_extproc.types import RouteRequest

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
INFERENCE_PATHS = (COMPLETIONS_PATH, CHAT_PATH)

_JSON_TYPE_NAMES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


def _strip_query(path: str) -> str:
    """Drop `?query` (and `#fragment`): routing ignores them, and they may carry secrets."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return path


def is_inference(method: str, path: str) -> bool:
    """True for a POST on one of INFERENCE_PATHS; the query string is ignored."""
    return method == "POST" and _strip_query(path) in INFERENCE_PATHS


def passthrough_request(
    request_id: str, method: str, path: str, *, hash_key: str | None
) -> RouteRequest:
    """A request the router sends to the least-loaded replica without reading its body."""
    return RouteRequest(
        request_id=request_id,
        path=_strip_query(path),
        method=method,
        hash_key=hash_key,
        inference=False,
    )


def parse_body(
    request_id: str, method: str, path: str, body: bytes, *, hash_key: str | None
) -> RouteRequest:
    """Validate and read an inference body; raises BadRequest naming the offending field.

    `path` must be one of INFERENCE_PATHS (query ignored): callers check `is_inference` first.
    """
    clean_path = _strip_query(path)
    if clean_path not in INFERENCE_PATHS:
        raise ValueError(f"parse_body called for a non-inference path: {path!r}")
    data = _load_object(body)
    model = _model(data)
    if clean_path == CHAT_PATH:
        prompt = prompt_text_for_chat(_messages(data))
    else:
        prompt = _completion_prompt(data)
    return RouteRequest(
        request_id=request_id,
        path=clean_path,
        method=method,
        model=model,
        prompt=prompt,
        stream=_stream(data),
        max_tokens=_max_tokens(data),
        hash_key=hash_key,
        inference=True,
    )


def prompt_text_for_chat(messages: list[object]) -> str:
    """`<|role|>content\\n` per message: appending a turn appends to the text (prefix growth).

    Raises BadRequest when a message or one of its content parts has the wrong shape.
    """
    pieces: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            _bad(f"'{where}' must be an object, got {_json_type(message)}.")
        role = message.get("role")
        if not isinstance(role, str):
            _bad(f"'{where}.role' must be a string, got {_json_type(role)}.")
        pieces.append(f"<|{role}|>")
        _append_content(pieces, message, where)
        pieces.append("\n")
    return "".join(pieces)


# --- body and field readers ---------------------------------------------------------------


def _bad(message: str) -> NoReturn:
    raise BadRequest(message)


def _json_type(value: object) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> NoReturn:
    # json accepts NaN/Infinity, which are not JSON; a replica's strict parser would 400 later.
    raise ValueError(f"{name} is not valid JSON")


def _load_object(body: bytes) -> dict[str, Any]:
    """Strict UTF-8 (json.loads(bytes) would also accept UTF-16/32 and lone surrogates)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        _bad(f"Request body is not valid UTF-8 (invalid byte at offset {exc.start}).")
    if not text.strip():
        _bad("Request body is empty; expected a JSON object.")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        _bad(f"Request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).")
    except ValueError as exc:
        _bad(f"Request body is not valid JSON: {exc}.")
    except RecursionError:
        _bad("Request body is not valid JSON: nested too deeply.")
    if not isinstance(data, dict):
        _bad(f"Request body must be a JSON object, got {_json_type(data)}.")
    return data


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if model is None:
        _bad("'model' is required.")
    if not isinstance(model, str):
        _bad(f"'model' must be a string, got {_json_type(model)}.")
    if not model:
        _bad("'model' must not be empty.")
    return model


def _stream(data: dict[str, Any]) -> bool:
    """`stream` is `boolean | null` in the OpenAI schema; null means the default, false."""
    stream = data.get("stream")
    if stream is None:
        return False
    if not isinstance(stream, bool):
        _bad(f"'stream' must be a boolean, got {_json_type(stream)}.")
    return stream


def _max_tokens(data: dict[str, Any]) -> int | None:
    """`max_completion_tokens` (the newer name) wins over `max_tokens`, as in vLLM."""
    result: int | None = None
    for field in ("max_tokens", "max_completion_tokens"):
        value = data.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _bad(f"'{field}' must be a non-negative integer, got {_describe(value)}.")
        result = value
    return result


def _describe(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _json_type(value)


def _messages(data: dict[str, Any]) -> list[object]:
    messages = data.get("messages")
    if messages is None:
        _bad(f"'messages' is required for {CHAT_PATH}.")
    if not isinstance(messages, list):
        _bad(f"'messages' must be an array, got {_json_type(messages)}.")
    if not messages:
        _bad("'messages' must not be empty.")
    return messages


def _append_content(pieces: list[str], message: dict[str, Any], where: str) -> None:
    """Append a message's content; null content is valid only beside tool/function calls."""
    content = message.get("content")
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, list):
        _append_parts(pieces, content, where)
    elif content is None and ("tool_calls" in message or "function_call" in message):
        pass
    else:
        _bad(
            f"'{where}.content' must be a string or an array of content parts, "
            f"got {_json_type(content)}."
        )
    # Tool calls are part of the history the engine caches: keep them in the prefix text.
    for key in ("tool_calls", "function_call"):
        if message.get(key) is not None:
            pieces.append(_canonical(message[key]))


def _append_parts(pieces: list[str], parts: list[object], where: str) -> None:
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            _bad(f"'{where}.content[{j}]' must be an object, got {_json_type(part)}.")
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                _bad(f"'{where}.content[{j}].text' must be a string, got {_json_type(text)}.")
            pieces.append(text)
        else:
            pieces.append(_canonical(part))


def _canonical(value: object) -> str:
    """Key-sorted compact JSON: equal images/tool calls give equal text, hence equal hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _completion_prompt(data: dict[str, Any]) -> str:
    if "prompt" not in data or data["prompt"] is None:
        _bad(f"'prompt' is required for {COMPLETIONS_PATH}.")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        for reader in _PROMPT_LIST_READERS:
            text = reader(prompt)
            if text is not None:
                return text
    _bad(
        "'prompt' must be a string, an array of strings, an array of token ids "
        f"or an array of token-id arrays (non-empty), got {_json_type(prompt)}."
    )


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _strings(prompt: list[object]) -> str | None:
    strings = [p for p in prompt if isinstance(p, str)]
    return "\n".join(strings) if len(strings) == len(prompt) else None


def _tokens(prompt: list[object]) -> str | None:
    if all(_is_token(t) for t in prompt):
        return " ".join(map(str, prompt))
    return None


def _token_lists(prompt: list[object]) -> str | None:
    lines: list[str] = []
    for item in prompt:
        if not isinstance(item, list) or not item:
            return None
        line = _tokens(item)
        if line is None:
            return None
        lines.append(line)
    return "\n".join(lines)


_PROMPT_LIST_READERS: tuple[Callable[[list[object]], str | None], ...] = (
    _strings,
    _tokens,
    _token_lists,
)
