"""``livediff bench --suite NAME [suite options]``: run one benchmark suite; JSON lines on stdout.

Suites: ``single`` and ``stages`` (one stream), ``peers`` (StreamDiffusion and diffusers on the
same UNet and inputs), ``multi`` (many sessions), ``e2e`` (glass to glass), ``kernels``
(Triton kernels vs their references). ``livediff bench --suite NAME --help`` lists a suite's
options.
"""

from __future__ import annotations

import argparse
import importlib

SUITES = {
    "single": "livediff.bench.single",
    "stages": "livediff.bench.single",
    "peers": "livediff.bench.peers",
    "multi": "livediff.bench.multi",
    "e2e": "livediff.bench.e2e",
    "kernels": "livediff.bench.kernels",
    "soak": "livediff.bench.soak",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark suite (JSON lines + plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("suite_args", nargs=argparse.REMAINDER, help="options passed to the suite")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(SUITES[args.suite])
    argv = list(args.suite_args)
    if args.suite in ("single", "stages"):
        argv = ["--suite", args.suite, *argv]
    return int(module.main(argv) or 0)
