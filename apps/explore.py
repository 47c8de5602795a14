"""`headscope explore`: start the Streamlit head explorer on 127.0.0.1 and print its address.

    headscope explore [--model SPEC] [--report DIR] [--sae DIR] [--port N]

Runs `streamlit run apps/explorer_app.py` in a child process; options reach the app through
HEADSCOPE_EXPLORE_* environment variables. Also runnable as `python -m headscope.apps.explore`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

from headscope.kernels.errors import HeadscopeError

APP = Path(__file__).with_name("explorer_app.py")


class ExploreError(HeadscopeError, RuntimeError):
    """The explorer could not be started (port taken, streamlit missing, report missing)."""


def add_explore_parser(subparsers) -> argparse.ArgumentParser:
    """Register `explore` on the CLI's subparsers; the handler is `args.func(args)`."""
    p = subparsers.add_parser("explore", help="start the Streamlit head explorer (127.0.0.1)",
                              description="Browse head kinds, attention patterns, interventions and SAE latents.")
    p.add_argument("--model", default="", help="model spec: empty = embedded SmolLM2, a local dir or a hub id")
    p.add_argument("--report", default="", help="a `headscope rank` output directory (heads.json / heads.csv)")
    p.add_argument("--sae", default="", help="a saved SAE directory to browse")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.set_defaults(func=run_explore)
    return p


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    """ExploreError when another process listens on 127.0.0.1:port (streamlit would print its own
    error after we had already printed an address that serves someone else's page)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ExploreError(f"--port {port} is in use on 127.0.0.1 ({exc.strerror}); pick another port or "
                               "leave --port out for a free one.") from exc


def streamlit_command(port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.showErrorDetails", "none", "--server.fileWatcherType", "none"]


def run_explore(args) -> int:
    """Start streamlit in the foreground; returns its exit status."""
    try:
        import streamlit  # noqa: F401
    except ImportError as exc:
        raise ExploreError("the explorer needs streamlit: pip install 'headscope[apps]'.") from exc
    if args.report and not Path(args.report).expanduser().exists():
        raise ExploreError(f"--report {args.report}: no such directory (write one with `headscope rank --out DIR`).")
    port = args.port or free_port()
    if not 0 < port < 65536:
        raise ExploreError(f"--port {port} is not a TCP port (1..65535).")
    check_port_free(port)
    # PYTHONSAFEPATH: `python -m streamlit` would put the working directory on sys.path, and started
    # in the repository root that hides the PyPI `kernels` behind our folder (kernels/import_check.py).
    env = dict(os.environ, HEADSCOPE_EXPLORE_MODEL=args.model, HEADSCOPE_EXPLORE_REPORT=args.report,
               HEADSCOPE_EXPLORE_SAE=args.sae, PYTHONSAFEPATH="1")
    print(f"headscope explorer: http://127.0.0.1:{port}", flush=True)
    try:
        return subprocess.call(streamlit_command(port), env=env)
    except KeyboardInterrupt:
        return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="headscope")
    add_explore_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HeadscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(["explore", *sys.argv[1:]]))
