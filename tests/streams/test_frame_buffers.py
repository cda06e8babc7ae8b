"""A websocket frame's pixels are not copied on the host before the upload (streams.frame_buffers).

Host copies are counted two ways: by memory identity (the frame the session gets is a view of
the buffer the JPEG decoded into) and by a dispatch mode that sees every tensor operation
(:class:`HostCopies`): none of them copies a frame's pixels host to host.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.streams_testing import FOX, running_server
from livediff.clients.ws_client import WsClient
from livediff.engine.frames import upload_frame
from livediff.engine.session import Session
from livediff.exceptions import EmptyFrameError, InvalidFrameError, UsageError
from livediff.models.bundle import ModelBundle
from livediff.streams.frame_buffers import FrameBuffers, decode_frame
from livediff.wire import decode_jpeg

aten = torch.ops.aten
_COPIES = (aten.clone, aten.copy_, aten._to_copy, aten._pin_memory, aten.pin_memory)


class HostCopies(TorchDispatchMode):
    """Counts operations that write a tensor's data into other host memory; logs every copy."""

    def __init__(self) -> None:
        super().__init__()
        self.host = 0
        self.copies: list[tuple[str, tuple[int, ...], bool, str]] = []  # op, shape, dense, to

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _COPIES:
            source = args[1] if func.overloadpacket is aten.copy_ else args[0]
            target = args[0] if func.overloadpacket is aten.copy_ else out
            self.copies.append(
                (
                    str(func.overloadpacket),
                    tuple(source.shape),
                    source.is_contiguous(),
                    target.device.type,
                )
            )
            if source.device.type == "cpu" and target.device.type == "cpu":
                self.host += 1
        return out


def _jpeg(height: int, width: int, mode: str = "RGB", **save: Any) -> bytes:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_decodes_into_the_buffer_itself(progressive: bool) -> None:
    data = _jpeg(37, 53, progressive=progressive)
    buffers = FrameBuffers(pinned=False)
    with HostCopies() as counted:
        frame = decode_frame(data, buffers, max_pixels=None)
    assert counted.host == 0 and buffers.taken == 1
    assert frame.shape == (37, 53, 3) and frame.stride() == (53 * 4, 4, 1)
    assert frame.untyped_storage().nbytes() == 37 * 53 * 4  # the buffer, not a copy of it
    np.testing.assert_array_equal(frame.numpy(), decode_jpeg(data))  # Pillow's pixels exactly


def test_wire_decode_into_returns_a_view_of_the_target() -> None:
    data = _jpeg(20, 30)
    target = np.zeros((20, 30, 4), np.uint8)
    image = decode_jpeg(data, into=lambda h, w: target)
    assert np.shares_memory(image, target) and image.shape == (20, 30, 3)
    np.testing.assert_array_equal(image, decode_jpeg(data))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_greyscale_and_cmyk_jpegs_are_converted_as_before(mode: str) -> None:
    data = _jpeg(16, 24, mode)
    buffers = FrameBuffers(pinned=False)
    frame = decode_frame(data, buffers, max_pixels=None)
    assert buffers.taken == 0
    np.testing.assert_array_equal(frame.numpy(), decode_jpeg(data))


def test_a_wrong_target_is_the_callers_bug_not_the_frames() -> None:
    data = _jpeg(8, 8)
    for target in (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 4), np.uint8)[:, ::-1]):
        with pytest.raises(UsageError):
            decode_jpeg(data, into=lambda h, w, t=target: t)


def test_bad_data_is_still_refused_before_a_buffer_is_taken() -> None:
    buffers = FrameBuffers(pinned=False)
    with pytest.raises(EmptyFrameError):
        decode_frame(b"", buffers, max_pixels=None)
    with pytest.raises(InvalidFrameError):
        decode_frame(_jpeg(64, 64), buffers, max_pixels=100)  # over the pixel limit
    assert buffers.taken == 0
    with pytest.raises(InvalidFrameError):
        decode_frame(_jpeg(64, 64)[:300], buffers, max_pixels=None)  # truncated: fails decoding


def test_the_padded_buffer_goes_up_whole_and_is_packed_on_the_device() -> None:
    buffer = torch.arange(6 * 5 * 4, dtype=torch.int64).remainder(256).to(torch.uint8)
    frame = buffer.view(6, 5, 4)[..., :3]
    with HostCopies() as counted:
        on_device = upload_frame(frame, torch.device("meta"))
    assert counted.host == 0
    assert counted.copies[0] == ("aten._to_copy", (6, 5, 4), True, "meta")  # the whole buffer
    assert on_device.shape == (6, 5, 3) and on_device.is_contiguous()
    with HostCopies() as counted:  # the counter does see a host copy: packing the view
        frame.contiguous()
    assert counted.host == 1


def test_other_frames_upload_as_they_are() -> None:
    contiguous = torch.zeros((4, 4, 3), dtype=torch.uint8)
    assert upload_frame(contiguous, torch.device("cpu")) is contiguous
    cut = torch.zeros((4, 6, 3), dtype=torch.uint8)[:, 1:5]  # a crop, not a padded buffer
    with HostCopies() as counted:
        upload_frame(cut, torch.device("meta"))
    assert counted.copies[0][1:3] == ((4, 4, 3), False)


async def test_the_websocket_hands_the_session_the_buffer_it_decoded_into(
    bundle: ModelBundle, frame: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: list[tuple[Any, bool]] = []
    real_submit: Callable[..., None] = Session.submit

    def spy(self: Session, image: Any, **kwargs: Any) -> None:
        submitted.append((image, kwargs.get("owned", False)))
        real_submit(self, image, **kwargs)

    monkeypatch.setattr(Session, "submit", spy)
    async with running_server(bundle) as (base, _, _):
        url = base.replace("http://", "ws://") + "/ws"
        async with await WsClient.connect(url, params=FOX) as client:
            await client.send_frame(frame)
            jpeg = await client.recv_jpeg()
    assert jpeg.startswith(b"\xff\xd8")
    [(image, owned)] = submitted
    assert owned  # handed over: Session.submit keeps it as it is
    assert isinstance(image, torch.Tensor) and image.shape == (*frame.shape[:2], 3)
    height, width = frame.shape[:2]
    assert image.stride() == (4 * width, 4, 1)  # a view of the padded buffer it decoded into
    assert image.untyped_storage().nbytes() == height * width * 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_buffers_are_pinned_and_reused_once_uploaded() -> None:
    buffers = FrameBuffers(pinned=True)
    frame = decode_frame(_jpeg(48, 64), buffers, max_pixels=None)
    assert frame.is_pinned()  # so the engine's admission does not pin (copy) it again
    on_device = upload_frame(frame, torch.device("cuda"))
    torch.cuda.synchronize()
    np.testing.assert_array_equal(on_device.cpu().numpy(), frame.numpy())
    block = frame.untyped_storage().data_ptr()
    del frame
    torch.cuda.synchronize()  # the upload that read the block is done: it may be handed out
    again = decode_frame(_jpeg(48, 64), buffers, max_pixels=None)
    assert again.untyped_storage().data_ptr() == block  # the same page-locked memory again
