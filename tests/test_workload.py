"""The chat workload: deterministic, exact request count, histories that grow by appending."""

from __future__ import annotations

import json

import pytest

from skylb_extproc.workload import (
    TurnResult,
    chat_workload,
    summarize,
    synthetic_answer,
)


def test_same_seed_same_bytes_other_seed_differs() -> None:
    def dump(seed: int) -> str:
        convs = chat_workload(30, seed=seed)
        bodies = [
            c.request_body(t, [synthetic_answer(c, i) for i in range(t)])
            for c in convs
            for t in range(len(c.turns))
        ]
        return json.dumps(bodies)

    assert dump(4) == dump(4)
    assert dump(4) != dump(5)


@pytest.mark.parametrize("total", [1, 7, 20, 203])
def test_turns_add_up_to_the_request_count(total: int) -> None:
    assert sum(len(c.turns) for c in chat_workload(total, seed=1)) == total


def test_each_turn_appends_to_the_previous_history() -> None:
    (conv, *_) = chat_workload(6, seed=2, turns_per_conversation=(6, 6))
    answers = [f"answer {i}" for i in range(len(conv.turns))]
    previous = conv.messages(0, [])
    for turn in range(1, len(conv.turns)):
        current = conv.messages(turn, answers)
        assert current[: len(previous)] == previous
        assert current[len(previous)] == {"role": "assistant", "content": answers[turn - 1]}
        previous = current


def test_conversations_do_not_share_a_prefix_by_accident() -> None:
    systems = [c.system for c in chat_workload(40, seed=3)]
    assert len({s[:20] for s in systems}) == len(systems)


def test_streaming_turns_ask_for_usage() -> None:
    convs = chat_workload(40, seed=0, stream_fraction=1.0)
    body = convs[0].request_body(0, [])
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_summary_hit_rate_and_counts() -> None:
    def result(replica: str, prompt: int, cached: int, error: str | None = None) -> TurnResult:
        return TurnResult("c", 0, False, 200, replica, prompt, cached, 0.1, "", error=error)

    s = summarize([result("r0", 100, 0), result("r1", 100, 50), result("r1", 0, 0, "HTTP 503")])
    assert s["per_replica"] == {"r0": 1, "r1": 1}
    assert s["hit_rate"] == pytest.approx(0.25)
    assert s["errors"] == ["HTTP 503"]
