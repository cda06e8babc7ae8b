"""The install scripts' choices and messages (scripts/_env.sh, install.sh, serve.sh, test.sh,
.ci/run), run for real against a fake ``python3`` and a fake ``apt-get``: nothing is downloaded.

The fake python answers the scripts' fact probes (``# livediff-facts``) from FAKE_* variables,
makes a stand-in venv for ``-m venv``, and logs ``-m pip``/``-m pytest``/... calls to a file
instead of running them; any other code (scripts/_pip_plan.py: the index probe, the plan
summary) runs in the real interpreter. Also here: the pytest summary's account of the tests
that run inside the loopback network namespace (tests/helpers/streams_testing.py).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9/whl/cpu"  # the discard port: connection refused at once
TOOLS = (
    "bash env dirname basename sed awk cksum tr cut sort paste du mktemp rm tail id cat mkdir ln"
)

FAKE_PYTHON = r"""#!{real}
import json, os, sys
from pathlib import Path

me = Path(sys.argv[0])
venv = me.parent.parent if (me.parent.parent / "pyvenv.cfg").exists() else None
args = sys.argv[1:]
state = Path(os.environ["FAKE_STATE"]) / (venv.name if venv else "base")

def log(*what):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps([str(me), *what]) + "\n")

if args[:1] == ["-c"] and "# livediff-facts" in args[1]:
    env = os.environ
    facts = dict(
        version=env.get("FAKE_VERSION", "3.13.5"), executable=str(me),
        prefix=str(venv or state), in_venv=int(bool(venv)),
        externally_managed=0 if venv else env.get("FAKE_EM", "1"),
        can_venv=env.get("FAKE_CAN_VENV", "1"), pip="25.1" if venv else env.get("FAKE_PIP", "25.1"),
        livediff=int((state / "livediff").exists()), torch=int((state / "torch").exists()),
    )
    print("\n".join(f"{{k}}={{v}}" for k, v in facts.items()))
elif args[:1] == ["-c"] and "import torch" in args[1]:
    print("torch 2.13.0 (CUDA 13.0 build)")  # what install.sh reports at the end
elif args[:1] == ["-c"] and "import triton" in args[1]:
    pass  # "installed": test.sh does not install it
elif args[:2] == ["-m", "venv"]:
    log("venv", *args[2:])
    if os.environ.get("FAKE_VENV_FAILS"):
        sys.exit("Error: ensurepip is not available")
    target = Path(args[2])
    (target / "bin").mkdir(parents=True)
    (target / "pyvenv.cfg").write_text("home = fake\n")
    (target / "bin" / "python").symlink_to(me.resolve())
elif args[:1] == ["-m"]:
    log(*args[1:])
    if args[1] == "pip" and "--dry-run" in args:
        Path(args[args.index("--report") + 1]).write_text(os.environ["FAKE_REPORT"])
    elif args[1] == "pip":
        state.mkdir(parents=True, exist_ok=True)
        for word in args:
            for name in ("torch", "livediff"):
                if word.startswith(name) or (name == "livediff" and word.startswith(".[")):
                    (state / name).touch()
    sys.exit(int(os.environ.get("FAKE_PIP_RC", "0")) if args[1] == "pip" else 0)
else:
    os.execv(sys.executable, [sys.executable, *args])  # scripts/_pip_plan.py: for real
"""

FAKE_APT = r"""#!/bin/bash
# A stand-in apt-get: the summary lines apt prints, its Status-Fd lines, or a failure.
echo "apt-get $*" >>"$FAKE_APT_LOG"
case "$*" in
  update*) echo "Hit:1 http://deb.debian.org/debian trixie InRelease" ;;
  *--assume-no*)
    echo "0 upgraded, 333 newly installed, 0 to remove and 0 not upgraded."
    echo "Need to get 283 MB of archives."
    echo "After this operation, 1095 MB of additional disk space will be used."
    exit 1 ;;
  *)
    if [ -n "${FAKE_APT_FAILS:-}" ]; then
      echo "E: Unable to locate package chromium" >&2
      exit 100
    fi
    for pct in 5 25 50 75 99; do echo "dlstatus:$pct:$pct.0000:Retrieving file $pct of 333"; done
    echo "Unpacking chromium (150.0-1) ..."
    for pct in 10 30 55 80 100; do echo "pmstatus:chromium:$pct.0000:Installing chromium"; done ;;
