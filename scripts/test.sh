#!/usr/bin/env bash
# The test command: installs everything the tests need (Python packages, Chromium for the
# browser tests, iproute2/util-linux for the loopback-only network namespaces), then runs pytest.
#   scripts/test.sh [pytest args]
# Python packages go where scripts/_env.sh says (an active virtualenv, else the project's .venv
# where the system Python is externally managed, else python3). LIVEDIFF_APT=0 skips apt-get.
set -euo pipefail
export LIVEDIFF_ME=test.sh
# shellcheck source=scripts/_env.sh
source "$(dirname "$0")/_env.sh"
cd "$LIVEDIFF_REPO"

# apt-get's own output goes to a log (shown if it fails); the terminal gets a summary line,
# the size, and a progress line every 20%, from apt's machine-readable status (Status-Fd).
apt_progress() {
  local log="$1" line kind pct step last_dl=-1 last_inst=-1
  while IFS= read -r line; do
    case "$line" in
      dlstatus:* | pmstatus:*)
        kind="${line%%:*}"
        pct="$(cut -d: -f3 <<<"$line")" && pct="${pct%%.*}"
        [[ "$pct" =~ ^[0-9]+$ ]] || continue
        step=$((pct / 20 * 20))
        if [ "$kind" = dlstatus ] && [ "$step" -gt "$last_dl" ]; then
          last_dl=$step && say "  apt-get: downloading, $step%"
        elif [ "$kind" = pmstatus ] && [ "$step" -gt "$last_inst" ]; then
          last_inst=$step && say "  apt-get: installing, $step%"
        fi
        ;;
      *) printf '%s\n' "$line" >>"$log" ;;
    esac
  done
}

apt_install() {
  local sudo=() log start sizes
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  log="$(mktemp -t livediff-apt.XXXXXX)"
  start=$SECONDS
  say "apt-get: installing ${*} for the browser and network-namespace tests; first the package lists (apt-get update)"
  if ! ${sudo[@]+"${sudo[@]}"} apt-get update -q >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "apt-get update failed (above; full log $log). LIVEDIFF_APT=0 skips this step: the browser tests are then skipped"
  fi
  # apt's own estimate, before anything is fetched.
  sizes="$(LANG=C ${sudo[@]+"${sudo[@]}"} apt-get install --assume-no "$@" 2>>"$log" \
    | sed -n -e 's/.* \([0-9]*\) newly installed.*/\1 new packages/p' \
      -e 's/^Need to get \([^ ]* [^ ]*\).*/\1 to download/p' \
      -e 's/^After this operation, \([^ ]* [^ ]*\).*/\1 of disk/p' \
      -e 's/^ *Installing: \([0-9]*\).*/\1 new packages/p' \
      -e 's/^ *Download size: \(.*[^ ]\) *$/\1 to download/p' \
      -e 's|^ *Space needed: \([^/]*[^ /]\) */.*|\1 of disk|p' | paste -sd, - | sed 's/,/, /g' || true)"
  say "apt-get: installing ${*}: ${sizes:-size unknown}; about 1-2 minutes (log: $log)"
  if ! ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o APT::Status-Fd=1 "$@" 2>>"$log" \
    | apt_progress "$log"; then
    tail -n 30 "$log" >&2
    die "apt-get install ${*} failed (above; full log $log). LIVEDIFF_APT=0 skips this step: the browser tests are then skipped"
  fi
  say "apt-get: installed ${*} in $((SECONDS - start)) s"
}

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "${LIVEDIFF_APT:-1}" = 0 ]; then
    say "note: ${need_apt[*]} missing and LIVEDIFF_APT=0: the tests that need them will be skipped"
  elif ! command -v apt-get >/dev/null 2>&1; then
    say "note: ${need_apt[*]} missing and no apt-get here: install them with your package manager, or the tests that need them will be skipped"
  elif [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; then
    apt_install "${need_apt[@]}"
  else
    say "note: ${need_apt[*]} missing and no root or sudo: the tests that need them will be skipped"
  fi
fi

livediff_env
scripts/install.sh webrtc,dev,ray,creative  # ray: the two-node Ray Serve tests (tests/scale); creative: OSC and NDI
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c "import triton" >/dev/null 2>&1; then
  # Triton's CPU interpreter runs the GPU kernels' parity tests here (TRITON_INTERPRET=1).
  # 3.6.0 is the version the GPU machines' torch uses; on a GPU machine torch brings its own.
  say "installing triton==3.6.0 for the Triton interpreter tests (about 190 MB to download, 640 MB installed)"
  "$PY" -m pip install "triton==3.6.0" || say "note: triton not installed (pip's error above); the interpreter tests will be skipped"
fi
exec "$PY" -m pytest "$@"
