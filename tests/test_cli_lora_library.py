"""``livediff run --lora-library DIR_OR_TOML --session-lora NAME[:SCALE]``: the library loads at
start, the session's LoRA changes the frames (and only when asked for), bad flags exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli_run import TINY, video_frames, write_clip

from helpers.lora_testing import random_lora, save_kohya, save_peft
from livediff.cli import main
from livediff.models.bundle import ModelBundle


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=0.4, audio_codec=None)


@pytest.fixture(scope="module")
def library(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ink.safetensors (PEFT) and pastel.safetensors (kohya) for the tiny UNet."""
    folder = tmp_path_factory.mktemp("library")
    save_peft(random_lora(tiny_bundle.unet, 8, 1, strength=3.0), folder / "ink.safetensors", 8.0)
    save_kohya(random_lora(tiny_bundle.unet, 4, 2, strength=3.0), folder / "pastel.safetensors")
    return folder


def run(clip: Path, output: Path, *extra: str) -> list[np.ndarray]:
    argv = ["run", str(clip), str(output), *TINY, "--prompt", "ink", "--seed", "3", *extra]
    assert main(argv) == 0
    return video_frames(output)[0]


def gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.int16) - y).mean()) for x, y in zip(a, b, strict=True))


def test_a_session_lora_from_the_library_changes_the_frames(
    clip: Path, library: Path, tmp_path: Path
) -> None:
    plain = run(clip, tmp_path / "plain.mp4")
    unused = run(clip, tmp_path / "unused.mp4", "--lora-library", str(library))
    styled = run(
        clip, tmp_path / "styled.mp4", "--lora-library", str(library), "--session-lora", "ink:0.8"
    )
    again = run(
        clip, tmp_path / "again.mp4", "--lora-library", str(library), "--session-lora", "ink:0.8"
    )
    assert len(styled) == len(plain) == 6
    assert gap(unused, plain) == 0  # a library alone changes nothing
    assert gap(styled, again) == 0
    assert gap(styled, plain) > 0.1, gap(styled, plain)  # the random tiny model is dim
    both = run(
        clip,
        tmp_path / "both.mp4",
        *("--lora-library", str(library), "--session-lora", "ink:0.8"),
        *("--session-lora", "pastel"),
    )
    assert gap(both, styled) > 0.1


def test_a_toml_library_names_its_loras(clip: Path, library: Path, tmp_path: Path) -> None:
    (tmp_path / "near.safetensors").write_bytes((library / "ink.safetensors").read_bytes())
    toml = tmp_path / "loras.toml"
    toml.write_text(
        f'[loras]\nsumi = {{ source = "{library}", weight_name = "ink.safetensors" }}\n'
        'near = "near.safetensors"\n'  # beside the TOML file
    )
    from_folder = run(
        clip, tmp_path / "a.mp4", "--lora-library", str(library), "--session-lora", "ink:0.8"
    )
    from_toml = run(
        clip, tmp_path / "b.mp4", "--lora-library", str(toml), "--session-lora", "sumi:0.8"
    )
    near = run(clip, tmp_path / "c.mp4", "--lora-library", str(toml), "--session-lora", "near:0.8")
    assert gap(from_folder, from_toml) == 0 and gap(from_folder, near) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--session-lora", "ink"], "no per-session LoRA library"),
        (["--lora-library", "/no/such/folder"], "no such folder or file"),
        (["--lora-library", "LIBRARY", "--session-lora", "nope"], "unknown LoRA 'nope'"),
        (["--lora-library", "LIBRARY", "--lora-slots", "1"], "names 2 LoRAs"),
        (["--lora-library", "LIBRARY", "--lora-max-rank", "4"], "rank 8"),
        (["--session-lora", "ink:99"], "scale=99.0 is out of range"),
        (["--lora-library", "LIBRARY", "--backend", "tensorrt"], "runs no per-session LoRAs"),
    ],
)
def test_bad_lora_flags_exit_2_with_one_line(
    flags: list[str],
    message: str,
    clip: Path,
    library: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = [str(library) if flag == "LIBRARY" else flag for flag in flags]
    assert main(["run", str(clip), str(tmp_path / "out.mp4"), *TINY, *flags]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("livediff run: error: ") and message in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_serve_with_ray_refuses_a_library(
    library: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--ray", *TINY, "--lora-library", str(library)]) == 2
    stderr = capsys.readouterr().err
    assert "--lora-library ([lora_library]) is for one server" in stderr, stderr


def test_serve_flags_give_the_engine_the_library_and_its_sizes(library: Path) -> None:
    from livediff.cli import build_parser
    from livediff.cmd_serve import engine_from_args

    argv = ["serve", *TINY, "--device", "cpu", "--lora-library", str(library)]
    args = build_parser().parse_args([*argv, "--lora-slots", "3", "--lora-max-rank", "16"])
    listing = engine_from_args(args, {}).loras()
    assert [(lora["name"], lora["rank"]) for lora in listing["loras"]] == [
        ("ink", 8),
        ("pastel", 4),
    ]
    capacity = listing["capacity"]
    assert (capacity["max_loras"], capacity["max_rank"], capacity["free_slots"]) == (3, 16, 1)
    assert capacity["slots_per_row"] == 2
