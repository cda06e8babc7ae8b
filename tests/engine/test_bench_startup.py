"""The ``startup`` suite on CPU: real ``livediff serve`` processes timed to their first frame."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livediff.bench import startup
from livediff.bench.records import REQUIRED_KEYS
from livediff.exceptions import LivediffError


@pytest.mark.slow
def test_startup_records_each_cache_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "startup.jsonl"
    argv = ["--model", "tiny", "--backend", "eager", "--buckets", "1,2", "--timeout", "240"]
    logs = tmp_path / "logs"
    assert startup.main([*argv, "--out", str(out), "--logs", str(logs)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["cache"] for r in records] == ["cold", "warm", "packaged"]
    for r in records:
        assert all(key in r for key in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert r["suite"] == "startup" and 0 < r["listening_s"] <= r["first_frame_s"]
        assert r["buckets"] == "1,2" and r["backend"] == "eager"
        assert r["compile_batch"] == "per-bucket"
        # the server's own account, from its stderr: each part no longer than the whole
        before, load, engine = r["before_load_s"], r["load_s"], r["engine_start_s"]
        assert before > 0 and min(load, engine) >= 0
        assert before + load + engine <= r["listening_s"] + 0.15  # each printed to 0.1 s
        assert (r["prepare_s"], r["compile"], r["other_s"]) == (None, None, None)  # eager
        assert "model loaded in" in (logs / f"serve-{r['cache']}.log").read_text()
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed == records


def test_the_start_account_is_read_from_the_servers_lines() -> None:
    lines = (
        "livediff serve: cuda:0: loading began 9.8 s after the process started; model loaded in "
        "3.2 s; compile + capture 41.5 s (from the packaged compile cache /c/k.bin; Inductor "
        "cache: 7 of 7 graphs read, 0 generated)\n"
        "livediff serve: cuda:1: model loaded; compile + capture 9.0 s (compiled)\n"
        "livediff serve: engine started in 0.7 s; listening 55.4 s after the process started\n"
    )
    account = startup.start_account(f"noise\n{lines}more\n")
    assert (account["before_load_s"], account["load_s"]) == (9.8, 3.2)
    assert (account["prepare_s"], account["engine_start_s"]) == (41.5, 0.7)  # the first device
    assert account["compile"].endswith("Inductor cache: 7 of 7 graphs read, 0 generated")
    assert startup.start_account("nothing said") == dict.fromkeys(startup.ACCOUNT)


def test_a_packaged_start_without_a_package_is_refused(tmp_path: Path) -> None:
    """``--caches packaged`` alone needs the package a cold run left in ``--keep``."""
    argv = ["--model", "tiny", "--backend", "eager", "--caches", "packaged"]
    with pytest.raises(LivediffError, match=r"no compile package in .*measure --caches cold"):
        startup.main([*argv, "--keep", str(tmp_path / "kept")])


def test_unknown_cache_states_are_refused() -> None:
    with pytest.raises(SystemExit):
        startup.parse_args(["--caches", "cold,lukewarm"])
