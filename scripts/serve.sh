#!/usr/bin/env bash
# The main job: install livediff and serve the browser page with the default model (sd-turbo).
#   scripts/serve.sh [livediff serve options]      e.g. scripts/serve.sh --port 9000
# The first run downloads the model from the Hugging Face hub (about 5 GB). Without network or
# a GPU, try:  scripts/serve.sh --model tiny --weights random
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh webrtc
exec livediff serve "$@"
