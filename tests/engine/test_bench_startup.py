"""The ``startup`` suite on CPU: real ``livediff serve`` processes timed to their first frame."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livediff.bench import startup
from livediff.bench.records import REQUIRED_KEYS


@pytest.mark.slow
def test_startup_records_each_cache_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "startup.jsonl"
    argv = ["--model", "tiny", "--backend", "eager", "--buckets", "1,2", "--timeout", "240"]
    assert startup.main([*argv, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["cache"] for r in records] == ["cold", "warm", "packaged"]
    for r in records:
        assert all(key in r for key in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert r["suite"] == "startup" and 0 < r["listening_s"] <= r["first_frame_s"]
        assert r["buckets"] == "1,2" and r["backend"] == "eager"
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed == records


def test_unknown_cache_states_are_refused() -> None:
    with pytest.raises(SystemExit):
        startup.parse_args(["--caches", "cold,lukewarm"])
