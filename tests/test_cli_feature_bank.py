"""``livediff run`` with a feature bank and latent feedback: the flags load, change and refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli_run import TINY, video_frames, write_clip

from livediff.cli import main


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=0.4, audio_codec=None)


def run(clip: Path, output: Path, *extra: str) -> list[np.ndarray]:
    argv = ["run", str(clip), str(output), *TINY, "--prompt", "ink", "--seed", "3", *extra]
    assert main(argv) == 0
    return video_frames(output)[0]


def test_run_with_a_bank_and_feedback_changes_the_frames_and_is_repeatable(
    clip: Path, tmp_path: Path
) -> None:
    flags = ["--feature-bank-frames", "2", "--feature-bank", "2", "--bank-interval", "1"]
    flags += ["--latent-feedback", "0.5"]
    plain = run(clip, tmp_path / "plain.mp4")
    consistent = run(clip, tmp_path / "consistent.mp4", *flags)
    again = run(clip, tmp_path / "again.mp4", *flags)
    assert len(consistent) == len(plain) == 6
    for a, b in zip(consistent, again, strict=True):
        np.testing.assert_array_equal(a, b)
    gaps = [np.abs(a.astype(np.int16) - b).mean() for a, b in zip(consistent, plain, strict=True)]
    assert max(gaps) > 0.1, gaps  # the first frame has nothing to feed back or attend to


@pytest.mark.parametrize("tokens", ["merged", "pooled"])
def test_reduced_bank_frames_reach_the_model(tokens: str, clip: Path, tmp_path: Path) -> None:
    """``--feature-bank-reduce-from 128`` reduces the tiny UNet's 256-token layers' bank frames
    (the default, 4096, reduces none of its layers): other frames than the full bank's."""
    flags = ["--feature-bank-frames", "2", "--feature-bank", "2", "--bank-interval", "1"]
    full = run(clip, tmp_path / "full.mp4", *flags)
    reduced = ["--feature-bank-tokens", tokens, "--feature-bank-reduce-from", "128"]
    changed = run(clip, tmp_path / "reduced.mp4", *flags, *reduced)
    unreduced = run(clip, tmp_path / "unreduced.mp4", *flags, *reduced[:2])  # 4096: none
    for a, b in zip(full, unreduced, strict=True):
        np.testing.assert_array_equal(a, b)
    # the runs are deterministic (the same settings are equal to the bit): any change is the
    # reduction's; with the tiny model's random weights the bank's effect on a frame is small
    assert any(not np.array_equal(a, b) for a, b in zip(changed, full, strict=True))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--feature-bank", "2"], "runs no feature bank"),
        (["--feature-bank-frames", "1", "--feature-bank", "2"], "at most 1 frames"),
        (["--feature-bank", "5"], "feature_bank=5 is out of range"),
        (["--latent-feedback", "1"], "latent_feedback=1.0 is out of range"),
        (["--feature-bank-reduce-from", "0"], "feature_bank_reduce_from=0 is out of range"),
    ],
)
def test_bad_bank_flags_exit_2_with_one_line(
    flags: list[str], message: str, clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(clip), str(tmp_path / "out.mp4"), *TINY, *flags]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("livediff run: error: ") and message in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
