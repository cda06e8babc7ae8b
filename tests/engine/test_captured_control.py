"""The control images a captured frame step makes equal those of the call-by-call path.

:class:`CapturedControl` computes a session's control images from static buffers inside the
whole-step CUDA graph; here it runs eagerly on the CPU (the graph replays the same ops) and is
compared with :func:`control_images`, the path a Stream without the graph takes: canny with two
parameter sets, the frame itself, the previous output (and the input standing in before the
first), a client image (zero until it arrives). Live parameter changes go through the same
buffers; the graph key changes only when the preprocessor layout does.
"""

from __future__ import annotations

import torch

from helpers.control_testing import boxed_pixels
from livediff.engine.captured_control import CapturedControl, control_key, not_captured
from livediff.engine.control_batch import ControlRequest, SlotUse, control_images
from livediff.engine.control_plan import ControlPlan
from livediff.kernels.canny import reference_canny
from livediff.models.control_uses import CannyParams
from livediff.models.control_uses import Preprocessor as P

SIZE = (48, 64)
ROWS = 2
SLOTS = 5


def model_inputs(seed: int) -> torch.Tensor:
    return boxed_pixels(seed, ROWS, SIZE)


def plan(low: float = 60.0, high: float = 150.0) -> ControlPlan:
    return ControlPlan(
        SLOTS,
        (
            SlotUse(0, P.CANNY, CannyParams(low, high, 1.0), 0.8),
            SlotUse(1, P.CANNY, CannyParams(20.0, 90.0, 0.0), 1.0),
            SlotUse(2, P.PASSTHROUGH, None, 0.5),
            SlotUse(3, P.PREVIOUS_OUTPUT, None, 1.0),
            SlotUse(4, P.CLIENT, None, 1.0),
        ),
    )


def eager(
    chosen: ControlPlan,
    pixels: torch.Tensor,
    previous: torch.Tensor | None,
    client: dict[int, torch.Tensor],
) -> torch.Tensor:
    request = ControlRequest(
        SLOTS, chosen.uses, SIZE, pixels, previous, ROWS, torch.float32,
        torch.device("cpu"), client,
    )  # fmt: skip
    return control_images([request])[0]


def captured(chosen: ControlPlan) -> CapturedControl:
    return CapturedControl(
        chosen,
        size=SIZE,
        rows=ROWS,
        device=torch.device("cpu"),
        dtype=torch.float32,
        networks=None,
        canny=reference_canny,
    )


def test_captured_control_images_equal_the_call_by_call_ones() -> None:
    chosen = plan()
    control = captured(chosen)
    pixels = model_inputs(1)
    # Before the first output the input frame stands in for the previous one; no client image.
    got = control.compute(pixels).clone()
    want = eager(chosen, pixels, None, {})
    assert torch.equal(got, want)
    assert got[:, 0].amax() == 1 and got[:, 4].abs().amax() == 0
    assert not torch.equal(got[:, 0], got[:, 1])  # two parameter sets, two edge maps

    previous = torch.randint(0, 256, (1, *SIZE, 3), dtype=torch.uint8)
    image = torch.rand(1, 3, *SIZE)
    control.refresh(chosen, {4: image}, previous)
    got = control.compute(model_inputs(2)).clone()
    want = eager(chosen, model_inputs(2), previous, {4: image})
    assert torch.equal(got, want)
    assert torch.equal(got[0, 4], image[0]) and torch.equal(got[1, 3], got[0, 3])


def test_live_thresholds_go_through_the_same_buffers_and_key() -> None:
    first, second = plan(2.0, 6.0), plan(120.0, 250.0)
    assert control_key(first) == control_key(second)
    control = captured(first)
    pixels = model_inputs(3)
    before = control.compute(pixels).clone()
    control.refresh(second, {}, None)
    after = control.compute(pixels).clone()
    assert torch.equal(after, eager(second, pixels, None, {}))
    assert not torch.equal(after[:, 0], before[:, 0])
    assert torch.equal(after[:, 1], before[:, 1])


def test_the_key_follows_the_preprocessor_layout_only() -> None:
    one = ControlPlan(2, (SlotUse(0, P.CANNY, None, 1.0), SlotUse(1, P.CANNY, None, 0.2)))
    split = ControlPlan(
        2, (SlotUse(0, P.CANNY, None, 1.0), SlotUse(1, P.CANNY, CannyParams(10, 20, 0), 0.2))
    )
    assert control_key(one) == (("canny", (0, 1)),)
    assert control_key(split) == (("canny", (0,)), ("canny", (1,)))
    assert control_key(None) == ()


def test_depth_and_soft_edge_keep_the_step_out_of_the_graph() -> None:
    """Their networks are not captured yet: a plan using them is named, the others are not."""
    assert not_captured(plan()) == [] and not_captured(None) == []
    both = ControlPlan(
        3,
        (
            SlotUse(0, P.CANNY, None, 1.0),
            SlotUse(1, P.DEPTH, None, 1.0),
            SlotUse(2, P.SOFT_EDGE, None, 1.0),
        ),
    )
    assert not_captured(both) == ["depth", "soft_edge"]
