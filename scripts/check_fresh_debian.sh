#!/usr/bin/env bash
# Checks the README's two commands as a new user on a fresh Debian would run them: builds a
# minimal Debian root (debootstrap, system Python, only git python3 python3-pip python3-venv
# curl), copies this checkout's working tree into it (uncommitted changes included), and as
# root there runs `scripts/serve.sh --model tiny --weights random` until /healthz answers,
# then `scripts/test.sh`. No step by hand in between; the logs say what each step printed.
#   sudo scripts/check_fresh_debian.sh [options]
#     --root DIR         where to build the root (default /var/tmp/livediff-fresh-debian)
#     --suite NAME       Debian release (default trixie: Debian 13, Python 3.13)
#     --mirror URL       Debian mirror (default: the one the host's apt uses)
#     --port N           serve.sh's port (default 18080)
#     --pytest "ARGS"    arguments for scripts/test.sh, e.g. --pytest "tests/core -x" (default:
#                        the full suite, which is what "test.sh passes" means)
#     --skip-serve, --skip-test
#     --reuse            with --keep before: keep that root's OS packages and pip cache (quicker,
#                        less fresh; the project and its .venv are always new)
#     --keep             leave the root in place afterwards (default: removed)
# Needs root (debootstrap, chroot, mounts) and network to the Debian mirror and PyPI. The host's
# pip configuration and CA certificates are copied in, so pip inside reaches the index as the
# host's does; local folders that configuration names are mounted read-only at the same paths.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
root=/var/tmp/livediff-fresh-debian suite=trixie mirror="" port=18080 pytest_args=""
do_serve=1 do_test=1 reuse=0 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="$2" && shift ;;
    --suite) suite="$2" && shift ;;
    --mirror) mirror="$2" && shift ;;
    --port) port="$2" && shift ;;
    --pytest) pytest_args="$2" && shift ;;
    --skip-serve) do_serve=0 ;;
    --skip-test) do_test=0 ;;
    --reuse) reuse=1 ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2 && exit 2 ;;
  esac
  shift
done
root="$(realpath -m "$root")"
logs="$root.logs"
if [ "$root" = / ]; then echo "refusing --root /" >&2 && exit 2; fi

say() { printf '[fresh-debian %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  say "FAILED: $*"
  exit 1
}
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mounts)"

mounted_under() { findmnt -rn -o TARGET | awk -v r="$root/" 'index($0, r) == 1' | sort -r; }

# Processes still running inside the root are ours (this script started them): end them by
# id, then unmount what this script mounted. An rm -rf with /dev still bound would reach the host.
cleanup() {
  local pid left
  for pid in /proc/[0-9]*; do
    pid="${pid#/proc/}"
    if [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  for left in $(mounted_under); do umount -R "$left" 2>/dev/null || umount -l "$left" 2>/dev/null || true; done
  if [ "$keep" = 0 ] && [ -d "$root" ]; then
    if [ -n "$(mounted_under)" ]; then
      say "not removing $root: still mounted there: $(mounted_under | tr '\n' ' ')"
    else
      rm -rf --one-file-system "$root"
    fi
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

host_mirror() {
  local found
  found="$({
    grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print ($2 ~ /^\[/) ? $3 : $2}'
  } | grep -v security | grep '/debian/*$' | sed -n 1p || true)"
  echo "${found:-http://deb.debian.org/debian}"
}

# A clean environment, as a login on the new machine would have; pip's own settings (PIP_*)
# and proxies are the host's, like its pip configuration files.
root_env=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM="${TERM:-dumb}")
while IFS='=' read -r name _; do
  case "$name" in PIP_* | http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY) root_env+=("$name=${!name}") ;; esac
done < <(env)
in_root() { chroot "$root" env -i "${root_env[@]}" "$@"; }

timings=()
step_start() { step_name="$1" && step_t0=$SECONDS && say "$1"; }
step_done() { timings+=("$(printf '%-44s %5d s %s' "$step_name" $((SECONDS - step_t0)) "${1:-}")") && say "done: $step_name ($((SECONDS - step_t0)) s) ${1:-}"; }

mkdir -p "$logs"
say "root $root (logs in $logs), project from $src"
command -v debootstrap >/dev/null 2>&1 || {
  say "installing debootstrap on the host"
  apt-get install -y -q debootstrap >"$logs/host-apt.log" 2>&1 || { tail "$logs/host-apt.log"; die "apt-get install debootstrap"; }
}

# ---------------------------------------------------------------- the fresh root
if [ "$reuse" = 1 ] && [ -f "$root/.livediff-base-ok" ]; then
  say "--reuse: keeping the OS of the root built $(stat -c %y "$root/.livediff-base-ok" | cut -d. -f1)"
else
  [ -z "$(mounted_under)" ] || die "something is still mounted under $root"
  rm -rf --one-file-system "$root"
  mirror="${mirror:-$(host_mirror)}"
  step_start "debootstrap --variant=minbase $suite from $mirror"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$logs/debootstrap.log" 2>&1 \
    || { tail -n 20 "$logs/debootstrap.log"; die "debootstrap (log $logs/debootstrap.log)"; }
  step_done
fi

mount -t proc proc "$root/proc"
for fs in sys dev; do mount --rbind "/$fs" "$root/$fs" && mount --make-rslave "$root/$fs"; done
cp -L /etc/resolv.conf "$root/etc/resolv.conf"

# The host's pip configuration (files and PIP_* variables), and the local folders it names.
for conf in /etc/pip.conf /etc/xdg/pip "$HOME/.config/pip" "$HOME/.pip"; do
  if [ -e "$conf" ]; then
    dest="$root${conf/#$HOME//root}"
    mkdir -p "$(dirname "$dest")" && rm -rf "$dest" && cp -a "$conf" "$dest"
    say "copied pip configuration $conf"
  fi
