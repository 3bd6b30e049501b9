"""Smoke test of the ext_proc overhead benchmark: it runs and reports all three setups.

No speed assertion: the numbers live in docs/benchmarks.md, not in tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from skylb_extproc.bench.overhead import SETUPS, main

pytestmark = pytest.mark.integration


def test_overhead_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "overhead.md"
    assert main(["--requests", "20", "--concurrency", "1,4", "--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out == text
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert len(rows) == 2 * len(SETUPS)
    for clients in ("1", "4"):
        assert sorted(r[0].lstrip("| ") for r in rows if r[1] == clients) == sorted(SETUPS)
    assert all(r[-1] == "0 |" for r in rows), text  # every request answered 200
