"""Trace loaders, bad files, region construction, the oracle hit rate, closed-loop clients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skylb_extproc.bench.oracle import oracle_hit_rate
from skylb_extproc.bench.regions import RttMatrix, assign_region, parse_regions, parse_weights
from skylb_extproc.bench.trace import (
    TraceError,
    TraceRequest,
    load_azure,
    load_mooncake,
    prompt_text,
)
from skylb_extproc.bench.workloads import WorkloadSpec, build_workload


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _mc(ts: int, inp: int, ids: list[int], out: int = 2) -> str:
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": ids})


def test_mooncake_blocks_become_shared_text(tmp_path: Path) -> None:
    path = _write(tmp_path, "t.jsonl", "\n".join([_mc(0, 600, [7, 8]), _mc(5, 512, [7])]) + "\n")
    a, b = load_mooncake(path)
    assert a.segments == ((7, 2048), (8, 352))  # trailing partial block: 88 tokens * 4 chars
    assert len(prompt_text(a)) == 600 * 4
    assert prompt_text(a).startswith(prompt_text(b))
    assert (a.arrival, b.arrival, a.group, b.group) == (0.0, 0.005, "g7", "g7")


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        (
            [_mc(0, 10, [1]), '{"timestamp": 1, "output_length": 1, "hash_ids": [1]}'],
            2,
            "input_length",
        ),
        ([_mc(0, 10, [1]), "{not json"], 2, "invalid JSON"),
        ([_mc(9, 10, [1]), _mc(3, 10, [2])], 2, "before the line above"),
        ([_mc(0, 1000, [1])], 1, "cannot cover"),
        (["[1, 2]"], 1, "JSON object"),
    ],
)
def test_bad_mooncake_names_the_line(
    tmp_path: Path, lines: list[str], line: int, words: str
) -> None:
    path = _write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=rf"bad\.jsonl:{line}: .*{words}") as info:
        load_mooncake(path)
    assert info.value.line == line
    assert isinstance(info.value, ValueError)


def test_empty_traces(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="empty trace"):
        load_mooncake(_write(tmp_path, "e.jsonl", "\n\n"))
    with pytest.raises(TraceError, match="empty trace"):
        load_azure(_write(tmp_path, "e.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"))
    with pytest.raises(TraceError, match="empty trace"):
        load_azure(_write(tmp_path, "e2.csv", ""))


def test_bad_azure_names_the_line(tmp_path: Path) -> None:
    head = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    ok = "2023-11-16 18:15:46.6805900,374,44\n"
    path = _write(tmp_path, "a.csv", head + ok + "2023-11-16 18:15:40.1,10,3\n")
    with pytest.raises(TraceError, match=r"a\.csv:3: TIMESTAMP is before"):
        load_azure(path)
    path = _write(tmp_path, "b.csv", head + ok + "2023-11-16 18:15:47.0,,3\n")
    with pytest.raises(TraceError, match=r"b\.csv:3: missing field 'ContextTokens'"):
        load_azure(path)
    path = _write(tmp_path, "c.csv", "TIME,ContextTokens\n1,2\n")
    with pytest.raises(TraceError, match=r"c\.csv:1: header lacks GeneratedTokens, TIMESTAMP"):
        load_azure(path)


def test_azure_conversations_grow_their_context(tmp_path: Path) -> None:
    rows = "".join(
        f"2023-11-16 18:00:{s:02d}.5,{c},{g}\n" for s, c, g in [(0, 100, 10), (1, 50, 5)]
    )
    rows += "2023-11-16 18:00:02.0,400,7\n"
    reqs = load_azure(_write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows))
    assert [r.arrival for r in reqs] == [0.0, 1.0, 1.5]
    assert all(len(prompt_text(r)) == r.prompt_tokens * 4 for r in reqs)
    # Whatever the draws, a continued turn starts with the whole history of an earlier one.
    for r in reqs:
        earlier = [q for q in reqs if q.group == r.group and q.arrival < r.arrival]
        for q in earlier:
            assert prompt_text(r).startswith(prompt_text(q))


def test_oracle_on_a_handmade_trace() -> None:
    def req(i: int, segs: tuple[tuple[int, int], ...]) -> TraceRequest:
        chars = sum(n for _, n in segs)
        return TraceRequest(f"r{i}", float(i), "g", segs, chars // 4, 1)

    reqs = [
        req(0, ((1, 2048),)),  # 512 tokens, nothing seen: 0
        req(1, ((1, 2048), (2, 400))),  # 612 tokens: block 1 fully cached = 512
        req(2, ((1, 2048),)),  # 512 tokens, all seen: 31 blocks = 496 (the last is recomputed)
        req(
            3, ((1, 1000), (3, 1048))
        ),  # 512 tokens sharing 1000 chars = 250 tok -> 15 blocks = 240
    ]
    assert oracle_hit_rate(reqs) == pytest.approx((0 + 512 + 496 + 240) / (512 + 612 + 512 + 512))


def test_regions_weights_rtt() -> None:
    assert parse_regions("3") == ["us", "eu", "asia"]
    assert parse_regions("2") == ["us", "eu"]
    assert parse_regions("a,b") == ["a", "b"]
    assert parse_regions("5")[4] == "r4"
    with pytest.raises(ValueError):
        parse_regions("a,a")
    assert parse_weights("2,1,1", ["a", "b", "c"]) == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="2 weights for 3"):
        parse_weights("1,1", ["a", "b", "c"])
    rtt = RttMatrix.parse("100,us-eu=40", ["us", "eu", "asia"])
    assert (rtt.one_way("eu", "us"), rtt.one_way("us", "asia"), rtt.one_way("us", "us")) == (
        0.04,
        0.1,
        0.0,
    )
    assert assign_region("g1", ["a", "b"], [1.0, 0.0]) == "a"
    assert assign_region("g1", ["a", "b"], [0.0, 1.0]) == "b"


def test_closed_loop_plays_conversations_turn_by_turn(tmp_path: Path) -> None:
    lines = [_mc(i, 512 * (i + 1), list(range(i + 1))) for i in range(3)]  # one conversation
    lines.append(_mc(3, 512, [100]))  # another
    path = _write(tmp_path, "c.jsonl", "\n".join(lines) + "\n")
    spec = WorkloadSpec(
        path,
        format="closed-loop",
        regions=("x",),
        weights=(1.0,),
        clients_per_region=(1,),
        think_time_s=0.0,
    )
    wl = build_workload(spec)
    (first,) = wl.start()
    assert (first.request_id, first.arrival) == ("r0", 0.0)
    sent = [first.request_id]
    nxt = wl.on_done(first, 2.0)
    while nxt is not None:
        sent.append(nxt.request_id)
        assert nxt.arrival == 2.0
        nxt = wl.on_done(nxt, 2.0)
    assert sent == ["r0", "r1", "r2", "r3"]
    assert [r.request_id for r in wl.start()] == ["r0"]  # start() resets


def test_rate_scale_and_limit(tmp_path: Path) -> None:
    lines = [_mc(1000 * i, 10, [i]) for i in range(5)]
    path = _write(tmp_path, "r.jsonl", "\n".join(lines) + "\n")
    wl = build_workload(WorkloadSpec(path, rate_scale=2.0, limit=3))
    assert [r.arrival for r in wl.start()] == [0.0, 0.5, 1.0]