done
local_dirs="$(
  { cat /etc/pip.conf /etc/xdg/pip/* "$HOME/.config/pip/"* "$HOME/.pip/"* 2>/dev/null; env | grep '^PIP_'; } \
    | grep -oE '(file://)?/[^ ,"'"'"']+' | sed 's|^file://||' | grep -v -e '^/etc/' -e "^$HOME/" \
    | awk -F/ 'NF >= 3 {print "/" $2 "/" $3}' | sort -u
)"
du_skip=()  # the root's size leaves these out: they are the host's
for dir in $local_dirs; do
  du_skip+=(--exclude="$root$dir")
  if [ -d "$dir" ]; then
    mkdir -p "$root$dir" && mount --bind "$dir" "$root$dir" && mount -o remount,bind,ro "$root$dir"
    say "mounted $dir read-only (named by the host's pip configuration)"
  fi
done
mkdir -p "$root/usr/local/share/ca-certificates"
cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/" 2>/dev/null || true

if [ ! -f "$root/.livediff-base-ok" ]; then
  step_start "apt-get install git python3 python3-pip python3-venv curl in the root"
  in_root sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q git python3 python3-pip python3-venv curl ca-certificates' \
    >"$logs/apt-base.log" 2>&1 || { tail -n 20 "$logs/apt-base.log"; die "apt-get in the root (log $logs/apt-base.log)"; }
  step_done
  touch "$root/.livediff-base-ok"
fi
in_root update-ca-certificates >"$logs/ca.log" 2>&1 || { cat "$logs/ca.log"; die "update-ca-certificates"; }
say "the root's Python: $(in_root python3 -V 2>&1); PEP 668 marker: $(in_root sh -c 'ls /usr/lib/python3*/EXTERNALLY-MANAGED' 2>&1)"

# ---------------------------------------------------------------- the project, as in this checkout
step_start "copy the checkout (git clone + this working tree's changes)"
proj="$root/root/livediff"
rm -rf "$proj"
git clone -q "$src" "$proj"
(cd "$src" && git ls-files -z -co --exclude-standard) \
  | (cd "$src" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$proj" -xf -
(cd "$src" && git ls-files -z -d) | (cd "$proj" && xargs -0 -r rm -f)
step_done "($(git -C "$proj" status --short | wc -l) files differ from HEAD $(git -C "$src" rev-parse --short HEAD))"

# ---------------------------------------------------------------- scripts/serve.sh
serve_result="not run"
if [ "$do_serve" = 1 ]; then
  step_start "scripts/serve.sh --model tiny --weights random --port $port, until /healthz answers"
  # Not through in_root: $! must be the process that setsid makes a group leader, to stop it.
  chroot "$root" env -i "${root_env[@]}" setsid bash -c \
    "cd /root/livediff && exec scripts/serve.sh --model tiny --weights random --port $port" \
    >"$logs/serve.log" 2>&1 &
  serve_pid=$!
  tail -n +1 -f --pid="$serve_pid" "$logs/serve.log" | sed -u 's/^/  serve | /' >&2 &
  deadline=$((SECONDS + ${LIVEDIFF_CHECK_SERVE_TIMEOUT:-2700}))
  health=""
  while [ $SECONDS -lt $deadline ] && kill -0 "$serve_pid" 2>/dev/null; do
    health="$(in_root curl -fsS --max-time 5 "http://127.0.0.1:$port/healthz" 2>/dev/null)" && break
    sleep 3
  done
  if [ -n "$health" ]; then
    serve_result="served: /healthz said $health"
  else
    serve_result="did not serve (log $logs/serve.log)"
  fi
  kill -TERM -- "-$serve_pid" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$serve_pid" 2>/dev/null || true
  wait "$serve_pid" 2>/dev/null || true
  step_done "$serve_result"
  [ -n "$health" ] || die "serve.sh $serve_result"
  venv_size="$(du -sh "$proj/.venv" 2>/dev/null | cut -f1)"
  say "after serve.sh: .venv holds ${venv_size:-nothing}"
fi

# ---------------------------------------------------------------- scripts/test.sh
test_result="not run"
if [ "$do_test" = 1 ]; then
  step_start "scripts/test.sh ${pytest_args:-(the full suite)}"
  set +e
  # shellcheck disable=SC2086 # --pytest's words are separate arguments
  in_root bash -c 'cd /root/livediff && exec scripts/test.sh "$@"' test.sh $pytest_args 2>&1 \
    | tee "$logs/test.log" | sed -u 's/^/  test | /' >&2
  rc=${PIPESTATUS[0]}
  set -e
  test_result="exit $rc: $(grep -E '(passed|failed|error|skipped).* in [0-9.]+s' "$logs/test.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')"
  step_done "$test_result"
fi

torch_built="$(in_root /root/livediff/.venv/bin/python -c 'import torch; print(torch.__version__, "CUDA " + torch.version.cuda if torch.version.cuda else "CPU")' 2>/dev/null || echo "none")"
{
  echo "fresh $suite root, $(in_root python3 -V 2>&1), project at $(git -C "$src" rev-parse --short HEAD) + working tree"
  printf '%s\n' "${timings[@]}"
  echo "serve.sh: $serve_result"
  echo "test.sh:  $test_result"
  echo ".venv: $(du -sh "$proj/.venv" 2>/dev/null | cut -f1) (torch $torch_built); root: $(du -sh --one-file-system "${du_skip[@]}" "$root" | cut -f1)"
} | tee "$logs/summary.txt" >&2
[ "$do_test" = 0 ] || [ "${rc:-1}" = 0 ] || die "scripts/test.sh exited $rc (log $logs/test.log)"
say "PASSED"
