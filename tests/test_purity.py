"""The routing core stays sans-I/O: checked statically on every core module's source.

The core (docs/internals.md) takes `now` and a seeded `random.Random` as arguments, so the live
server and the virtual-time evaluator drive the same code. These tests parse each core module
with `ast` and walk its imports: every module it imports must be an allowed stdlib module, an
allowed third-party package, or another skylb_extproc module — which is then walked too, so the
core cannot reach the server through a helper. Modules not written yet are skipped.

A runtime check (a subprocess importing the whole core) catches what static parsing cannot see,
for the heavy event-loop/network packages only: stdlib and third-party modules we rely on (e.g.
cachetools) import `time` and `random` themselves, which is fine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import skylb_extproc

PKG_DIR = Path(skylb_extproc.__file__).parent
PKG = "skylb_extproc"

# The core as listed in docs/internals.md; a package name stands for all its modules.
CORE = (
    "types",
    "errors",
    "config",
    "parsing",
    "hashing",
    "state",
    "policy",
    "dispatch",
    "router",
    "region",
    "envoy.stream",
    "envoy.messages",
    "sim.model",
    "sim.profiles",
)

FORBIDDEN = {
    "asyncio": "event loop",
    "grpc": "network",
    "grpc_health": "network",
    "aiohttp": "network",
    "prometheus_client": "metrics belong to the server",
    "time": "the clock is an argument (`now`)",
    "threading": "the core is single-threaded",
    "socket": "network",
    "selectors": "I/O",
    "subprocess": "processes",
    "multiprocessing": "processes",
    "concurrent": "threads",
    "signal": "process control",
    "uuid": "ids are passed in (uuid4 is hidden randomness)",
    "secrets": "hidden randomness",
}
STDLIB_OK = {
    "__future__", "abc", "base64", "binascii", "bisect", "collections", "contextlib", "copy",
    "dataclasses", "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "hmac",
    "ipaddress", "itertools", "json", "logging", "math", "numbers", "operator", "pathlib",
    "random", "re", "statistics", "string", "struct", "textwrap", "types", "typing",
    "typing_extensions", "unicodedata", "urllib", "weakref", "zlib",
}  # fmt: skip
THIRD_PARTY_OK = {"xxhash", "cachetools", "yaml", "envoy", "google", "xds", "udpa", "validate"}
RUNTIME_FORBIDDEN = ("asyncio", "grpc", "aiohttp", "prometheus_client")


def module_path(name: str) -> Path | None:
    """The source file of skylb_extproc.<name>, or None when it does not exist (yet)."""
    base = PKG_DIR.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def expand(name: str) -> list[str]:
    """A package stands for its __init__ and every module directly inside it."""
    directory = PKG_DIR.joinpath(*name.split("."))
    if not directory.is_dir():
        return [name]
    modules = sorted(f"{name}.{p.stem}" for p in directory.glob("*.py") if p.stem != "__init__")
    return [name, *modules]


def imported_modules(name: str, tree: ast.Module) -> list[str]:
    """Absolute dotted names of everything `tree` imports (submodules included)."""
    package = (
        name
        if module_path(name) == PKG_DIR.joinpath(*name.split("."), "__init__.py")
        else name.rpartition(".")[0]
    )
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = f"{PKG}.{package}".split(".") if package else [PKG]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def global_randomness(tree: ast.Module) -> list[str]:
    """Uses of the `random` module's hidden global generator, or a module-level Random()."""
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            problems += [f"from random import {a.name}" for a in node.names if a.name != "Random"]
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
            and node.attr != "Random"
        ):
            problems.append(f"random.{node.attr} (line {node.lineno})")
    problems += [f"module-level call {c} " for c in module_level_random_calls(tree)]
    return problems


def module_level_random_calls(tree: ast.AST) -> list[str]:
    """Calls to random.Random evaluated at import time (module body, class bodies, defaults)."""
    out: list[str] = []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, functions):
            todo += list(node.args.defaults) + [d for d in node.args.kw_defaults if d]
            todo += getattr(node, "decorator_list", [])
            continue  # bodies run later, with an rng passed in
        if isinstance(node, ast.Call) and "Random" in ast.unparse(node.func):
            out.append(f"{ast.unparse(node)} (line {node.lineno})")
        todo += list(ast.iter_child_nodes(node))
    return out


def check(name: str) -> tuple[list[str], list[str]]:
    """(problems in module `name`, skylb_extproc modules it imports)."""
    path = module_path(name)
    assert path is not None
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    problems = global_randomness(tree)
    internal: list[str] = []
    reported: set[str] = set()
    for dotted in imported_modules(name, tree):
        top = dotted.split(".")[0]
        if top == PKG:
            inner = dotted[len(PKG) + 1 :]
            if inner and module_path(inner) is not None:
                internal.append(inner)
        elif top in reported:
            continue
        elif top in FORBIDDEN:
            problems.append(f"imports {top}: {FORBIDDEN[top]}")
            reported.add(top)
        elif top not in STDLIB_OK and top not in THIRD_PARTY_OK:
            problems.append(f"imports {top}: not on the core's allow-list")
            reported.add(top)
    return problems, internal


def walk(start: list[str]) -> dict[str, list[str]]:
    """Every skylb_extproc module reachable from `start` -> its problems."""
    seen: dict[str, list[str]] = {}
    todo = [n for n in start if module_path(n) is not None]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name], internal = check(name)
        todo += [n for n in internal if n not in seen]
    return seen


CORE_MODULES = [m for name in CORE for m in expand(name)]


@pytest.mark.parametrize("name", CORE_MODULES)
def test_core_module_is_pure(name: str) -> None:
    if module_path(name) is None:
        pytest.skip(f"skylb_extproc.{name} is not written yet")
    problems = {mod: p for mod, p in walk([name]).items() if p}
    assert not problems, f"impure imports reachable from skylb_extproc.{name}: {problems}"


def test_the_checker_catches_impurity() -> None:
    bad = ast.parse(
        "import asyncio\nimport random\nfrom time import monotonic\nRNG = random.Random(1)\n"
        "def f(rng=random.Random()):\n    return random.choice([1])\n"
    )
    assert imported_modules("x", bad) == ["asyncio", "random", "time", "time.monotonic"]
    assert len(global_randomness(bad)) == 3  # random.choice + two import-time Random() calls
    good = ast.parse(
        "import random\ndef f(rng: random.Random) -> float:\n    return rng.random()\n"
    )
    assert global_randomness(good) == []


def test_importing_the_core_loads_no_event_loop_or_network_package() -> None:
    present = [f"{PKG}.{m}" for m in walk(CORE_MODULES)]
    code = (
        "import importlib, sys\n"
        f"for m in {present!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {RUNTIME_FORBIDDEN!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout
