"""``livediff export FOLDER``: save a model as a self-contained diffusers folder.

The folder holds the UNet, text encoders, tokenizers, scheduler, the full VAE and, beside
them, ``vae_tiny/``; LoRAs are already fused. ``--source FOLDER`` loads it later with nothing
else, offline (keep the same ``--model`` preset).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from livediff.cli_options import add_model_options, load_toml, model_spec_from_args
from livediff.exceptions import ParameterError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="save a model (LoRAs fused, tiny VAE included) as a folder that --source loads offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: livediff export ./sd-turbo-local && livediff run in.mp4 out.mp4 --source ./sd-turbo-local",
    )
    parser.add_argument(
        "folder",
        metavar="FOLDER",
        type=Path,
        help="where to write the model (created; must be empty)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into FOLDER even if it is not empty"
    )
    add_model_options(parser)
    parser.set_defaults(handler=export_command)


def export_command(args: argparse.Namespace) -> int:
    from livediff.models.export import export_model

    spec = model_spec_from_args(args, load_toml(args.config))
    folder: Path = args.folder
    if folder.exists() and not folder.is_dir():
        raise ParameterError(f"cannot export to {folder}: it is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
        raise ParameterError(
            f"cannot export to {folder}: the folder is not empty (pass --overwrite to write into it)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError(f"cannot export to {folder}: {exc.strerror or exc}") from None
    # fp32 unless asked: the folder is a source for any later device and dtype.
    dtype = "fp32" if args.dtype in (None, "auto") else args.dtype
    print(export_model(spec, folder, dtype=dtype))
    return 0
