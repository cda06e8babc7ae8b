"""``python3 -m livediff.settings``: print the settings reference, or write it into the README."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from livediff.settings.catalog import reference
from livediff.settings.docs import write_readme


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m livediff.settings", description=__doc__)
    parser.add_argument(
        "--write", type=Path, metavar="README", help="rewrite the settings block of this file"
    )
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(reference())
        return 0
    changed = write_readme(args.write, reference())
    print(f"{args.write}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
