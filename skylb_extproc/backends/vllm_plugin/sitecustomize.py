"""Run at the start of every Python process of a vLLM server we start (this folder is on its
PYTHONPATH): make each of them die with its parent.

vLLM runs its engine core (and multiprocessing's resource tracker) as child processes, and
they outlive a SIGKILLed API server: seen here, an orphaned `VLLM::EngineCore` holding 670 MB.
Linux's parent-death signal is per process and is cleared by fork, so it is set here at
interpreter start (covers exec'd children and the API server itself, whose parent is our
launcher) and again in every forked child. Then killing any link of the chain — the launcher,
the API server — takes everything below it down at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass


if sys.platform.startswith("linux"):
    _die_with_parent()
    os.register_at_fork(after_in_child=_die_with_parent)
