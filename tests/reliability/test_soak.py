"""``livediff bench --suite soak`` on CPU: the records, the plot, and that a crash is recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from livediff.bench import soak
from livediff.bench.records import REQUIRED_KEYS, read_records
from livediff.cli import main as cli_main
from livediff.engine.worker import Worker

pytestmark = pytest.mark.slow
TINY = ["--model", "tiny", "--weights", "random", "--frame-size", "128", "--fps", "10"]


def test_the_soak_suite_records_intervals_and_a_clean_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "soak.jsonl", tmp_path / "soak.png"
    argv = [*TINY, "--sessions", "2", "--minutes", "0.2", "--interval", "4", "--buckets", "1,2"]
    status = cli_main(["bench", "--suite", "soak", *argv, "--out", str(out), "--plot", str(png)])
    assert status == 0
    records = read_records(out)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert printed == records
    assert [r["phase"] for r in records] == ["interval"] * 3 + ["summary"]
    for record in records:
        assert set(REQUIRED_KEYS) <= set(record)
        assert (record["suite"], record["sessions"], record["model"]) == ("soak", 2, "tiny")
        assert record["batch_buckets"] == [1, 2]
    intervals, summary = records[:-1], records[-1]
    assert [r["t_s"] for r in intervals] == [4.0, 8.0, 12.0]
    assert all(r["sessions_alive"] == 2 and r["frames"] > 0 for r in intervals)
    assert all(r["latency_ms_p50"] <= r["latency_ms_p99"] for r in intervals)
    assert (summary["crashes"], summary["lost_sessions"], summary["ok"]) == (0, 0, True)
    assert summary["frames"] == sum(r["frames"] for r in intervals)
    assert png.stat().st_size > 10_000
    replotted = tmp_path / "again.png"
    assert soak.main(["--replot", str(out), "--plot", str(replotted)]) == 0
    assert replotted.stat().st_size > 10_000


def test_a_worker_crash_during_the_soak_is_recorded_and_fails_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Worker._round
    crashed: list[bool] = []

    def crash_once(self: Worker) -> Any:
        if not crashed and len(self._sessions) == 2:  # once both sessions are on the worker
            crashed.append(True)
            raise RuntimeError("injected: the worker loop fails once")
        return original(self)

    monkeypatch.setattr(Worker, "_round", crash_once)
    out = tmp_path / "soak.jsonl"
    argv = [*TINY, "--sessions", "2", "--minutes", "0.1", "--interval", "3"]
    assert soak.main([*argv, "--out", str(out), "--plot", ""]) == 1
    summary = read_records(out)[-1]
    assert summary["phase"] == "summary" and summary["ok"] is False
    assert summary["crashes"] == 3  # the restart, and the two sessions it failed
    assert summary["lost_sessions"] == 2 and summary["sessions_alive"] == 0
    assert all("engine worker failed" in reason for reason in summary["ended"])
