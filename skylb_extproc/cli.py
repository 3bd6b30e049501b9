"""Command line: `skylb-extproc serve | check-config | sim-replica | vllm-replica | vllm-setup |
demo | bench`.

Heavy imports (grpc, aiohttp, the simulator, the demo) happen inside the handlers, so
`check-config` stays fast and works even when optional parts of the package are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from skylb_extproc.config import load_config
from skylb_extproc.errors import ConfigError

EXIT_CONFIG = 2
T = TypeVar("T")


def _serve(args: argparse.Namespace) -> int:
    from skylb_extproc.server.app import run_server

    config = load_config(args.config)
    try:
        _run(run_server(config))  # prints {"grpc": port, "admin": port} once serving
    except OSError as exc:  # a port in use, typically: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(f"ok: {config.summary()}")
    return 0


def _sim_replica(args: argparse.Namespace) -> int:
    from skylb_extproc.sim.replica import main_sim_replica

    return _result(main_sim_replica(args))


def _vllm_replica(args: argparse.Namespace) -> int:
    from skylb_extproc.backends.vllm import main_vllm_replica

    return main_vllm_replica(args)


def _vllm_setup(args: argparse.Namespace) -> int:
    from skylb_extproc.backends.vllm_setup import main_vllm_setup

    return main_vllm_setup(args)


def _vllm_bench_serve(args: argparse.Namespace) -> int:
    from skylb_extproc.bench.serve import main_bench_serve

    return main_bench_serve(args)


def _demo(args: argparse.Namespace) -> int:
    from skylb_extproc.demo import main_demo

    return _result(main_demo(args))


def _bench(args: argparse.Namespace) -> int:
    from skylb_extproc.bench.cli import main as main_bench

    return _result(main_bench(list(args.rest)))


def _result(value: object) -> int:
    """Accept an int, None, or a coroutine from the delegated entry points."""
    if inspect.iscoroutine(value):
        value = _run(value)
    return value if isinstance(value, int) else 0


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return asyncio.run(coro)
    # Optional: uvloop cuts the asyncio share of the per-message cost when it is installed.
    result: T = uvloop.run(coro)
    return result


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skylb-extproc", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (stderr)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc server for one region")
    serve.add_argument("--config", required=True, help="skylb.yaml")
    serve.set_defaults(handler=_serve)

    check = sub.add_parser("check-config", help="validate a config file and print a summary")
    check.add_argument("file")
    check.set_defaults(handler=_check_config)

    sim = sub.add_parser("sim-replica", help="run one simulated vLLM replica (HTTP)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, required=True, help="0 = pick a free port")
    sim.add_argument("--name", default="sim")
    sim.add_argument("--profile", default="l4-llama3.1-8b")
    sim.add_argument("--time-scale", type=_positive_float, default=1.0)
    sim.add_argument("--served-model-name", default=None, help="reject other model names")
    sim.add_argument(
        "--headers-at-first-token",
        action="store_true",
        help="delay streaming response headers to the first token (vLLM sends them on accept)",
    )
    sim.add_argument("--block-size", type=int, default=None, help="override the profile's")
    sim.add_argument("--max-num-seqs", type=int, default=None, help="override the profile's")
    sim.set_defaults(handler=_sim_replica)
    _add_vllm(sub)
    _add_demo(sub)
    # The bench has its own parser (and heavy imports): everything after `bench` goes to it.
    bench = sub.add_parser(
        "bench", help="replay a trace through the compared systems", add_help=False
    )
    bench.set_defaults(handler=_bench, takes_rest=True)
    return parser


def _add_vllm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Argument definitions live beside the code (light modules: no vLLM import here).
    from skylb_extproc.backends.vllm import add_replica_arguments
    from skylb_extproc.backends.vllm_setup import add_setup_arguments
    from skylb_extproc.bench.serve import add_bench_serve_arguments

    replica = sub.add_parser("vllm-replica", help="run one real vLLM replica (its own venv)")
    add_replica_arguments(replica)
    replica.set_defaults(handler=_vllm_replica)
    setup = sub.add_parser("vllm-setup", help="install vLLM (CPU) into its venv and check it")
    add_setup_arguments(setup)
    setup.set_defaults(handler=_vllm_setup)
    bench_serve = sub.add_parser(
        "vllm-bench-serve", help="vLLM's bench serve through Envoy + skylb, policy by policy"
    )
    add_bench_serve_arguments(bench_serve)
    bench_serve.set_defaults(handler=_vllm_bench_serve)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Mirrors demo.add_demo_arguments without importing the demo (and its dependencies) here.
    demo = sub.add_parser("demo", help="start regions of replicas, skylb and Envoy on loopback")
    demo.add_argument("--regions", default=None, help="a count (3 = us,eu,asia) or names")
    demo.add_argument("--replicas-per-region", type=int, default=3)
    demo.add_argument("--rtt-ms", type=float, default=50.0, help="round trip between regions")
    demo.add_argument("--region-weights", default=None, help="share of the traffic per region")
    demo.add_argument("--residency", action="append", default=[], help="REGION=R1[+R2...]")
    demo.add_argument("--spill-mode", choices=("prefix", "hash", "cost"), default="prefix")
    demo.add_argument("--profile", default="l4-llama3.1-8b")
    demo.add_argument(
        "--backend", choices=("sim", "vllm"), default="sim", help="replicas: sim | vllm"
    )
    demo.add_argument("--time-scale", type=_positive_float, default=1.0)
    demo.add_argument("--body-mode", choices=("buffered", "duplex"), default="buffered")
    demo.add_argument("--policy", default="skylb")
    demo.add_argument("--traffic", type=int, default=0, help="send N requests, then exit")
    demo.add_argument("--concurrency", type=int, default=None, help="concurrent clients")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workdir", default=None, help="keep configs and logs here")
    demo.set_defaults(handler=_demo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): as Unix tools do, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