esac
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A copy of the scripts in a repository-like folder, a PATH of only the tools they use
    plus the fake python3, and the FAKE_* settings; yields the pieces a test needs."""
    if sys.platform == "win32" or shutil.which("bash") is None:
        pytest.skip("needs bash")
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copytree(REPO / "scripts", repo / "scripts")
    shutil.copy(REPO / "pyproject.toml", repo)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    sysbin = tmp_path / "sysbin"
    sysbin.mkdir()
    for tool in TOOLS.split():
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"needs {tool}")
        (sysbin / tool).symlink_to(found)
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    fake = fakebin / "python3"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable))
    fake.chmod(0o755)
    cuda_file = tmp_path / "nvidia_cublas-13.1-py3-none-manylinux_2_27_x86_64.whl"
    cuda_file.write_bytes(b"\0" * 3_000_000)
    torch_file = tmp_path / "torch-2.13.0-cp313-cp313-manylinux_2_28_x86_64.whl"
    torch_file.write_bytes(b"\0" * 5_000_000)
    report = {
        "install": [
            {
                "metadata": {"name": "torch", "version": "2.13.0"},
                "download_info": {"url": torch_file.as_uri()},
            },
            {
                "metadata": {"name": "nvidia-cublas", "version": "13.1"},
                "download_info": {"url": cuda_file.as_uri()},
            },
        ]
    }
    env = {
        "PATH": f"{fakebin}:{sysbin}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "FAKE_LOG": str(tmp_path / "calls.jsonl"),
        "FAKE_STATE": str(tmp_path / "state"),
        "FAKE_APT_LOG": str(tmp_path / "apt.log"),
        "FAKE_REPORT": json.dumps(report),
        "LIVEDIFF_TORCH_INDEX": UNREACHABLE,
        "LIVEDIFF_APT": "0",
    }
    yield {"repo": repo, "env": env, "fakebin": fakebin, "tmp": tmp_path}


def run(
    sandbox: dict[str, object], script: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    repo = sandbox["repo"]
    assert isinstance(repo, Path)
    return subprocess.run(
        ["bash", str(repo / script), *args],
        env={**sandbox["env"], **env},  # type: ignore[dict-item]
        capture_output=True,
        text=True,
        timeout=60,
    )


def calls(sandbox: dict[str, object]) -> list[list[str]]:
    log = Path(str(sandbox["env"]["FAKE_LOG"]))  # type: ignore[index]
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_externally_managed_python_gets_a_project_venv_and_says_so(
    sandbox: dict[str, object],
) -> None:
    done = run(sandbox, "scripts/install.sh", "webrtc")
    assert done.returncode == 0, done.stderr
    repo = sandbox["repo"]
    assert isinstance(repo, Path)
    assert (repo / ".venv" / "pyvenv.cfg").exists()
    assert "managed by the OS (PEP 668" in done.stderr
    assert "creating the virtualenv .venv" in done.stderr
    assert "using the project's new virtualenv .venv" in done.stderr
    pips = [c for c in calls(sandbox) if c[1] == "pip"]
    assert pips, calls(sandbox)
    # Every install goes into the venv, never into the system Python.
    assert all(c[0] == str(repo / ".venv" / "bin" / "python") for c in pips)
    assert any(c[-1] == ".[webrtc]" and "-e" in c for c in pips)


def test_no_silent_fallback_when_the_cpu_index_is_unreachable(sandbox: dict[str, object]) -> None:
    done = run(sandbox, "scripts/install.sh", "webrtc")
    assert done.returncode == 0, done.stderr
    assert f"the CPU build of torch could not be fetched from {UNREACHABLE}" in done.stderr
    # What comes instead is said before it is installed: which build, from where, how big.
    line = next(x for x in done.stderr.splitlines() if "installing instead:" in x)
    assert "torch 2.13.0, the CUDA build" in line and "8 MB to download" in line, line
    pips = [c[2:] for c in calls(sandbox) if c[1] == "pip"]
    dry = next(i for i, c in enumerate(pips) if "--dry-run" in c)
    assert pips[dry + 1] == ["install", "torch==2.13.0"]  # the plan, then that install
    assert not any("--index-url" in c for c in pips)
    assert "installed livediff[webrtc] with torch 2.13.0 (CUDA 13.0 build)" in done.stderr


@pytest.fixture
def cpu_index() -> Iterator[str]:
    """A local HTTP server standing in for PyTorch's CPU index (it only has to answer)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    server.server_close()


def test_reachable_cpu_index_gives_the_cpu_build(
    sandbox: dict[str, object], cpu_index: str
) -> None:
    done = run(sandbox, "scripts/install.sh", "webrtc", LIVEDIFF_TORCH_INDEX=cpu_index)
    assert done.returncode == 0, done.stderr
    assert f"installing torch==2.13.0, the CPU build, from {cpu_index}" in done.stderr
    pips = [c[2:] for c in calls(sandbox) if c[1] == "pip"]
    assert ["install", "torch==2.13.0", "--index-url", cpu_index] in pips
    assert not any("--dry-run" in c for c in pips)


