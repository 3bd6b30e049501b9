"""A small process supervisor for the demo and the integration tests.

Each child runs in its own process group (so a stop reaches whatever it spawned) with stdout
and stderr sent to files, not pipes: nobody has to keep draining a pipe, a chatty child can
never block on a full one, and the logs stay behind for a post-mortem. On Linux a child also
asks the kernel to SIGKILL it if the supervising thread dies, so even a SIGKILLed demo leaves
no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import cast

_PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")


class ChildError(RuntimeError):
    """A child died, or did not become ready in time; the message carries its stderr tail."""


def _resolve_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent: the forked child must not dlopen (a lock another
    thread held at fork time would deadlock it), only call an already-resolved function."""
    if not _LINUX:
        return None
    try:
        return cast("Callable[..., int]", ctypes.CDLL(None, use_errno=True).prctl)
    except (OSError, AttributeError):
        return None


_PRCTL = _resolve_prctl()


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """preexec_fn: SIGKILL this child when the thread that started it exits (Linux only)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


@dataclass
class Child:
    """One supervised process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, max_bytes: int = 4000) -> str:
        """The end of the child's stderr, for error messages."""
        try:
            with self.stderr_path.open("rb") as f:
                f.seek(max(0, self.stderr_path.stat().st_size - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def describe_failure(self, what: str) -> str:
        code = self.popen.poll()
        state = "still running" if code is None else f"exit code {code}"
        tail = self.stderr_tail()
        return f"{self.name} (pid {self.pid}, {state}): {what}\n--- stderr tail ---\n{tail}"

    def read_json_line(self, timeout_s: float) -> dict[str, object]:
        """The first stdout line that is a JSON object (the child's 'I am ready' line)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = _first_json_object(self.stdout_path)
            if found is not None:
                return found
            if not self.alive():
                # It may have printed the line just before exiting: look once more.
                found = _first_json_object(self.stdout_path)
                if found is not None:
                    return found
                raise ChildError(self.describe_failure("exited before printing its JSON line"))
            if time.monotonic() > deadline:
                raise ChildError(self.describe_failure(f"no JSON line within {timeout_s:.0f}s"))
            time.sleep(0.02)


def _first_json_object(path: Path) -> dict[str, object] | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # Only complete lines: a half-written line would parse as garbage.
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n") or not line.lstrip().startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return None


@dataclass
class Supervisor:
    """Starts children, and stops all of them (reverse start order, bounded time)."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        die_with_parent: bool = True,
    ) -> Child:
        """Start `argv` in a new process group; output goes to log_dir/name.{stdout,stderr}.

        die_with_parent: the kernel kills the child when the *thread* calling start exits, so
        call it from a long-lived thread (the main one), never from a short-lived worker.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stdout_path = self.log_dir / f"{name}.stdout"
        stderr_path = self.log_dir / f"{name}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent and _PRCTL else None,
            )
        child = Child(name, popen, stdout_path, stderr_path)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace_s: float = 5.0) -> None:
        """SIGTERM the child's group, SIGKILL it after `grace_s`."""
        _signal_group(child, signal.SIGTERM)
        _reap([child], time.monotonic() + grace_s)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self, grace_s: float = 5.0) -> None:
        """Stop every child; SIGTERM all at once (newest first) so the grace periods overlap."""
        children = list(reversed(self.children))
        for child in children:
            _signal_group(child, signal.SIGTERM)
        _reap(children, time.monotonic() + grace_s)
        self.children.clear()

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def _signal_group(child: Child, sig: signal.Signals) -> None:
    # The group id is the child's pid (start_new_session); signal the group even when the leader
    # is gone, so grandchildren are not left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


def _reap(children: Sequence[Child], deadline: float) -> None:
    for child in children:
        try:
            child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.popen.wait(timeout=5.0)
        # Members of the group that outlived the leader.
        _signal_group(child, signal.SIGKILL)


def wait_http_ready(
    url: str,
    *,
    timeout_s: float,
    child: Child | None = None,
    ok_statuses: Sequence[int] = (200,),
    any_status: bool = False,
) -> int:
    """Poll `url` until it answers with one of `ok_statuses` (or anything, with any_status).

    Returns the status. Raises ChildError when `child` dies meanwhile or the time is up.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        status = _http_status(url)
        if status is not None and (any_status or status in ok_statuses):
            return status
        last = f"status {status}" if status is not None else "connection failed"
        if child is not None and not child.alive():
            raise ChildError(child.describe_failure(f"died while waiting for {url}"))
        if time.monotonic() > deadline:
            what = f"{url} not ready within {timeout_s:.0f}s ({last})"
            raise ChildError(child.describe_failure(what) if child else what)
        time.sleep(0.05)


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for programs that cannot report a port-0 bind.

    Envoy cannot tell us which port it bound for port 0 without parsing its admin output, so
    we pick one: bind port 0, read it, release it. Another process may grab it between the
    release and Envoy's bind; the kernel hands out ephemeral ports round-robin, so this is
    rare, and the caller sees it as Envoy failing to start (retry with a new port).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
