"""The ops are proper ``torch.library`` custom ops: opcheck passes, torch.compile traces them
whole (no graph break, no recompile), and ``kernels_status`` names every op."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kernels_testing import RCFG_MODES, fused_inputs

from livediff.kernels import fused_step as fused_step_module
from livediff.kernels.fused_step import fused_step
from livediff.kernels.postprocess import model_output_to_i420, model_output_to_rgb
from livediff.kernels.preprocess import i420_to_model_input, nv12_to_model_input, rgb_to_model_input
from livediff.kernels.similarity import frame_similarity
from livediff.kernels.status import kernels_status, registered_ops


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _op_cases() -> list[tuple[str, tuple[Any, ...]]]:
    frames = torch.randint(0, 256, (2, 13, 17, 3), dtype=torch.uint8, generator=_gen())
    y = torch.randint(0, 256, (2, 13, 17), dtype=torch.uint8, generator=_gen(1))
    u = torch.randint(0, 256, (2, 7, 9), dtype=torch.uint8, generator=_gen(2))
    v = torch.randint(0, 256, (2, 7, 9), dtype=torch.uint8, generator=_gen(3))
    crop = (1, 2, 10, 12)
    images = torch.rand(2, 3, 9, 11, generator=_gen(4)) * 2 - 1
    cases: list[tuple[str, tuple[Any, ...]]] = [
        ("preprocess_rgb", (frames, *crop, 8, 6, torch.float16)),
        ("preprocess_i420", (y, u, v, *crop, 8, 6, torch.float32)),
        ("preprocess_nv12", (y, torch.stack([u, v], -1), *crop, 8, 6, torch.bfloat16)),
        ("postprocess_rgb", (images,)),
        ("postprocess_i420", (images,)),
        ("cosine_similarity", (images, images.flip(0))),
    ]
    for mode in RCFG_MODES:
        state = fused_inputs(mode, 2, 2, with_noise=mode != "self")
        out = torch.empty(2, 4, 6, 5)  # fused_inputs' latent rows
        cases.append(("stream_batch_step", (*state.values(), out, mode, 2)))
    return cases


@pytest.mark.parametrize(
    ("name", "args"), _op_cases(), ids=lambda case: case if isinstance(case, str) else ""
)
def test_opcheck(name: str, args: tuple[Any, ...]) -> None:
    op = getattr(torch.ops.livediff, name).default
    torch.library.opcheck(op, args)


def test_every_registered_op_is_reported() -> None:
    status = kernels_status("cpu")
    assert set(status["ops"]) == set(registered_ops())
    for name in registered_ops():
        assert hasattr(torch.ops.livediff, name.split("::")[1])
        entry = status["ops"][name]
        assert entry["impl"] == "reference"
        assert "CUDA only" in entry["reason"] and "contiguous" in entry["guard"]


def test_status_without_cuda_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status = kernels_status()
    assert status["device"] == "cpu"
    assert all(entry["impl"] == "reference" for entry in status["ops"].values())


def _pipeline(
    frames: torch.Tensor, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, state: dict[str, Any]
) -> tuple[torch.Tensor, ...]:
    pixels = rgb_to_model_input(frames, 16, 16, (0, 4, 24, 24), torch.float32)
    pixels_i420 = i420_to_model_input(y, u, v, 16, 16, (0, 4, 24, 24), torch.float32)
    pixels_nv12 = nv12_to_model_input(
        y, torch.stack([u, v], dim=-1), 16, 16, (0, 4, 24, 24), torch.float32
    )
    similarity = frame_similarity(pixels, pixels_i420)
    out = fused_step(**state, rcfg="initialize", frame_buffer_size=1)
    rgb = model_output_to_rgb(pixels * similarity)
    return pixels_nv12, similarity, out, rgb, model_output_to_i420(pixels)


def _pipeline_inputs(seed: int) -> tuple[Any, ...]:
    gen = _gen(seed)
    frames = torch.randint(0, 256, (1, 24, 32, 3), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 256, (1, 24, 32), dtype=torch.uint8, generator=gen)
    u = torch.randint(0, 256, (1, 12, 16), dtype=torch.uint8, generator=gen)
    v = torch.randint(0, 256, (1, 12, 16), dtype=torch.uint8, generator=gen)
    return frames, y, u, v, fused_inputs("initialize", 1, 3, with_noise=True, seed=seed)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_as_one_graph_without_recompiles(backend: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            eager_inputs, compiled_inputs = _pipeline_inputs(seed), _pipeline_inputs(seed)
            expected = _pipeline(*eager_inputs)
            result = compiled(*compiled_inputs)
            for a, b in zip(result, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            # The in-place updates of the fused step survive compilation (functionalization).
            for key in ("x_t", "stock"):
                torch.testing.assert_close(
                    compiled_inputs[4][key], eager_inputs[4][key], rtol=0, atol=0
                )


def test_explain_finds_no_graph_break() -> None:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_pipeline)(*_pipeline_inputs(0))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = str(explanation.graphs[0].graph)
    for name in (
        "preprocess_rgb",
        "preprocess_i420",
        "cosine_similarity",
        "stream_batch_step",
        "postprocess_i420",
    ):
        assert f"livediff.{name}" in ops


def test_modes_enum_is_accepted() -> None:
    from livediff.engine.config import RCFGMode  # tests may import the engine; kernels may not

    state = fused_inputs("full", 1, 2, with_noise=False)
    by_enum = fused_step(
        **{k: v.clone() if v is not None else None for k, v in state.items()},
        rcfg=RCFGMode.FULL,
        frame_buffer_size=1,
    )
    by_name = fused_step(**state, rcfg="full", frame_buffer_size=1)
    assert torch.equal(by_enum, by_name)
    assert tuple(mode.value for mode in RCFGMode) == fused_step_module.RCFG_MODES
