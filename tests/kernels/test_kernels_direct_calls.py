"""Eager calls of the per-frame kernels skip the dispatcher; traced calls keep the custom op.

The public functions (preprocess, postprocess, the fused step, frame similarity) call the
device's implementation directly when nothing traces them (the dispatcher's Python layers cost
more than a small kernel's launch), and the registered ``torch.ops.livediff`` op while dynamo
traces, so compiled graphs still hold the op with its fake.
"""

from __future__ import annotations

from typing import Any

import torch

from livediff.kernels import postprocess, preprocess, similarity
from livediff.kernels._dispatch import implementation
from livediff.kernels.fused_step import fused_step


def _op(*args: Any) -> str:
    return "op"


def _cuda(*args: Any) -> str:
    return "cuda"


def _reference(*args: Any) -> str:
    return "reference"


def test_the_device_picks_the_implementation() -> None:
    assert implementation(_op, _cuda, _reference, torch.device("cpu")) is _reference
    assert implementation(_op, _cuda, _reference, torch.device("cuda", 1)) is _cuda
    seen: list[Any] = []

    def traced(x: torch.Tensor) -> torch.Tensor:
        seen.append(implementation(_op, _cuda, _reference, x.device))
        return x + 1

    torch._dynamo.reset()
    torch.compile(traced, backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen == [_op]  # while dynamo traces: the custom op
    torch._dynamo.reset()


def test_direct_calls_equal_the_registered_ops() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 10, generator=gen) * 2 - 1
    assert torch.equal(
        postprocess.model_output_to_rgb(images), torch.ops.livediff.postprocess_rgb(images)
    )
    assert torch.equal(
        postprocess.model_output_to_i420(images), torch.ops.livediff.postprocess_i420(images)
    )
    frames = torch.randint(0, 256, (2, 12, 16, 3), dtype=torch.uint8, generator=gen)
    crop = (1, 2, 10, 12)
    direct = preprocess.rgb_to_model_input(frames, 8, 8, crop)
    assert torch.equal(
        direct, torch.ops.livediff.preprocess_rgb(frames, *crop, 8, 8, torch.float32)
    )
    a, b = images[0], images[1]
    assert torch.equal(
        similarity.frame_similarity(a, b), torch.ops.livediff.cosine_similarity(a, b)
    )
    x_t, eps = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    coefficients = torch.rand(4, 2, generator=gen)
    ones = torch.ones(2)
    out = fused_step(x_t.clone(), eps, None, None, coefficients, ones, ones, rcfg="none",
                     frame_buffer_size=2)  # fmt: skip
    expected = torch.empty_like(out)
    torch.ops.livediff.stream_batch_step(
        x_t.clone(), eps, None, None, coefficients, ones, ones, expected, "none", 2
    )
    assert torch.equal(out, expected)


def test_compiled_graphs_hold_the_custom_ops() -> None:
    targets: list[Any] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    compiled = torch.compile(postprocess.model_output_to_rgb, backend=backend, fullgraph=True)
    assert torch.equal(compiled(images), postprocess.model_output_to_rgb(images))
    assert any("livediff.postprocess_rgb" in str(t) for t in targets), targets
    torch._dynamo.reset()
