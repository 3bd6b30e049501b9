"""A deterministic multi-turn chat workload (same seed => same conversations, byte for byte).

Each conversation has its own system prompt and a fixed list of user questions. Turn k sends
the system prompt, every earlier question with its answer, and question k: the history grows
by appending, which is what makes prefix-aware routing pay off. The answer of a turn is the
text the server actually returned when a live driver has it (that is what a real client sends
back, and what a replica's prefix cache holds), else `synthetic_answer` stands in, so offline
users (the evaluator) get the same shape without a server.

The generator is pure (no I/O, no clock, randomness only from the seeded generator). At the
bottom, `play_conversations` plays a workload against a live OpenAI-compatible endpoint with
aiohttp (imported lazily, so the generator stays cheap to import) and `summarize` reduces the
results: per-replica counts from `x-inference-pod`, prefix hit rate from `usage`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"

_VOCABULARY = """
cache prefix replica region queue token batch latency throughput model prompt answer request
route balance envoy stream decode prefill memory block hash policy load service cluster network
packet signal vector matrix kernel tensor gradient layer river mountain forest desert ocean island
valley canyon glacier meadow harbor history science music theory garden recipe travel budget
schedule project explain compare describe summarize why how what when where which could would
simple careful quick detailed short long early late small large first second
"""
_WORDS = tuple(_VOCABULARY.split())

_TOPICS = (
    "distributed caches",
    "mountain hiking",
    "sourdough baking",
    "jazz harmony",
    "database indexing",
    "garden planning",
    "marathon training",
    "compiler design",
    "ocean currents",
    "budget travel",
    "chess openings",
    "solar panels",
)


@dataclass(frozen=True, slots=True)
class Turn:
    """One user turn: the question and how it is sent."""

    question: str
    stream: bool
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Conversation:
    """A scripted conversation; answers are supplied by whoever plays it."""

    conversation_id: str
    system: str
    turns: tuple[Turn, ...]

    def messages(self, turn: int, answers: Sequence[str]) -> list[dict[str, str]]:
        """The chat history sent at `turn`: answers[i] is the assistant's reply to turn i."""
        if not 0 <= turn < len(self.turns) or len(answers) < turn:
            raise ValueError(f"turn {turn} needs {turn} earlier answers, got {len(answers)}")
        messages = [{"role": "system", "content": self.system}]
        for i in range(turn):
            messages.append({"role": "user", "content": self.turns[i].question})
            messages.append({"role": "assistant", "content": answers[i]})
        messages.append({"role": "user", "content": self.turns[turn].question})
        return messages

    def request_body(
        self, turn: int, answers: Sequence[str], *, model: str = DEFAULT_MODEL
    ) -> dict[str, object]:
        """The OpenAI chat-completions body for `turn`."""
        spec = self.turns[turn]
        body: dict[str, object] = {
            "model": model,
            "messages": self.messages(turn, answers),
            "max_tokens": spec.max_tokens,
            "stream": spec.stream,
        }
        if spec.stream:
            # Usage (prompt and cached tokens) only arrives in a stream when asked for.
            body["stream_options"] = {"include_usage": True}
        return body


def synthetic_answer(conversation: Conversation, turn: int, words: int = 40) -> str:
    """A deterministic stand-in for the assistant's reply to `turn`."""
    rng = random.Random(f"{conversation.conversation_id}/{turn}")
    return _sentence(rng, words)