def test_a_second_run_reuses_the_venv_and_skips_pip(sandbox: dict[str, object]) -> None:
    assert run(sandbox, "scripts/install.sh", "webrtc,dev").returncode == 0
    before = len(calls(sandbox))
    again = run(sandbox, "scripts/install.sh", "webrtc")  # a subset of what is installed
    assert again.returncode == 0, again.stderr
    assert "creating" not in again.stderr
    assert "using the project's virtualenv .venv" in again.stderr
    assert "nothing to install" in again.stderr
    assert len(calls(sandbox)) == before


def test_missing_python3_venv_names_the_os_package(sandbox: dict[str, object]) -> None:
    done = run(sandbox, "scripts/serve.sh", FAKE_CAN_VENV="0")
    assert done.returncode == 1
    assert "apt install python3-venv" in done.stderr and "python3.13-venv" in done.stderr
    repo = sandbox["repo"]
    assert isinstance(repo, Path)
    assert not (repo / ".venv").exists()
    assert not [c for c in calls(sandbox) if c[1] in ("pip", "livediff")]


def test_a_failed_venv_is_removed_not_left_half_made(sandbox: dict[str, object]) -> None:
    done = run(sandbox, "scripts/install.sh", FAKE_VENV_FAILS="1")
    assert done.returncode == 1
    assert "python3-venv" in done.stderr
    repo = sandbox["repo"]
    assert isinstance(repo, Path)
    assert not (repo / ".venv").exists()


def test_a_python_that_is_not_externally_managed_is_used_as_is(sandbox: dict[str, object]) -> None:
    done = run(sandbox, "scripts/install.sh", FAKE_EM="0")
    assert done.returncode == 0, done.stderr
    repo = sandbox["repo"]
    assert isinstance(repo, Path)
    assert not (repo / ".venv").exists()
    assert "using python3 itself" in done.stderr
    fake = str(sandbox["fakebin"]) + "/python3"
    assert {c[0] for c in calls(sandbox) if c[1] == "pip"} == {fake}
    # LIVEDIFF_VENV=1 asks for the venv anyway.
    forced = run(sandbox, "scripts/install.sh", FAKE_EM="0", LIVEDIFF_VENV="1")
    assert forced.returncode == 0, forced.stderr
    assert (repo / ".venv" / "pyvenv.cfg").exists()


def test_an_active_virtualenv_is_used(sandbox: dict[str, object]) -> None:
    tmp = sandbox["tmp"]
    assert isinstance(tmp, Path)
    active = tmp / "mine"
    (active / "bin").mkdir(parents=True)
    (active / "pyvenv.cfg").write_text("home = fake\n")
    (active / "bin" / "python").symlink_to(Path(str(sandbox["fakebin"])) / "python3")
    done = run(sandbox, "scripts/install.sh", VIRTUAL_ENV=str(active))
    assert done.returncode == 0, done.stderr
    assert f"using the active virtualenv {active}" in done.stderr
    assert {c[0] for c in calls(sandbox) if c[1] == "pip"} == {str(active / "bin" / "python")}


def test_python_older_than_3_10_is_refused_with_a_hint(sandbox: dict[str, object]) -> None:
    done = run(sandbox, "scripts/install.sh", FAKE_EM="0", FAKE_VERSION="3.9.18")
    assert done.returncode == 1
    assert "needs Python >= 3.10" in done.stderr and "LIVEDIFF_PYTHON" in done.stderr


def test_serve_runs_livediff_from_the_venv(sandbox: dict[str, object]) -> None:
    repo = sandbox["repo"]
    assert isinstance(repo, Path)
    served = run(sandbox, "scripts/serve.sh", "--port", "1")
    assert served.returncode == 0, served.stderr
    assert [str(repo / ".venv/bin/python"), "livediff", "serve", "--port", "1"] in calls(sandbox)
    assert served.stderr.count("using the project's") == 1  # said once, not again by install.sh


@pytest.mark.parametrize("managed", ["1", "0"])
def test_ci_tests_and_lints_with_one_interpreter(sandbox: dict[str, object], managed: str) -> None:
    """.ci/run: pytest (through test.sh), ruff and mypy all run by the Python test.sh installed
    into: the project's .venv where python3 is externally managed, python3 itself (CI) if not."""
    repo = sandbox["repo"]
    assert isinstance(repo, Path)
    ci = run(sandbox, ".ci/run", FAKE_EM=managed)
    assert ci.returncode == 0, ci.stderr
    ran = {c[1]: c[0] for c in calls(sandbox) if c[1] in ("pip", "pytest", "ruff", "mypy")}
    want = (
        str(repo / ".venv/bin/python") if managed == "1" else str(sandbox["fakebin"]) + "/python3"
    )
    assert ran == dict.fromkeys(("pip", "pytest", "ruff", "mypy"), want)
    assert (repo / ".venv").exists() == (managed == "1")


