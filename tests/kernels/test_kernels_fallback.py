"""No silent fallback: on CUDA a call that runs the reference is logged once per op and counted
in ``kernels_status``; the compile backend without Triton on CUDA refuses to start.

CUDA is simulated on CPU: a tensor subclass that answers ``device == cuda`` reaches the ops'
CUDA implementations (called directly, as the dispatcher would), and ``torch.cuda.is_available``
is patched where ``kernels_status`` asks it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from livediff.exceptions import BackendError
from livediff.kernels import _dispatch, postprocess, status
from livediff.kernels._dispatch import FALLBACKS, INT32_LIMIT, triton_refusal
from livediff.kernels.status import describe, kernels_status
from livediff.models import backends
from livediff.models.spec import CompileBatch, Precision

OP = "livediff::postprocess_rgb"
REASON = "images (2, 3, 8, 10) is neither contiguous nor channels-last (strides (240, 80, 1, 8))"
NO_TRITON = "triton cannot be imported (ImportError: simulated)"


class PretendCuda(torch.Tensor):
    """CPU data that says it lives on CUDA, as far as the guard looks."""

    @property  # type: ignore[override]
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def fresh_record() -> Iterator[None]:
    FALLBACKS.clear()
    yield
    FALLBACKS.clear()


@pytest.fixture
def cuda_with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda: None)
    monkeypatch.setattr(status, "triton_unavailable_reason", lambda: None)


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "livediff.kernels._dispatch" and r.levelno == logging.WARNING
    ]


def test_a_fallback_on_cuda_is_logged_once_and_reported(
    cuda_with_triton: None, caplog: pytest.LogCaptureFixture
) -> None:
    images = torch.rand(2, 3, 8, 10) * 2 - 1
    strided = images.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    assert not strided.is_contiguous()
    caplog.set_level(logging.WARNING)
    outputs = [
        postprocess._postprocess_rgb_cuda(strided.as_subclass(PretendCuda)) for _ in range(3)
    ]
    assert all(torch.equal(out, postprocess.reference_rgb(images)) for out in outputs)
    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1
    assert OP in warnings[0] and REASON in warnings[0] and "cuda:0" in warnings[0]
    report = kernels_status("cuda")
    entry = report["ops"][OP]
    assert entry["impl"] == "triton"
    assert entry["fallback"] == {"reason": REASON, "calls": 3}
    assert describe(report)[OP] == (f"triton; reference on 3 calls (fallback: {REASON})")
    assert all("fallback" not in e for name, e in report["ops"].items() if name != OP)


def test_the_cpu_report_keeps_out_cuda_fallbacks(cuda_with_triton: None) -> None:
    postprocess._postprocess_rgb_cuda(
        torch.zeros(1, 3, 4, 4, dtype=torch.float64).as_subclass(PretendCuda)
    )
    assert FALLBACKS.snapshot()[OP]["reason"] == (
        "images is torch.float64: the kernel takes float16, bfloat16 or float32"
    )
    assert "fallback" not in kernels_status("cpu")["ops"][OP]


class FakeTensor:
    def __init__(self, *, device: str = "cuda", contiguous: bool = True, numel: int = 8) -> None:
        self.device = torch.device(device)
        self.shape = (numel,)
        self._contiguous, self._numel = contiguous, numel

    def is_contiguous(self) -> bool:
        return self._contiguous

    def numel(self) -> int:
        return self._numel


@pytest.mark.parametrize(
    ("kwargs", "dtype_problem", "reason"),
    [
        ({}, None, None),
        ({"contiguous": False}, None, "x (8,) is not contiguous"),
        ({"device": "cpu"}, None, "x is on cpu, not CUDA"),
        (
            {"numel": INT32_LIMIT + 1},
            None,
            f"x has {INT32_LIMIT + 1} elements: the kernels index with int32",
        ),
        ({}, "x is torch.int8: …", "x is torch.int8: …"),
    ],
)
def test_the_guard_names_its_reason(
    cuda_with_triton: None, kwargs: dict[str, Any], dtype_problem: str | None, reason: str | None
) -> None:
    tensor: Any = FakeTensor(**kwargs)
    assert triton_refusal(dtype_problem, x=tensor, optional=None) == reason


def test_without_triton_every_call_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda: NO_TRITON)
    assert triton_refusal(None, x=FakeTensor()) == NO_TRITON


def test_the_compile_backend_on_cuda_without_triton_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda: NO_TRITON)
    cuda_bundle: Any = SimpleNamespace(
        device=torch.device("cuda", 0),
        loras=None,
        precision=Precision.NATIVE,
        compile_batch=CompileBatch.PER_BUCKET,
    )
    with pytest.raises(
        BackendError, match=r"compile backend on CUDA needs Triton.*--backend eager"
    ):
        backends.prepare_backend(cuda_bundle, "compile")


def test_eager_on_cuda_without_triton_warns_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(status.torch.cuda, "is_available", lambda: True)
    for module in (backends, status, _dispatch):
        monkeypatch.setattr(module, "triton_unavailable_reason", lambda: NO_TRITON)
    caplog.set_level(logging.INFO)
    backends._report_kernels(SimpleNamespace(device=torch.device("cuda", 0)), needs_triton=False)  # type: ignore[arg-type]
    [record] = [r for r in caplog.records if r.name == "livediff.models.backends"]
    assert record.levelno == logging.WARNING
    assert "references on CUDA" in record.getMessage() and NO_TRITON in record.getMessage()


def test_on_cpu_the_start_up_line_is_short(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    backends._report_kernels(SimpleNamespace(device=torch.device("cpu")), needs_triton=True)  # type: ignore[arg-type]
    [record] = [r for r in caplog.records if r.name == "livediff.models.backends"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "fused kernels: reference (device cpu: the Triton kernels run on CUDA only)"
    )


def test_postprocess_takes_channels_last_images_and_refuses_other_layouts() -> None:
    """TAESD under the compile recipe decodes channels-last: the kernels read it by strides."""
    images = torch.rand(2, 3, 8, 10)
    assert _dispatch.pixels_dense(images)
    assert _dispatch.pixels_dense(images.contiguous(memory_format=torch.channels_last))
    assert not _dispatch.pixels_dense(images.transpose(2, 3).contiguous().transpose(2, 3))
    assert not _dispatch.pixels_dense(images[:, :, :, 1:9])  # a crop: rows are not dense
    assert _dispatch.pixels_dense(torch.rand(1, 3, 1, 1))
