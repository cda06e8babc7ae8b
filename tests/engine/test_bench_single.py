"""The ``single`` and ``stages`` suites on CPU with the tiny model, and their plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livediff.bench import peers, plots, single
from livediff.bench.records import REQUIRED_KEYS

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--model", "tiny", "--weights", "random", "--frames", "3", "--warmup", "1"]


def test_config_labels_name_what_differs() -> None:
    base = {"system": "livediff", "model": "sd-turbo", "width": 512, "steps": 1}
    assert plots.config_label({**base, "backend": "compile"}) == (
        "livediff, compile, sd-turbo 512², 1 step"
    )
    recipe = "sdpa+qkv+cl+compile:default+freeze+cudnn-bench"
    assert plots.config_label({**base, "backend": "compile", "recipe": recipe}) == (
        "livediff, compile, freeze, sd-turbo 512², 1 step"
    )
    assert plots.config_label(
        {**base, "system": "streamdiffusion", "variant": "compiled", "steps": 2, "rcfg": "self"}
    ) == ("streamdiffusion, compiled, sd-turbo 512², 2 steps, rcfg self")
    assert plots.config_label({**base, "mode": "txt2img"}).endswith("1 step, txt2img")


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["single", "stages"])
def test_suite_writes_records_and_a_plot_that_can_be_redrawn(
    suite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "r.jsonl", tmp_path / "r.png"
    argv = ["--suite", suite, *TINY, "--out", str(out), "--plot", str(png)]
    assert single.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert records and records == [json.loads(line) for line in out.read_text().splitlines()]
    for r in records:
        assert all(key in r for key in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert (r["suite"], r["model"], r["device"]) == (suite, "tiny", "cpu")
        assert r["fps"] > 0 and r["ms_median"] <= r["ms_p99"]
        if suite == "stages" and r.get("side") != "host":
            assert set(r["stages_ms_median"]) >= {"encode", "unet", "decode"}
    if suite == "stages":  # the host work of each transport, old path and new, copies counted
        host = {(r["path"], r["version"]): r for r in records if r.get("side") == "host"}
        assert host[("webrtc-in", "now")]["host_copies"] == 1
        assert host[("webrtc-in", "before")]["host_copies"] == 3
        assert host[("websocket-in", "now")]["host_copies"] == 0  # decoded into the pinned buffer
        assert {path for path, _ in host} >= {"websocket-in", "webrtc-in", "webrtc-out"}
    assert png.read_bytes()[:8] == PNG
    for suite_main in (single.main, peers.main):  # peers draws the same way, also on CPU
        again = tmp_path / f"again-{suite_main.__module__}.png"
        assert suite_main(["--replot", str(out), "--plot", str(again)]) == 0
        assert again.read_bytes()[:8] == PNG


def test_replot_of_an_empty_file_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no benchmark records"):
        single.main(["--replot", str(empty), "--plot", str(tmp_path / "x.png")])
