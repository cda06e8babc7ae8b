# shellcheck shell=bash
# Sourced by install.sh, serve.sh, test.sh and .ci/run: picks the Python that livediff is
# installed into and run with, and says which. In order:
#   1. an active virtualenv ($VIRTUAL_ENV) or conda env ($CONDA_PREFIX);
#   2. the project's .venv, if an earlier run made it;
#   3. a new .venv, when pip may not install into the system Python (PEP 668: Debian 12+,
#      Ubuntu 23.04+ mark it "externally managed") or when LIVEDIFF_VENV=1;
#   4. else python3 itself (pyenv, python.org builds, CI).
# Settings: LIVEDIFF_PYTHON (default python3), LIVEDIFF_VENV=1|0 (always|never make .venv),
# LIVEDIFF_VENV_DIR (default .venv in the repository).
# After livediff_env: $PY is the interpreter, $LIVEDIFF_WHERE says where it is, and a venv's
# bin/ leads PATH so that livediff, ruff and mypy are the ones installed there.

LIVEDIFF_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIVEDIFF_ME="${LIVEDIFF_ME:-$(basename "$0")}"

say() { printf '%s: %s\n' "$LIVEDIFF_ME" "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# One call that tells what matters about an interpreter, as key=value lines. The marker
# comment lets the install tests' fake python answer it.
py_facts() {
  "$1" -c '# livediff-facts
import importlib.util as u, os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
in_venv = sys.prefix != sys.base_prefix
try:
    import pip
    pip_version = pip.__version__
except Exception:
    pip_version = ""
print("version=%d.%d.%d" % sys.version_info[:3])
print("executable=" + sys.executable)
print("prefix=" + sys.prefix)
print("in_venv=%d" % in_venv)
print("externally_managed=%d" % (os.path.exists(marker) and not in_venv))
print("can_venv=%d" % bool(u.find_spec("venv") and u.find_spec("ensurepip")))
print("pip=" + pip_version)
print("livediff=%d" % bool(u.find_spec("livediff")))
print("torch=%d" % bool(u.find_spec("torch")))'
}

fact() { sed -n "s/^$1=//p" <<<"$2"; }

# Python >= 3.10 and a working pip, or a message that says what to install.
check_python() {
  local py="$1" facts="$2" version
  version="$(fact version "$facts")"
  [ -n "$version" ] || die "$py did not run; install Python >= 3.10 or set LIVEDIFF_PYTHON"
  if ! printf '%s\n' "$version" | awk -F. '{exit !($1 > 3 || ($1 == 3 && $2 >= 10))}'; then
    die "livediff needs Python >= 3.10; $py is $version (set LIVEDIFF_PYTHON=python3.11, say)"
  fi
  if [ -z "$(fact pip "$facts")" ]; then
    die "$py ($version) has no pip; on Debian/Ubuntu: apt install python3-pip (or use a virtualenv)"
  fi
}

make_venv() {
  local base="$1" dir="$2" facts version
  facts="$(py_facts "$base" || true)"
  version="$(fact version "$facts")"
  [ -n "$version" ] || die "$base did not run; install Python >= 3.10 or set LIVEDIFF_PYTHON"
  if [ "$(fact can_venv "$facts")" != 1 ]; then
    local short="${version%.*}"
    die "$base (Python $version) cannot make a virtual environment: its venv/ensurepip module is missing.
  On Debian/Ubuntu install the OS package python3-venv:  apt install python3-venv  (or python${short}-venv), as root or with sudo,
  then run this again."
  fi
  say "creating the virtualenv ${dir#"$LIVEDIFF_REPO"/} with $base (Python $version); later runs use it (activate it yourself with: source ${dir#"$LIVEDIFF_REPO"/}/bin/activate)"
  if ! "$base" -m venv "$dir"; then
    rm -rf "$dir"  # a venv without pip would be picked up, broken, by the next run
    die "'$base -m venv $dir' failed (above); on Debian/Ubuntu: apt install python3-venv"
  fi
}

livediff_env() {
  # Set by an outer script (serve.sh or test.sh calling install.sh): same choice, said once.
  if [ -n "${LIVEDIFF_PY:-}" ]; then
    PY="$LIVEDIFF_PY"
    LIVEDIFF_FACTS="$(py_facts "$PY")" || die "$PY did not run"
    return
  fi
  local base="${LIVEDIFF_PYTHON:-python3}" venv="${LIVEDIFF_VENV_DIR:-$LIVEDIFF_REPO/.venv}"
  local want="${LIVEDIFF_VENV:-auto}" facts
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
    LIVEDIFF_WHERE="the active virtualenv $VIRTUAL_ENV"
  elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
    PY="$CONDA_PREFIX/bin/python"
    LIVEDIFF_WHERE="the active conda env $CONDA_PREFIX"
  elif [ "$want" = 0 ]; then
    PY="$base"
    LIVEDIFF_WHERE="$base itself (LIVEDIFF_VENV=0)"
  else
    if [ -e "$venv" ] && ! { [ -x "$venv/bin/python" ] && [ -n "$(fact pip "$(py_facts "$venv/bin/python")")" ]; }; then
      say "${venv#"$LIVEDIFF_REPO"/} is incomplete (no working python or pip in it): making it again"
      rm -rf "$venv"
    fi
    if [ -x "$venv/bin/python" ]; then
      LIVEDIFF_WHERE="the project's virtualenv ${venv#"$LIVEDIFF_REPO"/}"
    else
      facts="$(py_facts "$base" || true)"
      if [ "$want" = 1 ]; then
        say "LIVEDIFF_VENV=1: installing into a project virtualenv"
      elif [ "$(fact externally_managed "$facts")" = 1 ]; then
        say "$base is managed by the OS (PEP 668, \"externally-managed-environment\"): pip may not install into it, so livediff goes into a project virtualenv"
      else
        venv=""
      fi
      if [ -n "$venv" ]; then
        make_venv "$base" "$venv"
        LIVEDIFF_WHERE="the project's new virtualenv ${venv#"$LIVEDIFF_REPO"/}"
      else
        PY="$base"
        LIVEDIFF_WHERE="$base itself (not externally managed; LIVEDIFF_VENV=1 makes a .venv instead)"
      fi
    fi
    if [ -n "$venv" ]; then
      PY="$venv/bin/python"
      # Like `activate`: livediff, pytest, ruff and mypy resolve to the venv's.
      export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
    fi
  fi
  facts="$(py_facts "$PY")" || die "$PY did not run"
  check_python "$PY" "$facts"
  if [ "$PY" = "$base" ]; then
    PY="$(fact executable "$facts")"  # a pyenv shim resolves to the real interpreter
  fi
  # shellcheck disable=SC2034 # read by install.sh
  LIVEDIFF_FACTS="$facts"
  say "using $LIVEDIFF_WHERE (Python $(fact version "$facts"), $PY)"
  export LIVEDIFF_PY="$PY" LIVEDIFF_WHERE
}
