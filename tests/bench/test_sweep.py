"""Pure parts of sweeps and fleets: flag parsing, goodput, best baseline and the ratios."""

from __future__ import annotations

import pytest

from skylb_extproc.bench.fleet import level_name, parse_counts, parse_levels, parse_profiles
from skylb_extproc.bench.records import RequestRecord
from skylb_extproc.bench.sweep import (
    best_baseline,
    compare_default,
    goodput,
    local_and_forwarded,
    offered_rate,
)

REGIONS = ("us", "eu", "asia")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("h100-llama3.1-8b", "h100-llama3.1-8b"),
        (
            "us=h100-llama3.1-8b,eu=l4-llama3.1-8b,asia=l4-llama3.1-8b",
            ("h100-llama3.1-8b", "l4-llama3.1-8b", "l4-llama3.1-8b"),
        ),
        ("asia=l4-llama3.1-8b, us=l4-llama3.1-8b ,eu=l4-llama3.1-8b", "l4-llama3.1-8b"),
    ],
)
def test_parse_profiles(text: str, expected: object) -> None:
    assert parse_profiles(text, REGIONS) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a100", "--profile: unknown profile 'a100'"),
        (
            "us=h100-llama3.1-8b,eu=l4-llama3.1-8b",
            "--profile: every region needs a profile: missing ['asia'], unknown []",
        ),
        ("us=tiny,eu=tiny,asia=tiny,mars=tiny", "unknown ['mars']"),
        ("us=tiny,us=tiny,eu=tiny,asia=tiny", "--profile: expected region=profile once"),
        ("us=tiny,eu=tiny,asia", "--profile: expected region=profile once"),
        (
            "us=tiny,eu=l4-llama3.1-8b,asia=tiny",
            "--profile: the regions' profiles serve "
            "different models: ['meta-llama/Llama-3.1-8B-Instruct', 'tiny-sim']",
        ),
    ],
)
def test_parse_profiles_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^--profile") as err:
        parse_profiles(text, REGIONS)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"), [("4", 4), ("4,2,2", (4, 2, 2)), (" 1, 1 ,1", (1, 1, 1))]
)
def test_parse_counts(text: str, expected: object) -> None:
    assert parse_counts(text, REGIONS) == expected


@pytest.mark.parametrize("text", ["0", "4,2", "4,2,2,2", "4,x,2", "4,0,2", ""])
def test_parse_counts_errors(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--replicas-per-region"):
        parse_counts(text, REGIONS)


def test_parse_levels() -> None:
    assert parse_levels("1") == (1.0,)
    assert parse_levels("1,2,4,8") == (1.0, 2.0, 4.0, 8.0)
    assert [level_name(x) for x in parse_levels("1,1.5,4")] == ["x1", "x1.5", "x4"]
    for bad in ("0", "-1", "1,,2", "nan", "inf", "1,2,1", "fast"):
        with pytest.raises(ValueError, match=r"^--rate-scale"):
            parse_levels(bad)


def _s(p50: float | None, p90: float | None, rejected: int = 0, hit: float = 0.5) -> dict:
    return {
        "requests": 10,
        "completed": 10 - rejected,
        "rejected": rejected,
        "ttft_s": {"mean": p50, "p50": p50, "p90": p90, "p99": p90},
        "prefix_hit_rate": hit,
    }


@pytest.mark.parametrize(
    ("summaries", "unservable", "best"),
    [
        # The lowest P90 among baselines; skylb* never counts, however good.
        (
            {
                "skylb": _s(0.1, 0.2),
                "skylb-cost": _s(0.1, 0.1),
                "sglang": _s(1, 3),
                "round-robin": _s(1, 2),
            },
            0,
            "round-robin",
        ),
        # A baseline that lost a request is out, even with the lowest P90.
        ({"skylb": _s(1, 2), "sglang": _s(1, 3), "round-robin": _s(1, 2, rejected=1)}, 0, "sglang"),
        # ... unless the fleet cannot serve that request (every system loses it).
        (
            {"skylb": _s(1, 2), "sglang": _s(1, 3), "round-robin": _s(1, 2, rejected=1)},
            1,
            "round-robin",
        ),
        # Ties: the first in run order.
        ({"sglang": _s(1, 2), "least-load": _s(0.5, 2)}, 0, "sglang"),
        # No P90 (nothing completed) or no baseline at all.
        ({"skylb": _s(1, 2), "sglang": _s(None, None)}, 0, None),
        ({"skylb": _s(1, 2), "skylb-ch": _s(1, 1)}, 0, None),
    ],
)
def test_best_baseline(summaries: dict, unservable: int, best: str | None) -> None:
    assert best_baseline(summaries, unservable) == best


def test_compare_default_ratios() -> None:
    summaries = {
        "skylb": _s(0.5, 1.5, hit=0.4),
        "sglang": _s(1.0, 3.0, hit=0.6),
        "round-robin": _s(0.25, 6.0, hit=0.1),
    }
    got = compare_default(summaries, {"skylb": 8.0, "sglang": 4.0, "round-robin": None})
    assert got == {
        "default": "skylb",
        "best_baseline": "sglang",
        "ttft_p50_ratio": 0.5,
        "ttft_p90_ratio": 0.5,
        "prefix_hit_rate": 0.4,
        "best_baseline_prefix_hit_rate": 0.6,
        "goodput_ratio": 2.0,
    }
    # A goodput that was never met gives no ratio; no default system, no comparison.
    assert compare_default(summaries, {"skylb": 8.0})["goodput_ratio"] is None  # type: ignore[index]
    assert compare_default({"sglang": _s(1, 3)}, {}) is None


def test_goodput_is_the_highest_rate_meeting_the_slo() -> None:
    levels = [
        (1.0, {"a": _s(1, 2), "b": _s(1, 2), "c": _s(1, 9)}),
        (2.0, {"a": _s(1, 4), "b": _s(1, 6), "c": _s(1, 9)}),
        (4.0, {"a": _s(1, 5), "b": _s(1, 4), "c": _s(1, 4, rejected=1)}),
        (8.0, {"a": _s(1, 7), "b": _s(1, 9), "c": _s(1, 9)}),
    ]
    # b fails at x2 and passes at x4: the highest rate that passed counts.
    assert goodput(levels, 5.0) == {"a": 4.0, "b": 4.0, "c": None}
    assert goodput(levels, 5.0, unservable=1) == {"a": 4.0, "b": 4.0, "c": 4.0}
    assert goodput(levels, 1.0) == {"a": None, "b": None, "c": None}


def test_offered_rate_and_local_forwarded_split() -> None:
    assert offered_rate(100, 50.0) == 2.0 and offered_rate(1, 0.0) is None

    def rec(i: int, served: str, ttft: float, cached: int, outcome: str = "ok") -> RequestRecord:
        return RequestRecord(f"r{i}", "us", 0.0, outcome, replica_region=served, ttft=ttft,
                             prompt_tokens=100, cached_tokens=cached)  # fmt: skip

    recs = [rec(0, "us", 1.0, 50), rec(1, "us", 3.0, 0), rec(2, "eu", 2.0, 10),
            rec(3, "eu", 9.0, 90, outcome="too_long")]  # fmt: skip
    assert local_and_forwarded(recs) == {
        "local": {"completed": 2, "prefix_hit_rate": 0.25, "ttft_p50_s": 1.0, "ttft_p90_s": 3.0},
        "forwarded": {"completed": 1, "prefix_hit_rate": 0.1, "ttft_p50_s": 2.0, "ttft_p90_s": 2.0},
    }
