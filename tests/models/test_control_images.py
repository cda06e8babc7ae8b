"""The preprocessors: documented shapes, ranges and parameters, and each against its reference.

Depth is checked against transformers' own sizing rule and image processor; soft edges
against ControlNet's HED annotator's formula with OpenCV's resize; canny against the kernel
(whose own tests compare it with OpenCV).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.dpt.image_processing_pil_dpt import (
    DPTImageProcessorPil,
    get_resize_output_image_size,
)

from livediff.exceptions import (
    FrameShapeError,
    ModelLoadError,
    ModelNotAvailableError,
    ParameterError,
)
from livediff.kernels.canny import canny
from livediff.models.control_images import (
    PreprocessorNetworks,
    from_model_output,
    preprocess,
    to_preview,
)
from livediff.models.control_uses import CannyParams, Preprocessor, parse_params
from livediff.models.controlnet_catalog import (
    KNOWN_CONTROLNETS,
    accepted_preprocessors,
    check_preprocessor,
)
from livediff.models.depth import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DepthEstimator,
    load_depth_estimator,
    network_input_size,
)
from livediff.models.soft_edge import load_soft_edge_detector

SIZE = (48, 64)  # (height, width) of the control images in these tests


def frames(count: int = 2, height: int = 60, width: int = 80, seed: int = 0) -> torch.Tensor:
    """uint8 RGB frames with a few flat shapes (edges to find) and noise."""
    rng = np.random.default_rng(seed)
    out = rng.integers(60, 90, (count, height, width, 3)).astype(np.uint8)
    for i in range(count):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        out[i, top : top + height // 3, left : left + width // 3] = rng.integers(150, 255, 3)
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def soft_edge() -> PreprocessorNetworks:
    return PreprocessorNetworks(soft_edge=load_soft_edge_detector(seed=1))


@pytest.fixture(scope="module")
def depth() -> DepthEstimator:
    return load_depth_estimator(seed=2)


def _check_control(images: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> None:
    assert images.shape == (rows, 3, *SIZE) and images.dtype == dtype
    assert images.min() >= 0 and images.max() <= 1
    assert images.is_contiguous()


# ---------------------------------------------------------------- weight-free ones
def test_passthrough_is_the_frame_at_the_model_size() -> None:
    batch = frames()
    images = preprocess("passthrough", batch, SIZE)
    _check_control(images, 2)
    expected = torch.nn.functional.interpolate(
        batch.permute(0, 3, 1, 2).float() / 255, size=SIZE, mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(images, expected)
    same = preprocess(Preprocessor.PASSTHROUGH, batch.permute(0, 3, 1, 2).float() / 255, (60, 80))
    torch.testing.assert_close(same, batch.permute(0, 3, 1, 2).float() / 255)  # no resize


def test_a_preview_is_the_control_image_as_a_frame() -> None:
    batch = frames(2, *SIZE)
    edges = preprocess("canny", batch, SIZE)
    preview = to_preview(edges)
    assert preview.shape == (2, *SIZE, 3) and preview.dtype == torch.uint8
    assert set(preview.unique().tolist()) == {0, 255}
    assert torch.equal(to_preview(preprocess("passthrough", batch, SIZE)), batch)


def test_previous_output_takes_a_decoded_frame() -> None:
    decoded = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
    images = preprocess("previous_output", from_model_output(decoded), SIZE)
    _check_control(images, 2)
    torch.testing.assert_close(images, ((decoded + 1) / 2).clamp(0, 1))


def test_canny_rows_take_their_own_parameters() -> None:
    batch = frames(3)
    params = [CannyParams(20, 60, 0.0), CannyParams(), CannyParams(5, 250, 2.0)]
    images = preprocess("canny", batch, SIZE, params)
    _check_control(images, 3)
    assert set(images.unique().tolist()) == {0.0, 1.0}
    for row, p in enumerate(params):
        alone = preprocess("canny", batch[row : row + 1], SIZE, p)
        assert torch.equal(images[row : row + 1], alone)
    resized = preprocess("passthrough", batch, SIZE)
    one = torch.ones(3)
    expected = canny(resized, one * 20, one * 60, one * 0.0)
    assert torch.equal(images[0], expected[0])
    default = preprocess("canny", batch, SIZE, dtype=torch.float16)
    _check_control(default, 3, torch.float16)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"low": 200, "high": 100}, "canny_low"),
        ({"low": -1}, "canny_low"),
        ({"high": 256}, "canny_high"),
        ({"sigma": 3.5}, "canny_sigma"),
        ({"sigma": "soft"}, "canny_sigma"),
        ({"threshold": 3}, "threshold"),
    ],
)
def test_canny_parameters_out_of_range_name_their_field(values: dict, field: str) -> None:
    with pytest.raises(ParameterError) as info:
        parse_params("canny", values)
    assert info.value.field == field


def test_parameters_where_none_are_taken_are_refused() -> None:
    assert parse_params("canny", {"low": 50, "high": 120}) == CannyParams(50, 120)
    assert parse_params("depth", None) is None
    with pytest.raises(ParameterError, match="takes no parameters") as info:
        parse_params("depth", {"low": 3})
    assert info.value.field == "low"
    with pytest.raises(ParameterError, match="takes no parameters"):
        preprocess("passthrough", frames(), SIZE, CannyParams())
    with pytest.raises(ParameterError, match="2 canny parameter sets for 3 frames"):
        preprocess("canny", frames(3), SIZE, [CannyParams(), CannyParams()])
    with pytest.raises(ParameterError, match="unknown preprocessor 'sobel'") as info:
        preprocess("sobel", frames(), SIZE)
    assert info.value.field == "preprocessor"


def test_a_client_image_of_the_wrong_size_is_refused() -> None:
    drawn = frames(1, *SIZE)
    _check_control(preprocess("client", drawn, SIZE), 1)
    with pytest.raises(
        FrameShapeError, match="is 80×60; this session's model size is 64×48"
    ) as info:
        preprocess("client", frames(1), SIZE)
    assert info.value.field == "control_image"


# ---------------------------------------------------------------- networks
def test_soft_edge_is_the_hed_annotators_formula(soft_edge: PreprocessorNetworks) -> None:
    """ControlNet's HEDdetector: side outputs resized with cv2 INTER_LINEAR, averaged, sigmoid."""
    cv2 = pytest.importorskip("cv2")
    batch = frames(2)
    images = preprocess("soft_edge", batch, SIZE, networks=soft_edge)
    _check_control(images, 2)
    assert soft_edge.soft_edge is not None
    resized = preprocess("passthrough", batch, SIZE)
    with torch.no_grad():
        sides = soft_edge.soft_edge.net(resized * 255)
    for row in range(2):
        maps = [
            cv2.resize(s[row, 0].numpy(), (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR)
            for s in sides
        ]
        expected = 1 / (1 + np.exp(-np.mean(np.stack(maps, axis=2), axis=2)))
        np.testing.assert_allclose(images[row, 0].numpy(), expected, atol=1e-5)
        assert torch.equal(images[row, 0], images[row, 2])


def test_soft_edge_weights_load_from_a_file(
    tmp_path: Path, soft_edge: PreprocessorNetworks
) -> None:
    assert soft_edge.soft_edge is not None
    path = tmp_path / "ControlNetHED.pth"
    torch.save(soft_edge.soft_edge.net.state_dict(), path)
    loaded = load_soft_edge_detector(str(path), seed=99)
    for key, value in soft_edge.soft_edge.net.state_dict().items():
        assert torch.equal(value, loaded.net.state_dict()[key]), key
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="is not ControlNet's HED network"):
        load_soft_edge_detector(str(tmp_path / "other.pth"))


