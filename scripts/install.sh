#!/usr/bin/env bash
# Installs livediff and what it needs into the Python that scripts/_env.sh picks: an active
# virtualenv, else the project's .venv (made when the system Python is externally managed),
# else python3 itself.
#   scripts/install.sh [EXTRAS]     e.g. scripts/install.sh webrtc,dev,ray
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so pip does not
# pull a multi-gigabyte CUDA build; if that build cannot be had it says what it installs
# instead, and how big, before it does. pip's own output (progress, errors) is shown.
# Settings: LIVEDIFF_TORCH_INDEX (the CPU build's index), LIVEDIFF_REINSTALL=1 (run pip even
# when nothing changed since the last install).
set -euo pipefail
LIVEDIFF_ME="${LIVEDIFF_ME:-install.sh}"
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$LIVEDIFF_REPO"
extras="${1:-webrtc}"
livediff_env

# The last install's pyproject.toml and extras: when they cover this one, pip is not run, so
# a second start is quick and not a screen of "Requirement already satisfied".
stamp="$(fact prefix "$LIVEDIFF_FACTS")/.livediff-install"
key="$( (cat pyproject.toml; echo "$LIVEDIFF_REPO") | cksum | tr ' ' -)"
stamped=""
if [ -f "$stamp" ] && [ "$(sed -n 1p "$stamp")" = "$key" ]; then
  stamped="$(sed -n 2p "$stamp")"
fi
covered=1
for extra in ${extras//,/ }; do
  [[ ",$stamped," == *",$extra,"* ]] || covered=0
done
if [ "${LIVEDIFF_REINSTALL:-0}" != 1 ] && [ -n "$stamped" ] && [ "$covered" = 1 ] \
  && [ "$(fact livediff "$LIVEDIFF_FACTS")" = 1 ]; then
  say "livediff[$extras] is installed and pyproject.toml is unchanged: nothing to install (LIVEDIFF_REINSTALL=1 runs pip anyway)"
  exit 0
fi

pip_install() { "$PY" -m pip install "$@"; }

pip_version="$(fact pip "$LIVEDIFF_FACTS")"
if ! printf '%s\n' "$pip_version" | awk -F. '{exit !($1 >= 23)}'; then
  # Older pips lack --report (used below) and editable installs from pyproject.toml.
  say "upgrading pip $pip_version (about 2 MB)"
  pip_install --upgrade pip
fi

cpu_torch="torch==2.13.0"  # the CPU build this project is tested with on CPU machines
if [ "$(fact torch "$LIVEDIFF_FACTS")" = 1 ]; then
  : # whatever torch is there stays; pip checks it against pyproject.toml's range below
elif command -v nvidia-smi >/dev/null 2>&1; then
  say "NVIDIA GPU found: installing torch from PyPI, the CUDA build (about 3 GB to download, 5 GB installed)"
  pip_install "torch>=2.5"
else
  index="${LIVEDIFF_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  if why="$("$PY" scripts/_pip_plan.py probe "$index")"; then
    say "no NVIDIA GPU: installing $cpu_torch, the CPU build, from $index (about 190 MB to download, 750 MB installed)"
    pip_install "$cpu_torch" --index-url "$index" \
      || die "pip could not install the CPU build of torch from $index (its error is above); LIVEDIFF_TORCH_INDEX names another index"
  else
    say "the CPU build of torch could not be fetched from $index (${why:-no answer}); asking pip what it would install instead"
    report="$(mktemp)"
    trap 'rm -f "$report"' EXIT
    if pip_install --dry-run --quiet --report "$report" "$cpu_torch" \
      && plan="$("$PY" scripts/_pip_plan.py summary "$report")"; then
      say "installing instead: $plan"
    else
      say "installing $cpu_torch from pip's default index instead; on x86_64 Linux PyPI's torch is the CUDA build (about 3 GB to download, 5 GB installed), which also runs on the CPU"
    fi
    pip_install "$cpu_torch"
  fi
fi

case ",$extras," in
  *,dev,*) size="about 250 MB to download, 1.1 GB installed" ;;
  *) size="about 120 MB to download, 450 MB installed" ;;
esac
case ",$extras," in
  *,ray,*) size="$size; Ray Serve (the ray extra) about 105 MB more to download, 300 MB installed" ;;
esac
case ",$extras," in
  *,creative,*) size="$size; OSC and NDI (the creative extra, with the NDI runtime) about 11 MB more to download, 80 MB installed" ;;
esac
say "installing livediff[$extras] (editable) and its dependencies into $LIVEDIFF_WHERE ($size on a first install)"
pip_install -e ".[$extras]"

extras_done="$(printf '%s,%s' "$stamped" "$extras" | tr , '\n' | sed '/^$/d' | sort -u | paste -sd, -)"
printf '%s\n%s\n' "$key" "$extras_done" >"$stamp" 2>/dev/null || true
# What was installed, not what was hoped for.
built="$("$PY" -c 'import torch; print("torch", torch.__version__, "(CUDA %s build)" % torch.version.cuda if torch.version.cuda else "(CPU build)")')"
if [ -n "${VIRTUAL_ENV:-}" ] && [ "$PY" = "$VIRTUAL_ENV/bin/python" ]; then
  built="$built; ${VIRTUAL_ENV#"$LIVEDIFF_REPO"/} holds $(du -sh "$VIRTUAL_ENV" | cut -f1)"
fi
say "installed livediff[$extras] with $built"
