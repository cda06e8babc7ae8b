"""The ``e2e`` benchmark's CPU smoke run: a real ``livediff serve`` and an aiortc peer, in a netns.

It checks that the harness measures something real (frames came back carrying their markers,
the server reported its own latency samples) and prints complete records; not how fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from livediff.bench.netns import netns_tools_missing
from livediff.bench.records import REQUIRED_KEYS

REPO = Path(__file__).resolve().parents[2]
E2E_KEYS = (*REQUIRED_KEYS, "client", "latency_ms_p50", "latency_ms_p99", "frames")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_e2e_over_aiortc_in_a_loopback_netns(tmp_path: Path) -> None:
    missing = netns_tools_missing()
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} to make a loopback-only network namespace")
    config = tmp_path / "serve.toml"
    config.write_text("[runtime]\nbatch_buckets = [1, 2]\n")
    argv = [
        *(sys.executable, "-m", "livediff.bench.e2e", "--model", "tiny", "--weights", "random"),
        *("--backend", "eager", "--config", str(config)),
        *("--clients", "aiortc", "--sessions", "1", "--seconds", "4", "--warmup", "3"),
        *("--no-degrade", "--deadline-ms", "60000", "--netns"),
        *("--server-log", str(tmp_path / "server.log"), "--out", str(tmp_path / "e2e.jsonl")),
    ]
    result = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=540, env={**os.environ}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1, result.stdout[-2000:]
    (record,) = records
    assert all(key in record for key in E2E_KEYS), set(E2E_KEYS) - set(record)
    assert (record["suite"], record["client"], record["sessions"]) == ("e2e", "aiortc", 1)
    assert record["backend"] == "eager"
    assert record["frames"] > 0 and record["fps"] > 0
    assert 0 < record["latency_ms_p50"] <= record["latency_ms_p99"]
    assert 0 < record["ms_median"] <= record["ms_p99"]  # the server's own RTP in → RTP out
    assert record["device"] == "cpu"
    saved = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert saved == records
