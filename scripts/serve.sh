#!/usr/bin/env bash
# The main job: install livediff and serve the browser page with the default model (sd-turbo).
#   scripts/serve.sh [livediff serve options]      e.g. scripts/serve.sh --port 9000
# Installs into the active virtualenv, else into the project's .venv where the system Python
# is externally managed (Debian 12+, Ubuntu 23.04+), else into python3 (scripts/_env.sh).
# The first run downloads the model from the Hugging Face hub (about 5 GB). Without network or
# a GPU, try:  scripts/serve.sh --model tiny --weights random
set -euo pipefail
export LIVEDIFF_ME=serve.sh
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$LIVEDIFF_REPO"
livediff_env
scripts/install.sh webrtc
exec "$PY" -m livediff serve "$@"
