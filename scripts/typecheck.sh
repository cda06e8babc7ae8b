#!/usr/bin/env bash
# mypy over the package as it is installed: the checkout's top-level folders (engine/, models/
# …) are the subpackages livediff.engine, livediff.models … (pyproject's package-dir), which a
# plain `mypy` run from the checkout cannot see: it would type every cross-layer import as Any.
# This mirrors that layout with symlinks in a temporary folder and checks it with the repo's
# [tool.mypy] settings.   scripts/typecheck.sh [mypy args]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
mirror="$(mktemp -d)"
trap 'rm -rf "$mirror"' EXIT
mkdir "$mirror/livediff"
for file in "$repo"/livediff/*.py; do ln -s "$file" "$mirror/livediff/"; done
for layer in engine models kernels streams clients bench; do ln -s "$repo/$layer" "$mirror/livediff/$layer"; done
cd "$mirror"
PY="${PY:-python3}"
"$PY" -m mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" "$@" livediff
