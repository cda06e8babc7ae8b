"""The ``multi`` benchmark's CPU smoke run: it runs, prints complete JSON lines and draws its plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livediff.bench import multi
from livediff.bench.records import REQUIRED_KEYS

MULTI_KEYS = (
    *REQUIRED_KEYS,
    "latency_ms_p50",
    "latency_ms_p99",
    "drop_rate",
    "gpu_mem_peak_mb",
)


@pytest.mark.slow
def test_multi_smoke_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "multi.png"
    argv = ["--model", "tiny", "--weights", "random", "--sessions", "1,2", "--seconds", "2"]
    assert multi.main([*argv, "--plot", str(plot)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [(r["system"], r["sessions"]) for r in records] == [
        ("livediff", 1),
        ("independent", 1),
        ("livediff", 2),
        ("independent", 2),
    ]
    for r in records:
        assert all(key in r for key in MULTI_KEYS), set(MULTI_KEYS) - set(r)
        assert (r["suite"], r["model"], r["weights"], r["steps"]) == ("multi", "tiny", "random", 1)
        assert r["fps"] > 0 and 0 <= r["drop_rate"] <= 1
        assert r["latency_ms_p50"] <= r["latency_ms_p99"]
        assert r["device"] == "cpu" and r["gpu_mem_peak_mb"] is None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
