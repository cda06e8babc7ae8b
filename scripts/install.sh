#!/usr/bin/env bash
# Installs livediff and what it needs into the current Python environment.
#   scripts/install.sh [EXTRAS]     e.g. scripts/install.sh webrtc,dev
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so pip does not
# pull a multi-gigabyte CUDA build; with a GPU, pip's default (CUDA) torch is used.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-webrtc}"
python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python3 -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python3 -m pip install -q "torch>=2.5"
  else
    # 2.13.0 is the CPU build this project is tested with on CPU machines.
    python3 -m pip install -q --timeout 10 --retries 0 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || python3 -m pip install -q "torch==2.13.0"
  fi
fi
python3 -m pip install -q -e ".[${extras}]"
