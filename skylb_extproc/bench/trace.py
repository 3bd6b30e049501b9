"""Trace requests, their deterministic prompt text, and the Mooncake / Azure loaders.

Why text at all: the router keys its prefix index on prompt *characters* and the simulated
replica caches 16-token blocks of the prompt, so a trace that only says "these requests share
block 17" must become text in which they really share a prefix. A prompt is a sequence of
segments `(text_id, chars)`; segment text depends only on its id, so equal ids at the same
position give equal text and the router and the replica see the sharing the trace describes.

Why not keep the text: prompts of the Mooncake trace add up to ~245 MB of characters. Requests
hold segment ids only; `prompt_text` builds a prompt when a balancer needs it.

Bad input raises `TraceError` (a ValueError) naming the file and the 1-based line.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import xxhash

__all__ = [
    "CHARS_PER_TOKEN",
    "MOONCAKE_BLOCK_TOKENS",
    "TraceError",
    "TraceRequest",
    "detect_format",
    "load_azure",
    "load_mooncake",
    "prompt_text",
    "segment_text",
]

CHARS_PER_TOKEN = 4  # the usual English ratio; the replica model counts tokens the same way
MOONCAKE_BLOCK_TOKENS = 512  # one Mooncake hash id covers 512 tokens


class TraceError(ValueError):
    """A trace file cannot be used; the message names the file and the line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload. `arrival` is when the client sends it (seconds)."""

    request_id: str
    arrival: float
    group: str  # prefix group (conversation): region assignment and the x-hash-key header
    segments: tuple[tuple[int, int], ...]  # (text id, characters) making up the prompt
    prompt_tokens: int
    output_tokens: int
    region: str = ""  # home region of the client, set by the workload builder


@lru_cache(maxsize=8192)
def _unit(text_id: int) -> str:
    return xxhash.xxh64_hexdigest(text_id.to_bytes(8, "little", signed=True)) + " "


def segment_text(text_id: int, chars: int) -> str:
    """Deterministic text of `chars` characters for `text_id` (a repeated 17-char unit)."""
    unit = _unit(text_id)
    reps = chars // len(unit) + 1
    return (unit * reps)[:chars]


def prompt_text(request: TraceRequest) -> str:
    """The request's prompt: its segments' text, concatenated."""
    return "".join(segment_text(tid, n) for tid, n in request.segments)


def detect_format(path: str | Path) -> str:
    """'mooncake' for JSON lines, 'azure' for a CSV whose header names TIMESTAMP."""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("{"):
                return "mooncake"
            if "TIMESTAMP" in line.upper():
                return "azure"
            break
    raise TraceError(path, None, "cannot tell the format (expected Mooncake JSONL or Azure CSV)")


def _int_field(path: str | Path, lineno: int, obj: dict[str, object], key: str, lo: int) -> int:
    value = obj.get(key)
    if value is None:
        raise TraceError(path, lineno, f"missing field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise TraceError(path, lineno, f"field {key!r} must be an integer >= {lo}, got {value!r}")
    return value


def _mooncake_record(path: str | Path, lineno: int, line: str) -> tuple[float, int, int, list[int]]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(path, lineno, f"invalid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise TraceError(path, lineno, "expected a JSON object")
    ts = obj.get("timestamp")
    if ts is None:
        raise TraceError(path, lineno, "missing field 'timestamp'")
    if not isinstance(ts, int | float) or isinstance(ts, bool) or ts < 0:
        raise TraceError(path, lineno, f"field 'timestamp' must be a number >= 0, got {ts!r}")
    inp = _int_field(path, lineno, obj, "input_length", 1)
    out = _int_field(path, lineno, obj, "output_length", 1)
    ids = obj.get("hash_ids")
    if ids is None:
        raise TraceError(path, lineno, "missing field 'hash_ids'")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise TraceError(path, lineno, "field 'hash_ids' must be a list of integers")
    if len(ids) < math.ceil(inp / MOONCAKE_BLOCK_TOKENS):
        raise TraceError(path, lineno, f"{len(ids)} hash_ids cannot cover {inp} input tokens")
    return float(ts) / 1000.0, inp, out, ids


def _mooncake_segments(inp: int, ids: list[int]) -> tuple[tuple[int, int], ...]:
    block = MOONCAKE_BLOCK_TOKENS * CHARS_PER_TOKEN
    total = inp * CHARS_PER_TOKEN
    segs: list[tuple[int, int]] = []
    for i in range(math.ceil(inp / MOONCAKE_BLOCK_TOKENS)):
        segs.append((ids[i], min(block, total - i * block)))  # trailing partial block
    return tuple(segs)


def _numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield lineno, raw
    except UnicodeDecodeError:
        raise TraceError(path, None, "not UTF-8 text") from None


def load_mooncake(path: str | Path, *, limit: int | None = None) -> list[TraceRequest]:
    """Mooncake JSONL: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (512 tok)."""
    out: list[TraceRequest] = []
    last = -math.inf
    for lineno, line in _numbered_lines(path):
        if limit is not None and len(out) >= limit:
            break
        ts, inp, outlen, ids = _mooncake_record(path, lineno, line)
        if ts < last:
            raise TraceError(path, lineno, f"timestamp {ts * 1000:g} ms is before the line above")
        last = ts
        segs = _mooncake_segments(inp, ids)
        out.append(TraceRequest(f"r{len(out)}", ts, f"g{ids[0]}", segs, inp, outlen))
    if not out:
        raise TraceError(path, None, "empty trace (no requests)")
    return out


def _azure_time(path: str | Path, lineno: int, text: str) -> float:
    base, _, frac = text.strip().partition(".")
    try:
        stamp = datetime.strptime(base, "%Y-%m-%d %H:%M:%S").timestamp()
        return stamp + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise TraceError(path, lineno, f"bad TIMESTAMP {text!r}") from None


def _azure_int(path: str | Path, lineno: int, row: dict[str, str | None], key: str) -> int:
    raw = row.get(key)
    if raw is None or raw == "":
        raise TraceError(path, lineno, f"missing field {key!r}")
    try:
        value = int(raw)
    except ValueError:
        raise TraceError(path, lineno, f"field {key!r} must be an integer, got {raw!r}") from None
    if value < 1:
        raise TraceError(path, lineno, f"field {key!r} must be >= 1, got {value}")
    return value


def load_azure_rows(path: str | Path, *, limit: int | None = None) -> list[tuple[float, int, int]]:
    """(arrival seconds from the first row, context tokens, generated tokens) per CSV row."""
    rows: list[tuple[float, int, int]] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None:
            raise TraceError(path, None, "empty trace (no header)")
        if not need <= set(reader.fieldnames):
            missing = sorted(need - set(reader.fieldnames))
            raise TraceError(path, 1, f"header lacks {', '.join(missing)}")
        first: float | None = None
        last = -math.inf
        for row in reader:
            if limit is not None and len(rows) >= limit:
                break
            lineno = reader.line_num
            stamp = _azure_time(path, lineno, row.get("TIMESTAMP") or "")
            if stamp < last:
                raise TraceError(path, lineno, "TIMESTAMP is before the line above")
            last = stamp
            first = stamp if first is None else first
            ctx = _azure_int(path, lineno, row, "ContextTokens")
            gen = _azure_int(path, lineno, row, "GeneratedTokens")
            rows.append((stamp - first, ctx, gen))
    if not rows:
        raise TraceError(path, None, "empty trace (no requests)")
    return rows


def load_azure(path: str | Path, *, limit: int | None = None, seed: int = 0) -> list[TraceRequest]:
    """Azure LLM CSV with prefixes from the synthetic conversation model (see conversations.py)."""
    from skylb_extproc.bench.conversations import synthesize

    return synthesize(load_azure_rows(path, limit=limit), seed=seed)
