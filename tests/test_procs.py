"""The process supervisor: JSON ready line, failure reports, no orphans."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from skylb_extproc.procs import ChildError, Supervisor, free_port, pid_alive, wait_http_ready


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_reads_the_first_json_line(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        child = sup.start(
            "c",
            py("import time; print('noise'); print('{\"port\": 5}', flush=True); time.sleep(30)"),
        )
        assert child.read_json_line(timeout_s=10) == {"port": 5}


def test_death_before_ready_reports_stderr_tail(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        child = sup.start(
            "dies", py("import sys; sys.stderr.write('boom: bad config'); sys.exit(3)")
        )
        with pytest.raises(ChildError, match=r"(?s)exit code 3.*boom: bad config"):
            child.read_json_line(timeout_s=10)


def test_timeout_names_the_child(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        child = sup.start("slow", py("import time; time.sleep(30)"))
        with pytest.raises(ChildError, match=r"slow .*no JSON line"):
            child.read_json_line(timeout_s=0.2)


def test_stop_all_kills_grandchildren_and_stubborn_children(tmp_path: Path) -> None:
    # The child ignores SIGTERM and has a grandchild: both are gone after stop_all.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('{\"grandchild\": %d}' % p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    sup = Supervisor(tmp_path)
    child = sup.start("stubborn", py(code))
    grandchild = int(str(child.read_json_line(timeout_s=10)["grandchild"]))
    started = time.monotonic()
    sup.stop_all(grace_s=0.5)
    assert time.monotonic() - started < 20  # bounded: SIGKILL after the grace period
    assert not pid_alive(child.pid)
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(grandchild)
    assert sup.children == []


def test_wait_http_ready_fails_fast_when_the_child_dies(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        child = sup.start("gone", py("import sys; sys.stderr.write('cannot bind'); sys.exit(1)"))
        url = f"http://127.0.0.1:{free_port()}/ready"
        with pytest.raises(ChildError, match="cannot bind"):
            wait_http_ready(url, timeout_s=30, child=child)


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(2**22 + 12345)