def test_a_network_that_is_not_loaded_says_so() -> None:
    with pytest.raises(ParameterError, match="depth preprocessor's network is not loaded"):
        preprocess("depth", frames(), SIZE, networks=PreprocessorNetworks())


@pytest.mark.parametrize("size", [(512, 512), (512, 768), (480, 640), (128, 160), (720, 1280)])
def test_depth_input_size_is_the_image_processors_rule(size: tuple[int, int]) -> None:
    got = get_resize_output_image_size(
        np.zeros((3, *size)), output_size=(518, 518), keep_aspect_ratio=True, multiple=14
    )
    assert network_input_size(*size) == (got.height, got.width)


def test_depth_normalisation_is_the_image_processors() -> None:
    processor = DPTImageProcessorPil(
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    frame = frames(1, 518, 518)
    expected = processor(images=frame[0].numpy(), return_tensors="pt")["pixel_values"]
    estimator = DepthEstimator(
        net=None, source="-", device=torch.device("cpu"), dtype=torch.float32
    )
    got = estimator.network_input(frame.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_depth_shape_range_and_rows(depth: DepthEstimator) -> None:
    batch = frames(2)
    images = preprocess("depth", batch, SIZE, networks=PreprocessorNetworks(depth=depth))
    _check_control(images, 2)
    for row in range(2):  # each image spans [0, 1] on its own
        assert images[row].min() == 0 and images[row].max() == 1
    alone = preprocess("depth", batch[1:], SIZE, networks=PreprocessorNetworks(depth=depth))
    torch.testing.assert_close(images[1:], alone, atol=1e-4, rtol=0)
    config = depth.net.config
    assert config.backbone_config.out_indices == [3, 6, 9, 12]
    assert sum(p.numel() for p in depth.net.parameters()) == 24_785_089  # V2 Small: 24.8M


@pytest.mark.slow
def test_depth_weights_load_from_a_folder(depth: DepthEstimator, tmp_path: Path) -> None:
    depth.net.save_pretrained(tmp_path / "depth")
    loaded = load_depth_estimator(str(tmp_path / "depth"), seed=5)
    for key, value in depth.net.state_dict().items():
        assert torch.equal(value, loaded.net.state_dict()[key]), key


def test_an_uncached_depth_model_offline_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="depth source 'random'") as info:
        load_depth_estimator("depth-anything/Depth-Anything-V2-Small-hf")
    assert "'depth-anything/Depth-Anything-V2-Small-hf'" in str(info.value)
    assert str(tmp_path) in str(info.value)


# ---------------------------------------------------------------- which net takes which
def test_a_preprocessor_a_controlnet_cannot_use_is_refused() -> None:
    check_preprocessor("canny", "lllyasviel/control_v11p_sd15_canny", Preprocessor.CANNY)
    with pytest.raises(ParameterError, match="cannot use the depth preprocessor") as info:
        check_preprocessor("canny", "lllyasviel/control_v11p_sd15_canny", Preprocessor.DEPTH)
    assert info.value.field == "preprocessor"
    union = "xinsir/controlnet-union-sdxl-1.0"
    check_preprocessor("u", union, Preprocessor.DEPTH, control_type="depth")
    with pytest.raises(ParameterError, match="in its canny mode"):
        check_preprocessor("u", union, Preprocessor.DEPTH, control_type="canny")
    assert accepted_preprocessors("someone/my-own-controlnet") is None  # anything goes
    check_preprocessor("mine", "/models/my-net", Preprocessor.SOFT_EDGE)
    assert accepted_preprocessors("CiaraRowles/TemporalNet") == (Preprocessor.PREVIOUS_OUTPUT,)


def test_the_readme_lists_every_known_controlnet() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## ControlNet") :]
    for preset, entries in KNOWN_CONTROLNETS.items():
        assert f"`{preset}`" in section
        for entry in entries:
            assert f"`{entry.id}`" in section, entry.id
