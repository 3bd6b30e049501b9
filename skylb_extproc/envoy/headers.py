"""Reading Envoy's HeaderMap (ext_proc request/response headers), for the stream machine."""

from __future__ import annotations

from typing import Any

__all__ = ["SKYLB_PREFIX", "content_length", "header_values", "skylb_headers"]

SKYLB_PREFIX = "x-skylb-"


def _value(header: Any) -> str:
    # Envoy fills raw_value (bytes); older versions fill value.
    raw = header.raw_value
    return raw.decode("utf-8", "replace") if raw else str(header.value)


def header_values(header_map: Any, wanted: frozenset[str]) -> dict[str, str]:
    """First value of each wanted header."""
    found: dict[str, str] = {}
    for header in header_map.headers:
        key = header.key
        if key in wanted and key not in found:
            found[key] = _value(header)
    return found


def skylb_headers(header_map: Any) -> dict[str, str]:
    """First value of every `x-skylb-*` header (names lowercase, as Envoy sends them)."""
    found: dict[str, str] = {}
    for header in header_map.headers:
        key = header.key.lower()
        if key.startswith(SKYLB_PREFIX) and key not in found:
            found[key] = _value(header)
    return found


def content_length(values: dict[str, str]) -> int:
    """Declared body size, 0 when absent or unreadable (chunked bodies are counted as they come)."""
    declared = values.get("content-length", "")
    return int(declared) if declared.isdigit() else 0
