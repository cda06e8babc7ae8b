"""``livediff`` command line: one subcommand per module ``livediff/cmd_<name>.py``.

Each command module exposes ``add_parser(subparsers)``, which registers the subcommand and
sets ``handler`` (a function taking the parsed ``argparse.Namespace`` and returning an exit
code). Heavy imports happen inside handlers, so ``livediff --help`` is instant.

Errors raised on purpose (:class:`~livediff.exceptions.LivediffError`) print one line and exit
with status 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from livediff import __version__
from livediff.exceptions import LivediffError

COMMANDS = ("run", "serve", "camera", "compile", "bench", "sample", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livediff",
        description="Real-time streaming video generation with few-step diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"livediff {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"livediff.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"livediff.cmd_{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbosity < 2:
        # diffusers/transformers narrate every load and draw progress bars; keep their errors only.
        # Set through their environment variables so that nothing heavy is imported here.
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for name in ("diffusers", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # diffusers passes an argument huggingface_hub deprecated; the warning is not the user's.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except LivediffError as exc:
        print(f"livediff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"livediff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
