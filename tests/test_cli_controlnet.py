"""``--controlnet`` on the command line: ``livediff run`` loads the nets it names and uses them."""

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


def test_run_with_controlnets_changes_the_frames_and_is_repeatable(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nets = ["--controlnet", "edges:1.5:canny", "--controlnet", "tile:0.8:passthrough"]
    plain = run(clip, tmp_path / "plain.mp4")
    controlled = run(clip, tmp_path / "controlled.mp4", *nets)
    again = run(clip, tmp_path / "again.mp4", *nets)
    assert len(controlled) == len(plain) == 6
    for a, b in zip(controlled, again, strict=True):  # seeded random nets: the same file again
        np.testing.assert_array_equal(a, b)
    gaps = [np.abs(a.astype(np.int16) - b).mean() for a, b in zip(controlled, plain, strict=True)]
    assert min(gaps) > 0.1, gaps  # encoding the same frames twice gives 0: the nets did this
    capsys.readouterr()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("edges:1:client", "the client preprocessor"),
        ("edges:3", "controlnet scale=3.0 is out of range"),
        ("edges:1:pose", "unknown preprocessor"),
    ],
)
def test_a_bad_controlnet_flag_exits_2_with_one_line(
    flag: str, message: str, clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", str(clip), str(tmp_path / "out.mp4"), *TINY, "--controlnet", flag]
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("livediff run: error: ") and message in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_the_readme_toml_example_names_the_nets_sessions_pick(tmp_path: Path) -> None:
    """The README's ``[[model.controlnets]]`` example is a config ``livediff serve`` reads."""
    from livediff.cli import build_parser
    from livediff.cli_options import load_toml, model_spec_from_args

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## ControlNet") :]
    example = section[section.index("```toml\n") + len("```toml\n") :]
    config = tmp_path / "server.toml"
    config.write_text(example[: example.index("```")], encoding="utf-8")
    args = build_parser().parse_args(["serve", "--config", str(config)])
    spec = model_spec_from_args(args, load_toml(config))
    assert spec.preset == "sd15-lcm"
    assert [(net.source, net.label) for net in spec.controlnets] == [
        ("lllyasviel/control_v11p_sd15_canny", "edges"),
        ("CiaraRowles/TemporalNet", "temporal"),
    ]
    assert spec.depth_source == "depth-anything/Depth-Anything-V2-Small-hf"
    assert spec.soft_edge_source == "/models/ControlNetHED.pth"


@pytest.mark.parametrize("command", ["run", "camera"])
def test_a_client_net_is_refused_where_no_client_can_send_images(
    command: str, clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run`` and ``camera`` have no client to send control images: a ``client`` use would
    wait for images forever, so it is refused with one line before the model loads."""
    out = str(tmp_path / "out.mp4")
    place = [str(clip), out] if command == "run" else ["--input", str(clip), "--output", out]
    assert main([command, *place, *TINY, "--controlnet", "edges:1:client"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"livediff {command}: error: "), stderr
    assert f"livediff {command} has none" in stderr and "Traceback" not in stderr
    assert not Path(out).exists()