def chat_workload(
    total_requests: int,
    *,
    seed: int = 0,
    turns_per_conversation: tuple[int, int] = (3, 6),
    system_words: int = 60,
    question_words: tuple[int, int] = (20, 60),
    max_tokens: tuple[int, int] = (16, 64),
    stream_fraction: float = 0.5,
) -> tuple[Conversation, ...]:
    """Conversations whose turns add up to exactly `total_requests`."""
    if total_requests < 1:
        raise ValueError("total_requests must be >= 1")
    lo, hi = turns_per_conversation
    if not 1 <= lo <= hi:
        raise ValueError(f"bad turns_per_conversation {turns_per_conversation}")
    rng = random.Random(seed)
    conversations: list[Conversation] = []
    left = total_requests
    while left > 0:
        n_turns = min(left, rng.randint(lo, hi))
        conversations.append(
            _conversation(
                rng,
                index=len(conversations),
                n_turns=n_turns,
                system_words=system_words,
                question_words=question_words,
                max_tokens=max_tokens,
                stream_fraction=stream_fraction,
            )
        )
        left -= n_turns
    return tuple(conversations)


def _conversation(
    rng: random.Random,
    *,
    index: int,
    n_turns: int,
    system_words: int,
    question_words: tuple[int, int],
    max_tokens: tuple[int, int],
    stream_fraction: float,
) -> Conversation:
    topic = _TOPICS[index % len(_TOPICS)]
    # Distinct from the first characters on, so conversations do not share a prefix by accident.
    system = f"Conversation {index}: you are an expert on {topic}. " + _sentence(rng, system_words)
    turns = tuple(
        Turn(
            question=f"Question {t} about {topic}: " + _sentence(rng, rng.randint(*question_words)),
            stream=rng.random() < stream_fraction,
            max_tokens=rng.randint(*max_tokens),
        )
        for t in range(n_turns)
    )
    return Conversation(conversation_id=f"conv-{index}", system=system, turns=turns)


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


# --- playing the workload against a live endpoint (aiohttp; everything above is pure) ---------


@dataclass(frozen=True, slots=True)
class TurnResult:
    """What one request of the workload got back."""

    conversation_id: str
    turn: int
    stream: bool
    status: int  # HTTP status; 0 when no response arrived
    replica: str | None  # x-inference-pod
    prompt_tokens: int
    cached_tokens: int
    latency_s: float
    answer: str
    started: float = 0.0  # time.monotonic() when the request was sent
    error: str | None = None  # set when the request failed (status, transport, broken stream)
    body: str = ""  # the raw response body of a failed request (error JSON), for tests

    @property
    def ok(self) -> bool:
        return self.error is None


