"""The ``consistency`` suite on CPU (tiny model): records of every case and a plot; no timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from livediff.bench import consistency
from livediff.bench.records import REQUIRED_KEYS
from livediff.cli import main
from livediff.exceptions import UsageError


def test_consistency_records_each_case_and_draws_them(tmp_path: Path) -> None:
    out, plot = tmp_path / "consistency.jsonl", tmp_path / "consistency.png"
    argv = ["--model", "tiny", "--size", "64", "--frames", "5", "--warmup", "2"]
    assert (
        main(["bench", "--suite", "consistency", *argv, "--out", str(out), "--plot", str(plot)])
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    cases = [(r["feature_bank"], r["feature_fusion"], r["latent_feedback"]) for r in records]
    assert cases == [
        (0, 0.0, 0.0),  # the plain model, no bank installed: the reference
        (0, 0.0, 0.0),
        (2, 0.0, 0.0),
        (2, 0.8, 0.0),
        (0, 0.0, 0.3),
        (2, 0.8, 0.3),
    ]
    plain, banked = records[0], records[1:]
    assert plain["bank_installed"] is False and "ratio_to_plain" not in plain
    for r in banked:
        assert r["bank_installed"] is True
        assert r["ratio_to_plain"] == pytest.approx(r["ms_median"] / plain["ms_median"], rel=1e-2)
    for r in records:
        assert all(key in r for key in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert r["suite"] == "consistency" and r["frames"] == 5 and r["flicker"] >= 0
        # a session's bank memory is its own: none without a bank (its calls skip the bank)
        assert (r["bank_mb"] > 0) == (r["feature_bank"] > 0), r
        assert r["bank_pool_mb"] >= r["bank_mb"]
    assert plot.stat().st_size > 0
    assert {r.get("feature_bank_tokens") for r in banked} == {"pooled"}  # the default


def test_each_bank_tokens_value_runs_the_cases_on_its_own_model(tmp_path: Path) -> None:
    """``--bank-tokens full,pooled``: the cases once per value; a pooled bank's session costs a
    quarter of a full one's where it reduces (every layer from 16 tokens on the tiny model)."""
    out = tmp_path / "tokens.jsonl"
    argv = ["--model", "tiny", "--size", "64", "--frames", "3", "--warmup", "2"]
    argv += ["--cases", "2:0.8:0", "--bank-tokens", "full,pooled", "--bank-reduce-from", "16"]
    assert main(["bench", "--suite", "consistency", *argv, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("feature_bank_tokens") for r in records] == [None, "full", "pooled"]
    assert all(r["feature_bank_reduce_from"] == 16 for r in records[1:])
    full, pooled = records[1:]
    assert pooled["bank_mb"] < full["bank_mb"]


def test_flicker_is_output_change_over_input_change() -> None:
    still = [np.zeros((4, 4, 3), np.uint8)] * 3
    moving = [np.full((4, 4, 3), 10 * i, np.uint8) for i in range(3)]
    assert consistency.flicker(still, moving) == 0.0
    assert consistency.flicker(moving, moving) == pytest.approx(1.0)
    halved = [np.full((4, 4, 3), 5 * i, np.uint8) for i in range(3)]
    assert consistency.flicker(halved, moving) == pytest.approx(0.5)


def test_a_bad_case_is_refused() -> None:
    with pytest.raises(UsageError, match="BANK:FUSION:FEEDBACK"):
        consistency.Case.parse("2:0.8")
