"""``--ip-adapter`` and ``[model.ip_adapter]``: loaded for SD 1.5 / SDXL models, refused for SD 2.1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli_run import TINY, video_frames, write_clip

from livediff.cli import main

SD21 = "the model sd-turbo is SD 2.1, which has no public IP-Adapter"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=0.2, audio_codec=None)


def one_line_error(capsys: pytest.CaptureFixture[str], command: str, message: str) -> None:
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"livediff {command}: error: ") and message in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


@pytest.mark.parametrize("command", ["run", "serve"])
def test_an_ip_adapter_on_sd_turbo_exits_2_with_one_line(
    command: str, clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [str(clip), str(tmp_path / "out.mp4")] if command == "run" else []
    argv = [command, *files, "--model", "sd-turbo", "--weights", "random", "--ip-adapter", "random"]
    assert main(argv) == 2
    one_line_error(capsys, command, SD21)


def test_the_toml_table_is_refused_for_sd_turbo_too(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "livediff.toml"
    config.write_text('[model]\npreset = "sd-turbo"\n\n[model.ip_adapter]\nsource = "random"\n')
    argv = ["run", str(clip), str(tmp_path / "out.mp4"), "--weights", "random"]
    assert main([*argv, "--config", str(config)]) == 2
    one_line_error(capsys, "run", SD21)


def test_a_loaded_adapter_without_an_image_leaves_the_frames_exactly_as_they_were(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [*TINY, "--prompt", "ink", "--seed", "3"]
    assert main(["run", str(clip), str(tmp_path / "plain.mp4"), *base]) == 0
    with_adapter = [*base, "--ip-adapter", "random:plus", "--ip-scale", "1.5"]
    assert main(["run", str(clip), str(tmp_path / "adapter.mp4"), *with_adapter]) == 0
    plain, styled = (
        video_frames(tmp_path / "plain.mp4")[0],
        video_frames(tmp_path / "adapter.mp4")[0],
    )
    assert len(plain) == len(styled) > 0
    for a, b in zip(plain, styled, strict=True):  # no image: every row has scale 0
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()


def test_the_flag_loads_the_adapter_and_its_image_encoder_onto_the_model(tmp_path: Path) -> None:
    from livediff.cli import build_parser
    from livediff.cli_options import load_for_backend, model_spec_from_args

    args = build_parser().parse_args(
        ["run", "in.mp4", "out.mp4", *TINY, "--device", "cpu", "--ip-adapter", "random:plus"]
    )
    spec = model_spec_from_args(args, {})
    bundle, _ = load_for_backend(spec, args)
    assert bundle.ip_adapter is not None and bundle.ip_adapter.variant.value == "plus"
    assert bundle.image_prompts is not None and bundle.image_prompts.adapter is bundle.ip_adapter
