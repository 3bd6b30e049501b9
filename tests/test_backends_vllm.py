"""The real-vLLM backend's pieces that need no vLLM: command line, environment, setup logic,
the response-tagging middleware, and how stacks pick a backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from skylb_extproc.backends import vllm, vllm_setup
from skylb_extproc.backends.vllm_plugin.skylb_vllm_pod import PodHeader
from skylb_extproc.procs import ChildError
from skylb_extproc.sim.profiles import PROFILES, override
from skylb_extproc.stack import StackOptions, replica_args


def settings(tmp_path: Path, **kw: Any) -> vllm.VllmSettings:
    return vllm.VllmSettings(venv=tmp_path, model=tmp_path / "m", served_model_name="s", **kw)


def test_server_argv_has_the_verified_flags(tmp_path: Path) -> None:
    argv = vllm.server_argv(settings(tmp_path, max_num_seqs=2), "127.0.0.1", 8123)
    assert argv[:3] == [
        str(tmp_path / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    text = " ".join(argv)
    for flag in (
        "--load-format dummy",
        "--enable-prefix-caching",
        "--block-size 32",
        "--max-model-len 4096",
        "--enable-prompt-tokens-details",
        "--enforce-eager",
        "--distributed-executor-backend uni",
        "--kv-cache-memory-bytes 16M",
        "--max-num-seqs 2",
        "--port 8123",
        "--middleware skylb_vllm_pod.PodHeader",
    ):
        assert flag in text
    assert "--max-num-seqs" not in vllm.server_argv(settings(tmp_path), "h", 1)  # vLLM's default


def test_server_env(tmp_path: Path) -> None:
    base = {"VLLM_CPU_KVCACHE_SPACE": "4", "PYTHONPATH": "/x", "PATH": "/bin"}
    env = vllm.server_env(tmp_path / "run", "r0", base)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # it would override --kv-cache-memory-bytes
    assert (env["OMP_NUM_THREADS"], env["VLLM_CPU_OMP_THREADS_BIND"]) == ("1", "nobind")
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    for key, sub in (("TMPDIR", "tmp"), ("VLLM_CACHE_ROOT", "vllm-cache")):
        assert env[key] == str(tmp_path / "run" / sub) and Path(env[key]).is_dir()
    assert env["PYTHONPATH"].split(":") == [str(vllm.PLUGIN_DIR), "/x"]
    assert env["SKYLB_POD_NAME"] == "r0" and env["PATH"] == "/bin"


def test_missing_install_is_named(tmp_path: Path) -> None:
    with pytest.raises(ChildError, match="run `skylb-extproc vllm-setup`"):
        vllm.check_installed(settings(tmp_path))


def test_default_venv_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm.VENV_ENV, "/somewhere/venv")
    assert vllm.default_venv() == Path("/somewhere/venv")
    monkeypatch.delenv(vllm.VENV_ENV)
    assert vllm.default_venv().name == ".vllm-venv"


def test_pod_header_middleware_tags_http_only() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"b")]})
        await send({"type": "http.response.body", "body": b"x"})

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {}

    middleware = PodHeader(app)
    middleware.value = b"r7"
    asyncio.run(middleware({"type": "http"}, receive, send))
    assert sent[0]["headers"] == [(b"a", b"b"), (b"x-inference-pod", b"r7")]
    assert sent[1] == {"type": "http.response.body", "body": b"x"}
    sent.clear()
    asyncio.run(middleware({"type": "lifespan"}, receive, send))
    assert sent[0]["headers"] == [(b"a", b"b")]


def test_stack_replica_args_per_backend(tmp_path: Path) -> None:
    sim = replica_args(StackOptions(block_size=32, max_num_seqs=2), "r0", tmp_path)
    assert sim[:1] == ["sim-replica"] and sim[-4:] == ["--block-size", "32", "--max-num-seqs", "2"]
    real = replica_args(
        StackOptions(backend="vllm", profile="cpu-tiny-llama", max_num_seqs=2), "r1", tmp_path
    )
    assert real[:1] == ["vllm-replica"]
    assert real[real.index("--served-model-name") + 1] == "tiny-llama"
    assert real[real.index("--workdir") + 1] == str(tmp_path / "r1")
    assert real[real.index("--max-num-seqs") + 1] == "2" and "--block-size" not in real
    with pytest.raises(ValueError, match="unknown backend"):
        replica_args(StackOptions(backend="tgi"), "r2", tmp_path)


def test_profile_override_keeps_the_kv_tokens() -> None:
    l4 = PROFILES["l4-llama3.1-8b"]
    bigger = override(l4, block_size=32, max_num_seqs=2)
    assert bigger.block_size * bigger.num_gpu_blocks == l4.block_size * l4.num_gpu_blocks
    assert bigger.max_num_seqs == 2 and override(l4) == l4


def test_setup_skips_what_is_done_and_checks_only_after_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    for step in ("venv", "torch", "vllm", "prune", "model"):
        monkeypatch.setattr(vllm_setup, f"step_{step}", lambda venv, s=step: calls.append(s))
    monkeypatch.setattr(vllm_setup, "check_serving", lambda venv: calls.append("check") or "ok")
    monkeypatch.setattr(vllm_setup, "installed_version", lambda venv, dist: "1")
    steps = vllm_setup.setup(tmp_path, log=lambda _: None)
    assert [s.name for s in steps] == ["venv", "torch", "vllm", "prune", "model", "check"]
    assert json.loads((tmp_path / vllm.READY_STAMP).read_text())["versions"]
    calls.clear()
    steps = vllm_setup.setup(tmp_path, log=lambda _: None)  # all skipped, stamp there: no check
    assert calls == ["venv", "torch", "vllm", "prune", "model"]
    assert all(s.skipped for s in steps)


def test_missing_torch_file_stops_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_setup, "installed_version", lambda venv, dist: None)
    monkeypatch.setattr(vllm_setup, "local_torch_wheel", lambda venv: None)
    with pytest.raises(vllm_setup.SetupError, match="PIP_FIND_LINKS"):
        vllm_setup.step_torch(tmp_path)
