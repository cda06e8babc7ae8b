"""``livediff bench --suite NAME [suite options]``: run one benchmark suite; JSON lines on stdout.

Suites: ``single`` and ``stages`` (one stream), ``peers`` (StreamDiffusion and diffusers on the
same UNet and inputs), ``multi`` (many sessions), ``e2e`` (glass to glass), ``kernels``
(Triton kernels vs their references), ``soak`` (hours of live sessions), ``profile`` (kernel time by
category per network), ``startup`` (process start to a first frame, by compile-cache state),
``ray`` (what the Ray ingress adds to ``/offer`` and the websocket), ``consistency`` (feature
bank and latent feedback), ``controlnet`` (ControlNets end to end, vs diffusers, many sessions),
``lora`` (per-session LoRAs vs none and fused, loading at runtime), ``file`` (``livediff run``'s
file job end to end, file in → file out, per ``--batch``), ``fp8`` (``--precision fp8``: UNet
time and drift against fp16).
``livediff bench --suite NAME --help`` lists a suite's
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
    "profile": "livediff.bench.kernel_profile",
    "startup": "livediff.bench.startup",
    "ray": "livediff.bench.ray_ingress",
    "consistency": "livediff.bench.consistency",
    "controlnet": "livediff.bench.controlnet_suite",
    "lora": "livediff.bench.lora",
    "file": "livediff.bench.file_job",
    "fp8": "livediff.bench.fp8",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark suite (JSON lines + plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The suite's name and then its own options: everything after --suite belongs to the suite
    # (a positional REMAINDER would refuse "--suite soak --sessions 2" as unknown arguments).
    parser.add_argument(
        "--suite",
        required=True,
        nargs=argparse.REMAINDER,
        metavar="NAME [SUITE OPTIONS]",
        help=f"one of {', '.join(sorted(SUITES))}, then that suite's options",
    )
    parser.set_defaults(handler=run, bench_parser=parser)


def run(args: argparse.Namespace) -> int:
    if not args.suite or args.suite[0] not in SUITES:
        given = args.suite[0] if args.suite else "nothing"
        args.bench_parser.error(
            f"--suite: expected one of {', '.join(sorted(SUITES))}, got {given}"
        )
    name, argv = args.suite[0], list(args.suite[1:])
    module = importlib.import_module(SUITES[name])
    if name in ("single", "stages"):
        argv = ["--suite", name, *argv]
    return int(module.main(argv) or 0)
