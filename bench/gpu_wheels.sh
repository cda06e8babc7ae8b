#!/usr/bin/env bash
# Run here (not on the GPU machine), from the repo root: downloads into .whl/ the wheels the
# lent GPU machines lack (Python 3.12, manylinux x86-64), for `carry: [".whl"]`; then each
# device command starts with `source bench/gpu_env.sh`. About 48 MB (PyAV is 35 of it).
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
# diffusers and the WebRTC / websocket / video stack (the machines have torch, transformers,
# aiohttp, pillow, pytest); pytest-asyncio for the tests' async mode.
for name in diffusers av websockets aiortc aioice pylibsrtp pyee google-crc32c pyopenssl \
  ifaddr dnspython cryptography cffi pycparser pytest-asyncio; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$name"
done
du -sh .whl
