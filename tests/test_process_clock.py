"""The process's age, which ``livediff serve`` prints in its start-up account: it counts from
the process's start (the interpreter and imports included), not from some later import."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livediff.process_clock import seconds_since_start

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux's /proc")
def test_the_age_counts_from_the_process_start() -> None:
    code = (
        "import time; time.sleep(0.5)\n"
        "from livediff.process_clock import seconds_since_start\n"
        "print(seconds_since_start())"
    )
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    age = float(done.stdout.strip())
    assert 0.5 <= age <= elapsed + 0.05  # /proc counts in 10 ms steps
    assert seconds_since_start() is not None  # this process too


def test_without_proc_the_age_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("/proc/self/stat")

    monkeypatch.setattr("builtins.open", no_proc)
    assert seconds_since_start() is None
