"""The CLI: `serve` as a process (ready line, SIGTERM, busy port), argument routing."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from skylb_extproc.cli import main

SERVE_CONFIG = """
region: us
listen: {grpc: "127.0.0.1:%d", admin: "127.0.0.1:0"}
replicas:
  - {name: r0, address: "127.0.0.1:9"}
"""


def test_serve_prints_ports_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "skylb.yaml"
    path.write_text(SERVE_CONFIG % 0)
    child = subprocess.Popen(
        [sys.executable, "-m", "skylb_extproc", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ports = json.loads(child.stdout.readline())
        assert set(ports) == {"grpc", "admin"} and all(p > 0 for p in ports.values())
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=20) == 0
    finally:
        child.kill()
        child.communicate()


def test_serve_on_a_busy_port_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        path = tmp_path / "skylb.yaml"
        path.write_text(SERVE_CONFIG % busy.getsockname()[1])
        assert main(["serve", "--config", str(path)]) == 1
    assert "cannot bind gRPC" in capsys.readouterr().err


def test_bench_gets_every_argument_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import skylb_extproc.bench.cli as bench_cli

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr(bench_cli, "main", fake_main)
    assert main(["--log-level", "WARNING", "bench", "--trace", "t.jsonl", "--quiet"]) == 7
    assert seen == [["--trace", "t.jsonl", "--quiet"]]


def test_other_commands_reject_unknown_arguments() -> None:
    with pytest.raises(SystemExit) as info:
        main(["check-config", "x.yaml", "--bogus"])
    assert info.value.code == 2