def test_the_test_command_installs_ray_serve_and_says_how_big(sandbox: dict[str, object]) -> None:
    done = run(sandbox, "scripts/test.sh", "-k", "nothing")
    assert done.returncode == 0, done.stderr
    assert any(c[1] == "pip" and c[-1] == ".[webrtc,dev,ray,creative]" for c in calls(sandbox))
    assert (
        "Ray Serve (the ray extra) about 105 MB more to download, 300 MB installed" in done.stderr
    )
    assert "OSC and NDI (the creative extra, with the NDI runtime) about 11 MB" in done.stderr


def test_apt_step_says_what_and_how_big_and_shows_progress(sandbox: dict[str, object]) -> None:
    if os.geteuid() != 0:
        pytest.skip("test.sh runs apt-get itself only as root (else through sudo)")
    fakebin = sandbox["fakebin"]
    assert isinstance(fakebin, Path)
    (fakebin / "apt-get").write_text(FAKE_APT)
    (fakebin / "apt-get").chmod(0o755)
    done = run(
        sandbox, "scripts/test.sh", "-k", "nothing", LIVEDIFF_APT="1", TMPDIR=str(sandbox["tmp"])
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert (
        "apt-get: installing chromium iproute2 util-linux: 333 new packages, 283 MB to download, 1095 MB of disk"
        in err
    )
    assert "apt-get: downloading, 0%" in err and "apt-get: installing, 100%" in err
    assert "Unpacking chromium" not in err  # apt's own lines go to the log...
    assert "apt-get: installed chromium iproute2 util-linux in" in err
    failed = run(
        sandbox, "scripts/test.sh", LIVEDIFF_APT="1", FAKE_APT_FAILS="1", TMPDIR=str(sandbox["tmp"])
    )
    assert failed.returncode == 1
    assert "E: Unable to locate package chromium" in failed.stderr  # ...but errors are shown
    assert "LIVEDIFF_APT=0" in failed.stderr


# ---------------------------------------------------------------- the loopback-netns summary
INNER_OUTPUT = """\
..F.
=========================== short test summary info ============================
PASSED tests/streams/test_webrtc.py::test_two_sessions
PASSED tests/streams/test_webrtc.py::test_offer[a b]
FAILED tests/streams/test_webrtc.py::test_close - AssertionError: assert 1 == 2
SKIPPED [1] tests/streams/test_webrtc.py:90: needs Chromium
2 passed, 1 failed, 1 skipped in 3.21s
"""


def test_inner_run_output_is_parsed() -> None:
    from helpers.streams_testing import parse_inner_run

    run_ = parse_inner_run(INNER_OUTPUT)
    assert run_.outcomes == {
        "tests/streams/test_webrtc.py::test_two_sessions": "passed",
        "tests/streams/test_webrtc.py::test_offer[a b]": "passed",
        "tests/streams/test_webrtc.py::test_close": "failed",
    }
    assert run_.counts == {"passed": 2, "failed": 1, "skipped": 1}


def test_summary_counts_tests_run_in_the_netns_as_run_not_skipped(
    request: pytest.FixtureRequest,
) -> None:
    """tests/conftest.py's hook on a terminal reporter of its own: two tests skipped here that
    passed in the inner run leave the "skipped" count for their own word; a real skip stays."""
    from helpers.streams_testing import NETNS_RUNS, parse_inner_run

    (root_conftest,) = [
        p
        for p in request.config.pluginmanager.get_plugins()
        if getattr(p, "__file__", None) == str(REPO / "tests" / "conftest.py")
    ]
    out = io.StringIO()
    reporter = pytest.TerminalReporter(request.config, out)
    # Its own stash: the real run's summary must not see this made-up inner run.
    reporter.config = types.SimpleNamespace(stash=pytest.Stash())  # type: ignore[assignment]
    reporter.config.stash[NETNS_RUNS] = [
        parse_inner_run("PASSED m.py::test_a\nPASSED m.py::test_b\n2 passed in 1.00s\n")
    ]
    reporter.stats = {
        "passed": [types.SimpleNamespace(nodeid="m.py::test_in_loopback_netns")],
        "skipped": [types.SimpleNamespace(nodeid=f"m.py::test_{x}") for x in "abc"],
    }
    root_conftest.pytest_terminal_summary(terminalreporter=reporter)
    reporter.config = request.config
    assert [r.nodeid for r in reporter.stats["skipped"]] == ["m.py::test_c"]
    final, _ = reporter.build_summary_stats_line()
    assert [text for text, _ in final] == ["1 passed", "1 skipped", "2 passed in netns"]
    assert "WebRTC tests inside a loopback-only network namespace: 2 passed" in out.getvalue()
