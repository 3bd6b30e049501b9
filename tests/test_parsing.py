"""parsing/openai.py: every bad-input class on both paths, prompt shapes, prompt growth."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skylb_extproc.errors import BadRequest
from skylb_extproc.parsing.openai import (
    is_inference,
    parse_body,
    passthrough_request,
    prompt_text_for_chat,
)
from skylb_extproc.types import RouteRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER_HI = [{"role": "user", "content": "hi"}]


def parse(path: str, body: bytes | dict[str, object], hash_key: str | None = None) -> RouteRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_body("req-1", "POST", path, raw, hash_key=hash_key)


# --- is_inference / passthrough -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", CHAT, True),
        ("POST", COMPLETIONS, True),
        ("POST", CHAT + "?api-version=1", True),
        ("GET", CHAT, False),
        ("POST", "/v1/models", False),
        ("POST", "/v1/chat/completions/", False),
        ("POST", "/v1/embeddings", False),
        ("post", CHAT, False),
    ],
)
def test_is_inference(method: str, path: str, expected: bool) -> None:
    assert is_inference(method, path) is expected


def test_passthrough_request_strips_query() -> None:
    request = passthrough_request("r", "GET", "/v1/models?key=secret", hash_key="k")
    assert request == RouteRequest(
        request_id="r", path="/v1/models", method="GET", hash_key="k", inference=False
    )


def test_parse_body_refuses_non_inference_path() -> None:
    with pytest.raises(ValueError, match="non-inference"):
        parse_body("r", "POST", "/v1/models", b"{}", hash_key=None)


# --- bad inputs: (path, body, message fragment) ------------------------------------------

BOTH = (CHAT, COMPLETIONS)
BODY_ERRORS: list[tuple[str, bytes, str]] = [
    *[(p, b'{"model": "m\xff"}', "not valid UTF-8") for p in BOTH],
    *[(p, b"", "empty") for p in BOTH],
    *[(p, b"   ", "empty") for p in BOTH],
    *[(p, b'{"model": ', "not valid JSON") for p in BOTH],
    *[(p, b"{'model': 'm'}", "not valid JSON") for p in BOTH],
    *[(p, b'{"model": "m", "x": NaN}', "NaN is not valid JSON") for p in BOTH],
    *[(p, b"[" * 100_000, "not valid JSON") for p in BOTH],
    *[(p, b'\xef\xbb\xbf{"model": "m"}', "not valid JSON") for p in BOTH],
    *[(p, b'["model"]', "must be a JSON object, got array") for p in BOTH],
    *[(p, b'"text"', "must be a JSON object, got string") for p in BOTH],
    *[(p, b"null", "must be a JSON object, got null") for p in BOTH],
]

FIELD_ERRORS: list[tuple[str, dict[str, object], str]] = [
    # model
    (CHAT, {"messages": USER_HI}, "'model' is required"),
    (COMPLETIONS, {"prompt": "x"}, "'model' is required"),
    (CHAT, {"model": 7, "messages": USER_HI}, "'model' must be a string, got integer"),
    (COMPLETIONS, {"model": ["m"], "prompt": "x"}, "'model' must be a string, got array"),
    (CHAT, {"model": "", "messages": USER_HI}, "'model' must not be empty"),
    # completions prompt
    (COMPLETIONS, {"model": "m"}, "'prompt' is required"),
    (COMPLETIONS, {"model": "m", "prompt": None}, "'prompt' is required"),
    (COMPLETIONS, {"model": "m", "prompt": 5}, "'prompt' must be a string"),
    (COMPLETIONS, {"model": "m", "prompt": {"text": "x"}}, "got object"),
    (COMPLETIONS, {"model": "m", "prompt": []}, "'prompt' must be"),
    (COMPLETIONS, {"model": "m", "prompt": ["a", 1]}, "'prompt' must be"),
    (COMPLETIONS, {"model": "m", "prompt": [1, -2]}, "'prompt' must be"),
    (COMPLETIONS, {"model": "m", "prompt": [True, False]}, "'prompt' must be"),
    (COMPLETIONS, {"model": "m", "prompt": [[1, 2], []]}, "'prompt' must be"),
    (COMPLETIONS, {"model": "m", "prompt": [[1, 2], [3, "4"]]}, "'prompt' must be"),
    (COMPLETIONS, {"model": "m", "prompt": [[1], 2]}, "'prompt' must be"),
    (COMPLETIONS, {"model": "m", "messages": USER_HI}, "'prompt' is required"),
    # chat messages
    (CHAT, {"model": "m"}, "'messages' is required"),
    (CHAT, {"model": "m", "prompt": "hi"}, "'messages' is required"),
    (CHAT, {"model": "m", "messages": {"role": "user"}}, "'messages' must be an array, got object"),
    (CHAT, {"model": "m", "messages": "hi"}, "'messages' must be an array, got string"),
    (CHAT, {"model": "m", "messages": []}, "'messages' must not be empty"),
    (CHAT, {"model": "m", "messages": ["hi"]}, "'messages[0]' must be an object, got string"),
    (CHAT, {"model": "m", "messages": [*USER_HI, None]}, "'messages[1]' must be an object"),
    (CHAT, {"model": "m", "messages": [{"content": "hi"}]}, "'messages[0].role' must be a string"),
    (CHAT, {"model": "m", "messages": [{"role": 1, "content": "x"}]}, "'messages[0].role'"),
    (CHAT, {"model": "m", "messages": [{"role": "user"}]}, "'messages[0].content' must be"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": 3}]}, "got integer"),
    (
        CHAT,
        {"model": "m", "messages": [{"role": "user", "content": None}]},
        "'messages[0].content' must be a string or an array of content parts, got null",
    ),
    (
        CHAT,
        {"model": "m", "messages": [{"role": "user", "content": ["hi"]}]},
        "'messages[0].content[0]' must be an object, got string",
    ),
    (
        CHAT,
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "'messages[0].content[0].text' must be a string, got null",
    ),
    # stream
    *[
        (p, {"model": "m", "prompt": "x", "messages": USER_HI, "stream": s}, "'stream' must be")
        for p in BOTH
        for s in ("true", 1, 0, [], {})
    ],
    # max tokens
    *[
        (p, {"model": "m", "prompt": "x", "messages": USER_HI, f: v}, f"'{f}' must be")
        for p in BOTH
        for f in ("max_tokens", "max_completion_tokens")
        for v in (-1, 1.5, "10", True, [10])
    ],
]


@pytest.mark.parametrize(("path", "body", "fragment"), BODY_ERRORS)
def test_bad_body_is_rejected(path: str, body: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse(path, body)
    assert fragment in info.value.message
    assert info.value.status == 400


@pytest.mark.parametrize(("path", "body", "fragment"), FIELD_ERRORS)
def test_bad_field_is_rejected(path: str, body: dict[str, object], fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse(path, body)
    assert fragment in info.value.message


# --- good inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ("Hello", "Hello"),
        ("", ""),
        (["a", "b"], "a\nb"),
        ([""], ""),
        ([1, 2, 30], "1 2 30"),
        ([[1, 2], [3]], "1 2\n3"),
    ],
)
def test_completion_prompt_shapes(prompt: object, text: str) -> None:
    assert parse(COMPLETIONS, {"model": "m", "prompt": prompt}).prompt == text


def test_completion_fields() -> None:
    body = {"model": "llama", "prompt": "x", "stream": True, "max_tokens": 7, "extra": {"a": 1}}
    request = parse(COMPLETIONS + "?q=1", body, hash_key="user-1")
    assert request == RouteRequest(
        request_id="req-1",
        path=COMPLETIONS,
        method="POST",
        model="llama",
        prompt="x",
        stream=True,
        max_tokens=7,
        hash_key="user-1",
        inference=True,
    )


@pytest.mark.parametrize(
    ("extra", "stream", "max_tokens"),
    [
        ({}, False, None),
        ({"stream": None, "max_tokens": None}, False, None),
        ({"stream": False, "max_tokens": 0}, False, 0),
        ({"max_completion_tokens": 9}, False, 9),
        ({"max_tokens": 5, "max_completion_tokens": 9}, False, 9),
        ({"max_tokens": 5, "max_completion_tokens": None}, False, 5),
    ],
)
def test_chat_optional_fields(
    extra: dict[str, object], stream: bool, max_tokens: int | None
) -> None:
    request = parse(CHAT, {"model": "m", "messages": USER_HI, **extra})
    assert (request.stream, request.max_tokens) == (stream, max_tokens)


def test_chat_prompt_text() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    request = parse(CHAT, {"model": "m", "messages": messages})
    assert request.prompt == "<|system|>Be brief.\n<|user|>Hi\n"
    assert request.model == "m"


def test_chat_content_parts() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "see "}, image]}]
    text = parse(CHAT, {"model": "m", "messages": messages}).prompt
    assert text == '<|user|>see {"image_url":{"detail":"low","url":"data:x"},"type":"image_url"}\n'


def test_equal_images_give_equal_text_whatever_the_key_order() -> None:
    a = {"type": "image_url", "image_url": {"url": "u", "detail": "low"}}
    b = {"image_url": {"detail": "low", "url": "u"}, "type": "image_url"}
    one = prompt_text_for_chat([{"role": "user", "content": [a]}])
    two = prompt_text_for_chat([{"role": "user", "content": [b]}])
    assert one == two


def test_tool_call_message_may_have_null_content() -> None:
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    text = parse(CHAT, {"model": "m", "messages": messages}).prompt
    assert text.startswith("<|user|>go\n<|assistant|>[{")
    assert text.endswith("<|tool|>42\n")


def test_empty_content_list_is_accepted() -> None:
    assert prompt_text_for_chat([{"role": "user", "content": []}]) == "<|user|>\n"


def test_non_ascii_text_is_kept() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 世界 🙂"}]}
    assert parse(CHAT, json.dumps(body, ensure_ascii=False).encode()).prompt == (
        "<|user|>héllo 世界 🙂\n"
    )


# --- prompt growth: a conversation's text extends the previous turn's text ----------------

roles = st.sampled_from(["system", "user", "assistant", "tool"])
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=20)),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, st.text(max_size=10)),
)
contents = st.one_of(st.text(max_size=40), st.lists(parts, max_size=3))
chat_messages = st.builds(lambda r, c: {"role": r, "content": c}, roles, contents)


@given(history=st.lists(chat_messages, min_size=2, max_size=8))
def test_chat_text_grows_by_appending(history: list[dict[str, object]]) -> None:
    for k in range(1, len(history)):
        shorter = parse(CHAT, {"model": "m", "messages": history[:k]}).prompt
        longer = parse(CHAT, {"model": "m", "messages": history[: k + 1]}).prompt
        assert longer.startswith(shorter)
        assert len(longer) > len(shorter)
