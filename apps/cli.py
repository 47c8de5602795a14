"""`headscope` console script: `headscope rank`, `headscope explore`, `headscope sae ...`.

Also runs as `python -m headscope.apps.cli` (and so under `torchrun ... -m headscope.apps.cli`).
Bad input ends with a one-line message on stderr and exit code 2; nothing half-written stays behind.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from headscope.kernels.errors import HeadscopeError

from .rank import add_rank_parser

# (subcommand, module, function adding its parser) written in other apps/ files; a subcommand whose
# module cannot be imported still appears, and explains why when it is used.
_OPTIONAL = (("explore", "headscope.apps.explore", "add_explore_parser"),
             ("sae", "headscope.apps.sae_cli", "add_sae_parser"))


def _add_optional(subparsers, name: str, module: str, fn: str) -> None:
    try:
        getattr(importlib.import_module(module), fn)(subparsers)
    except (ImportError, AttributeError) as exc:
        p = subparsers.add_parser(name, help=f"(unavailable: {exc})", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        reason = f"headscope {name} is unavailable in this installation: {exc}"
        p.set_defaults(func=lambda args: _unavailable(reason))


def _unavailable(reason: str) -> int:
    print(f"headscope: error: {reason}", file=sys.stderr)
    return 2


def _terminated(signum, frame):
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headscope", description="Mechanistic interpretability for attention heads.")
    sub = parser.add_subparsers(dest="command", metavar="{rank,explore,sae}")
    add_rank_parser(sub)
    for name, module, fn in _OPTIONAL:
        _add_optional(sub, name, module, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    # headscope's own warnings on stderr, message only. Not a root handler (logging.basicConfig):
    # libraries with their own stderr handler that also propagate (huggingface_hub) printed every
    # warning twice.
    log = logging.getLogger("headscope")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    # A terminated run (kill, a scheduler's time limit) unwinds like Ctrl-C, so the temporary report
    # directory is removed rather than left beside --out.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(args.func(args) or 0)
    except HeadscopeError as exc:
        print(f"headscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"headscope {args.command}: interrupted; {_left_behind(args)}", file=sys.stderr)
        return 130


def _left_behind(args) -> str:
    """What an interrupted command leaves: rank stages its report (nothing at --out changes); sae train
    writes checkpoints as it goes, which --resume continues from."""
    if getattr(args, "sae_command", None) == "train":
        return (f"the checkpoints written so far stay in {args.out}; run the same command with --resume "
                "to continue.")
    if args.command == "rank":
        return "nothing was written."
    return "its output may be incomplete."


if __name__ == "__main__":
    sys.exit(main())
