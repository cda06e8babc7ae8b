"""The ``controlnet`` suite on CPU (tiny model): every case and system end to end, sane records,
a plot; no timing asserts. The diffusers peer runs too: the tiny model is SD-shaped, so
``StableDiffusionControlNetImg2ImgPipeline`` takes its UNet, TAESD and a ControlNet built from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from livediff.bench import controlnet_suite
from livediff.bench.records import REQUIRED_KEYS
from livediff.cli import main
from livediff.exceptions import UsageError

FIELDS = (
    "suite",
    "system",
    "case",
    "controlnets",
    "preprocessor",
    "sessions",
    "ms_median",
    "ms_p99",
    "fps",
    "latency_ms_p99",
    "drop_rate",
    "gpu_mem_peak_mb",
    "controlnet_mb",
    "device",
    "date",
    "commit",
    "command",
)


def test_the_suite_runs_every_case_and_system_and_draws_them(tmp_path: Path) -> None:
    out, plot = tmp_path / "controlnet.jsonl", tmp_path / "controlnet.png"
    argv = [
        *("--model", "tiny", "--size", "64", "--frames", "2", "--warmup", "1"),
        *("--sessions", "2", "--fps", "5", "--seconds", "1", "--session-warmup", "0.5"),
        *("--buckets", "1,2", "--control-overlap", "off,on", "--out", str(out)),
        *("--controlnet-rows", "shared,apart", "--with-nets", "1", "--plot", str(plot)),
    ]
    assert main(["bench", "--suite", "controlnet", *argv]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    found = {(r["system"], r["case"], r["sessions"], r["preprocessor"]) for r in records}
    assert found == {
        ("livediff", "single", 1, None),
        ("livediff", "single", 1, "canny"),
        ("livediff", "single", 1, "depth"),
        ("livediff", "single", 1, "canny+depth"),
        ("diffusers", "single", 1, None),
        ("diffusers", "single", 1, "canny"),
        ("livediff", "sessions", 2, None),
        ("livediff", "sessions", 2, "canny"),
    }
    overlaps = {
        (r["preprocessor"], r["control_overlap"])
        for r in records
        if r["system"] == "livediff" and r["case"] == "single"
    }
    assert overlaps == {(None, None)} | {
        (p, on) for p in ("canny", "depth", "canny+depth") for on in (False, True)
    }
    sessions = [
        (r["preprocessor"], r["control_overlap"], r["controlnet_rows"], r["sessions_with_nets"])
        for r in records
        if r["case"] == "sessions"
    ]
    assert sorted(sessions, key=str) == sorted(
        [(None, None, None, 0)]
        + [("canny", on, rule, 1) for on in (False, True) for rule in ("shared", "apart")],
        key=str,
    )
    # single cases with nets ran off and on; the sessions case with nets, off and on × both rules
    assert len(records) == len(found) + 3 + 3
    for r in records:
        assert all(key in r for key in (*REQUIRED_KEYS, *FIELDS)), set(FIELDS) - set(r)
        assert r["suite"] == "controlnet" and r["device"] == "cpu" and r["backend"] == "eager"
        expected_nets = len(r["preprocessor"].split("+")) if r["preprocessor"] else 0
        assert r["controlnets"] == expected_nets
        assert r["ms_median"] > 0 and r["ms_p99"] >= r["ms_median"] and r["fps"] > 0
        assert r["latency_ms_p99"] > 0 and r["controlnet_mb"] > 0
        if r["case"] == "sessions":
            assert 0.0 <= r["drop_rate"] <= 1.0 and r["input_fps"] == 5.0
        else:
            assert r["drop_rate"] is None and r["frames"] == 2
    single = {
        r["preprocessor"]: r for r in records if r["system"] == "livediff" and r["sessions"] == 1
    }
    assert {r["stream"] for r in single.values()} == {"Stream"}  # CapturedStream: CUDA only
    assert single[None]["ratio_to_plain"] == 1.0 and single[None]["preprocess_ms"] == 0.0
    assert all(
        single[p]["ratio_to_plain"] > 0 and single[p]["preprocess_ms"] > 0
        for p in ("canny", "depth", "canny+depth")
    )
    peers = [r for r in records if r["system"] == "diffusers"]
    assert all(r["variant"] == "eager" and r["livediff_speedup"] > 0 for r in peers)
    assert all(
        r["depth_net_mb"] > 0 and r["warmup_s"] >= 0 for r in records if r["case"] == "single"
    )
    assert all(r["compile_s"] >= 0 for r in records if r["system"] == "livediff")
    assert plot.stat().st_size > 0

    again = tmp_path / "again.png"
    assert main(["bench", "--suite", "controlnet", "--replot", str(out), "--plot", str(again)]) == 0
    assert again.stat().st_size > 0


def test_cases_name_their_nets_and_preprocessors() -> None:
    case = controlnet_suite.Case.parse("canny+depth")
    assert (case.controlnets, case.label) == (2, "canny+depth")
    assert case.uses() == ("cn0:0.8:canny", "cn1:0.8:depth")
    assert controlnet_suite.Case.parse("none").uses() == ()
    with pytest.raises(UsageError, match="canny\\+depth"):
        controlnet_suite.Case.parse("edges")


def test_the_diffusers_peer_is_refused_a_preprocessor_it_cannot_share(tmp_path: Path) -> None:
    argv = ["--model", "tiny", "--size", "64", "--single", "", "--multi", "", "--peer", "depth"]
    with pytest.raises(UsageError, match="diffusers runs none or canny"):
        controlnet_suite.main(argv)


def test_the_microbenchmark_stays_reachable(tmp_path: Path) -> None:
    out = tmp_path / "micro.jsonl"
    argv = ["--micro", "--cases", "canny", "--batch", "1", "--warmup", "0", "--iters", "1"]
    assert main(["bench", "--suite", "controlnet", *argv, "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["case"] == "canny" and record["suite"] == "controlnet"
    assert math.isfinite(record["eager_ms"])


@pytest.mark.gpu
def test_the_compiled_suite_runs_on_cuda(tmp_path: Path) -> None:
    """The compile backend: livediff's graphed bundles and diffusers under torch.compile."""
    out = tmp_path / "controlnet.jsonl"
    argv = [
        *("--model", "tiny", "--size", "64", "--frames", "3", "--warmup", "3"),
        *("--sessions", "2", "--seconds", "1", "--session-warmup", "0.5", "--buckets", "1,2"),
        *("--backend", "compile", "--single", "none,canny,canny+depth", "--out", str(out)),
    ]
    assert main(["bench", "--suite", "controlnet", *argv]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["system"] for r in records} == {"livediff", "diffusers"}
    assert all(r["backend"] == "compile" and r["ms_median"] > 0 for r in records)
    assert all(r["variant"] == "compile" for r in records if r["system"] == "diffusers")
    streams = {r["preprocessor"]: r["stream"] for r in records if r.get("stream")}
    assert streams == {None: "CapturedStream", "canny": "Stream", "canny+depth": "Stream"}
    assert all(r["gpu_mem_peak_mb"] > 0 and r["controlnet_peak_mb"] > 0 for r in records)
