"""``--style-image FILE`` (run, camera, serve): the IP-Adapter style image a stream starts with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli_run import TINY, video_frames, write_clip

from livediff.cli import build_parser, main

ADAPTER = ["--ip-adapter", "random:plus"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=0.2, audio_codec=None)


@pytest.fixture(scope="module")
def style_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pixels = np.random.RandomState(7).randint(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    path = tmp_path_factory.mktemp("style") / "painting.png"
    path.write_bytes(out.getvalue())
    return path


def _run(clip: Path, out: Path, *extra: str) -> list[np.ndarray]:
    argv = ["run", str(clip), str(out), *TINY, "--prompt", "ink", "--seed", "3", *extra]
    assert main(argv) == 0
    return video_frames(out)[0]


def test_run_uses_the_style_image_from_the_first_frame_and_its_scale_weighs_it(
    clip: Path, style_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = _run(clip, tmp_path / "plain.mp4", *ADAPTER)
    styled = _run(clip, tmp_path / "styled.mp4", *ADAPTER, "--style-image", str(style_png))
    off = _run(
        clip, tmp_path / "off.mp4", *ADAPTER, "--style-image", str(style_png), "--ip-scale", "0"
    )
    assert len(plain) == len(styled) == len(off) > 0
    assert all(np.abs(a.astype(int) - b).max() > 0 for a, b in zip(plain, styled, strict=True))
    for a, b in zip(plain, off, strict=True):  # scale 0: exactly the frames without an image
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str, message: str) -> None:
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"livediff {command}: error: ") and message in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


@pytest.mark.parametrize("command", ["run", "serve", "camera"])
def test_a_style_image_without_an_ip_adapter_is_refused_before_the_model_loads(
    command: str,
    clip: Path,
    style_png: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = {"run": [str(clip), str(tmp_path / "o.mp4")], "serve": [], "camera": []}[command]
    extra = (
        ["--input", str(clip), "--output", str(tmp_path / "o.mp4")] if command == "camera" else []
    )
    argv = [command, *files, *extra, *TINY, "--style-image", str(style_png)]
    assert main(argv) == 2
    _one_line_error(capsys, command, "--style-image needs an IP-Adapter")


def test_a_missing_file_and_a_file_that_is_no_image_are_refused(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["run", str(clip), str(tmp_path / "o.mp4"), *TINY, *ADAPTER]
    assert main([*base, "--style-image", str(tmp_path / "nowhere.png")]) == 2
    _one_line_error(capsys, "run", "cannot read it")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    assert main([*base, "--style-image", str(junk)]) == 2
    _one_line_error(capsys, "run", "does not decode")


def test_serve_starts_every_session_with_the_pinned_style_image(style_png: Path) -> None:
    from livediff.cmd_serve import engine_from_args

    args = build_parser().parse_args(
        ["serve", *TINY, "--device", "cpu", *ADAPTER, "--style-image", str(style_png)]
    )
    engine = engine_from_args(args, {})
    (encoder,) = [bundle.image_prompts for bundle in engine.bundles]
    assert encoder is not None
    key = encoder.cache_key(style_png.read_bytes())
    assert engine.default_params.ip_image == key
    assert encoder.lookup(key) is not None