async def play_conversations(
    base_url: str,
    conversations: Sequence[Conversation],
    *,
    concurrency: int = 8,
    timeout_s: float = 120.0,
    model: str = DEFAULT_MODEL,
    extra: Mapping[str, object] | None = None,
    replay_answers: bool = True,
) -> list[TurnResult]:
    """Play every conversation (turns in order, conversations side by side, at most
    `concurrency` requests in flight); a failed turn continues with a synthetic answer.

    `extra` is merged into every body (e.g. `{"ignore_eos": True}`: a real model with random
    weights may otherwise stop before max_tokens, the simulator never does).
    `replay_answers=False` sends `synthetic_answer` back instead of what the server said, so
    every backend sees the same prompts (no answer text is then in any prefix cache)."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=max(concurrency, 1))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def play(conv: Conversation) -> list[TurnResult]:
            answers: list[str] = []
            results = []
            for turn in range(len(conv.turns)):
                body = {**conv.request_body(turn, answers, model=model), **(extra or {})}
                async with gate:
                    result = await send_chat(session, base_url, body, conv.conversation_id, turn)
                results.append(result)
                replay = result.ok and replay_answers
                answers.append(result.answer if replay else synthetic_answer(conv, turn))
            return results

        played = await asyncio.gather(*(play(c) for c in conversations))
    return [r for conv_results in played for r in conv_results]


async def send_chat(
    session: aiohttp.ClientSession,
    base_url: str,
    body: dict[str, object],
    conversation_id: str = "",
    turn: int = 0,
) -> TurnResult:
    """POST one chat completion and read it whole (JSON or SSE)."""
    import aiohttp

    stream = bool(body.get("stream"))
    started = time.monotonic()
    parsed = _Parsed()
    status = 0
    replica = None
    try:
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
            status = resp.status
            replica = resp.headers.get("x-inference-pod")
            if status != 200:
                parsed.raw = await resp.text(errors="replace")
                parsed.error = f"HTTP {status}: {parsed.raw[:200]}"
            elif stream:
                await _read_sse(resp, parsed)
            else:
                _read_json(await resp.json(content_type=None), parsed)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        parsed.error = f"{type(exc).__name__}: {exc}"
    return TurnResult(
        conversation_id=conversation_id,
        turn=turn,
        stream=stream,
        status=status,
        replica=replica,
        prompt_tokens=parsed.prompt_tokens,
        cached_tokens=parsed.cached_tokens,
        latency_s=time.monotonic() - started,
        answer="".join(parsed.text),
        started=started,
        error=parsed.error,
        body=parsed.raw,
    )


@dataclass(slots=True)
class _Parsed:
    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    raw: str = ""


def _usage(payload: dict[str, Any], parsed: _Parsed) -> None:
    usage = payload.get("usage")
    if isinstance(usage, dict):
        parsed.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            parsed.cached_tokens = int(details.get("cached_tokens") or 0)


def _read_json(payload: Any, parsed: _Parsed) -> None:
    try:
        parsed.text.append(str(payload["choices"][0]["message"]["content"] or ""))
    except (KeyError, IndexError, TypeError):
        parsed.error = "response has no choices[0].message.content"
        return
    _usage(payload, parsed)


async def _read_sse(resp: aiohttp.ClientResponse, parsed: _Parsed) -> None:
    """OpenAI SSE: `data: {chunk}` events, usage in the last chunk, then `data: [DONE]`."""
    done = False
    async for raw_line in resp.content:
        line = raw_line.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        for choice in chunk.get("choices") or []:
            parsed.text.append(str((choice.get("delta") or {}).get("content") or ""))
        _usage(chunk, parsed)
    if not done:
        parsed.error = "stream ended without data: [DONE]"


def summarize(results: Sequence[TurnResult]) -> dict[str, Any]:
    """Counts per replica, prefix hit rate (sum cached / sum prompt tokens), errors, latency."""
    per_replica = Counter(r.replica or "?" for r in results if r.ok)
    prompt = sum(r.prompt_tokens for r in results if r.ok)
    cached = sum(r.cached_tokens for r in results if r.ok)
    latencies = sorted(r.latency_s for r in results if r.ok)
    return {
        "requests": len(results),
        "streaming": sum(r.stream for r in results),
        "errors": [r.error for r in results if not r.ok],
        "per_replica": dict(sorted(per_replica.items())),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "p50_s": latencies[len(latencies) // 2] if latencies else 0.0,
        "p90_s": latencies[int(len(latencies) * 0.9)] if latencies else 0.0,
    }


def format_summary(results: Sequence[TurnResult], *, elapsed_s: float) -> str:
    s = summarize(results)
    replicas = " ".join(f"{name}={n}" for name, n in s["per_replica"].items()) or "-"
    lines = [
        f"requests: {s['requests']} ({s['streaming']} streaming) in {elapsed_s:.1f}s, "
        f"errors: {len(s['errors'])}",
        f"per replica (x-inference-pod): {replicas}",
        *summary_tail(s),
    ]
    return "\n".join(lines)


def summary_tail(s: dict[str, Any]) -> list[str]:
    """Hit rate, latency and the first errors of a `summarize` result, as printed lines."""
    return [
        f"prefix hit rate: {s['hit_rate']:.1%} "
        f"({s['cached_tokens']} cached of {s['prompt_tokens']} prompt tokens)",
        f"latency: p50 {s['p50_s']:.3f}s  p90 {s['p90_s']:.3f}s",
        *(f"  error: {e}" for e in s["errors"][:5]),
    ]
