"""``livediff compile``: build the compiled graphs once and package them for fast starts.

    livediff compile --model sd-turbo                       # the buckets livediff serve uses
    livediff compile --model sd-turbo --config serve.toml   # its [runtime] batch_buckets too

Compiles and captures every batch bucket the multi-session runtime replays (as ``livediff
serve`` does at its first start), then writes what was compiled to the compile package cache
(:mod:`livediff.models.compile_cache`; ``~/.cache/livediff/compile`` by default). A later
``livediff serve`` with the same model, buckets, dtype, ``--precision``, torch/Triton and GPU
loads the package instead of compiling: copy the folder to a fresh machine (or bake it into an
image) and its first start skips code generation. Needs a CUDA device (the package holds GPU code).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from livediff.cli_options import (
    add_model_options,
    add_stream_options,
    load_toml,
    model_spec_from_args,
    stream_settings_from_args,
)
from livediff.exceptions import BackendError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compile",
        help="compile the model's graphs once and package them for fast starts",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser)
    add_stream_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from livediff.cli_options import load_for_backend
    from livediff.cmd_serve import runtime_config_from_args
    from livediff.engine.runtime_config import ControlNetRows
    from livediff.models.backends import Backend, runtime_bundle
    from livediff.models.presets import get_preset

    if not torch.cuda.is_available():
        raise BackendError("livediff compile needs a CUDA device: a compile package holds GPU code")
    if args.backend not in (None, "auto", "compile"):
        raise BackendError(f"livediff compile builds the compile backend, not {args.backend}")
    args.backend = Backend.COMPILE.value
    config = load_toml(args.config)
    spec = model_spec_from_args(args, config)
    stream_config, params = stream_settings_from_args(args, config, get_preset(spec.preset))
    runtime_config = runtime_config_from_args(args, config)
    started = time.perf_counter()
    bundle, backend = load_for_backend(spec, args, params.controlnets)
    factor = bundle.vae_scale_factor
    height = stream_config.height or bundle.preset.height
    width = stream_config.width or bundle.preset.width
    graphed = runtime_bundle(
        bundle,
        backend,
        latent_size=(height // factor, width // factor),
        buckets=runtime_config.batch_buckets,
        plain_unet=runtime_config.controlnet_rows is ControlNetRows.APART,
    )
    report = getattr(graphed, "compile_report", None)
    took = time.perf_counter() - started
    what = "nothing to compile on this device" if report is None else report.describe()
    print(f"livediff compile: {what}; {took:.1f} s in all", file=sys.stderr)
    return 0
