#!/usr/bin/env bash
# The test command: installs everything the tests need (Python packages, Chromium for the
# browser tests, iproute2/util-linux for the loopback-only network namespaces), then runs pytest.
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "note: ${need_apt[*]} missing and no root: the browser tests will be skipped" >&2
  fi
fi
scripts/install.sh webrtc,dev
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python3 -c "import triton" >/dev/null 2>&1; then
  # Triton's CPU interpreter runs the GPU kernels' parity tests here (TRITON_INTERPRET=1).
  # 3.6.0 is the version the GPU machines' torch uses; on a GPU machine torch brings its own.
  python3 -m pip install -q "triton==3.6.0" || echo "note: triton not installed; interpreter tests will be skipped" >&2
fi
exec python3 -m pytest "$@"
