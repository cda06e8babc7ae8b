"""A single stream whose whole frame step is one CUDA graph.

upload → preprocess → encode → Stream Batch UNet (with RCFG) → scheduler step → decode →
postprocess all replay as one graph over static buffers: the input frame is copied into a
static uint8 buffer (RGB, or the three I420 planes of a :class:`YuvFrame`: the conversion is
part of the graph), the graph replays, and the output is the static uint8 result. There is no
host sync in the step; the caller syncs once, when it needs the pixels (``StreamOutput.image``
is a device tensor; an event-based wait is left to the consumer).

Live updates keep working without recapture because they ``copy_`` into the same buffers the
graph reads (embeddings, noise, coefficients, guidance, ControlNet scales). A new step count
(new buffers) or a new input size captures a new graph; graphs are kept per input size.

A feature bank is part of the step too: before each replay the host picks the frame's bank
call (which frames are held, which one this frame's features go to: :meth:`Stream.begin`'s
choice) and copies it into the Stream Batch's static bank inputs, which the graph reads. What
changes the UNet call's shape (no row banking, a bank still filling with its held-frame mask,
a full bank attending unmasked) is part of a graph's key: at most three graphs per input size.
A capture's warm-up calls leave the bank as it was (:meth:`FeatureBank.entries_kept`).

ControlNets are part of the step: the graph runs the session's preprocessors on its frame and
feeds the nets (:mod:`livediff.engine.captured_control`: thresholds, client images and the
previous output are static buffers refreshed before each replay). Which preprocessors feed
which nets is part of a graph's key: changing that captures another graph (the compiled
networks are reused, nothing recompiles); the last :data:`KEPT_GRAPHS` are kept.

Requirements: CUDA, ``use_denoising_batch=True`` (the sequential reference path runs one UNet
call per step and is not graphed). txt2img draws its per-frame noise from the CUDA generator
inside the graph, so it is seeded but not bit-identical to the CPU path.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from livediff.engine.captured_control import (
    CapturedControl,
    ControlKey,
    control_key,
    not_captured,
)
from livediff.engine.config import GenerationMode
from livediff.engine.frames import (
    InputImage,
    StreamOutput,
    YuvFrame,
    fit_crop,
    frame_size,
    upload_frame,
)
from livediff.engine.stream import FrameGroup, Stream
from livediff.engine.stream_batch import StreamBatch
from livediff.exceptions import BackendError
from livediff.kernels.postprocess import model_output_to_rgb
from livediff.kernels.preprocess import i420_to_model_input, rgb_to_model_input
from livediff.models.compiled_canny import CannyFn, compiled_canny

log = logging.getLogger(__name__)
WARMUP_ITERATIONS = 3
BankKey = tuple[bool, bool]  # (a row banks, its bank holds every frame): the UNet call's shape
KEPT_GRAPHS = 4  # captured steps kept per stream (input sizes × ControlNet layouts × banks)


class _FrameGraph:
    """The captured step for one input size (and one StreamBatch)."""

    def __init__(
        self,
        stream: Stream,
        height: int,
        width: int,
        yuv: bool,
        control: CapturedControl | None = None,
    ) -> None:
        self.stream = stream
        self.control = control
        self.batch: StreamBatch = stream.batch
        frames = stream.config.frame_buffer_size
        device = stream.bundle.device
        self.crop = fit_crop(height, width, stream.height, stream.width, stream.config.fit)
        ch, cw = (height + 1) // 2, (width + 1) // 2
        shapes = [(height, width), (ch, cw), (ch, cw)] if yuv else [(height, width, 3)]
        # The static inputs: one uint8 RGB buffer, or the three I420 planes.
        self.frames_in = [
            torch.zeros(frames, *shape, dtype=torch.uint8, device=device) for shape in shapes
        ]
        self.latent_shape = (frames, 4, *stream.latent_size)
        self._capture()

    def _body(self) -> torch.Tensor:
        stream, bundle = self.stream, self.stream.bundle
        pixels = None
        if stream.config.mode is GenerationMode.TXT2IMG:
            x0 = torch.zeros(self.latent_shape, device=bundle.device, dtype=bundle.dtype)
            first = torch.randn(self.latent_shape, device=bundle.device, dtype=bundle.dtype)
        else:
            size = (stream.height, stream.width, self.crop, bundle.dtype)
            if len(self.frames_in) == 3:
                y, u, v = self.frames_in
                pixels = i420_to_model_input(y, u, v, *size)
            else:
                pixels = rgb_to_model_input(self.frames_in[0], *size)
            x0, first = bundle.encode(pixels), None
        if self.control is not None:
            self.batch.push_control(self.control.compute(pixels))
        eps = stream.predict_noise(self.batch.begin(x0, first))  # the per-call input rules
        return model_output_to_rgb(bundle.decode(self.batch.finish(eps)))

    def _capture(self) -> None:
        bundle, inputs = self.stream.bundle, self.batch.unet_inputs()
        # A feature bank's pools exist before the first compiled call (else it compiles twice),
        # and the entries this frame writes are put back as they were after the warm-up calls
        bundle.make_bank_pools(inputs)
        bank = bundle.feature_bank
        with bank.entries_kept(inputs.bank_write) if bank else contextlib.nullcontext():
            self._warm_up_and_capture()

    def _warm_up_and_capture(self) -> None:
        in_flight = self.batch.snapshot()  # a capture mid-stream must not lose these frames
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_ITERATIONS):  # compiles and autotunes outside the capture
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with (
            torch.inference_mode(),
            torch.cuda.graph(self.graph, capture_error_mode="thread_local"),
        ):
            self.frames_out = self._body()
        self.batch.restore(in_flight)  # the warm-up frames must not linger in the buffers

    def replay(self, images: list[InputImage]) -> torch.Tensor:
        """Copy the group's frames (RGB tensors or YUV planes, host or device) in and replay."""
        for k, image in enumerate(images):
            planes = image.planes() if isinstance(image, YuvFrame) else (image,)
            for static, plane in zip(self.frames_in, planes, strict=True):
                if not plane.is_contiguous():  # a padded decode buffer: up whole, no host pack
                    plane = upload_frame(plane, static.device)
                static[k].copy_(plane, non_blocking=True)
        self.graph.replay()
        return self.frames_out


class CapturedStream(Stream):
    """A :class:`Stream` that runs each frame group as one CUDA graph replay (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.bundle.device.type != "cuda":
            raise BackendError(
                f"CUDA graphs need a CUDA device; this stream runs on {self.bundle.device}"
            )
        if not self.config.use_denoising_batch:
            raise BackendError("the captured frame step needs use_denoising_batch=True")
        self._graphs: dict[tuple[int, int, bool, ControlKey, BankKey], _FrameGraph] = {}
        self._said_feedback = False
        self._said_outside: list[str] = []
        self._canny: CannyFn | None = None

    def graph_for(self, height: int, width: int, yuv: bool = False) -> _FrameGraph:
        """The captured step for this input size and kind (and the session's ControlNet
        layout), capturing it on first use."""
        layout = control_key(self._control)
        key = (height, width, yuv, layout, (self.batch.bank_live, self.batch.bank_full))
        captured = self._graphs.get(key)
        if captured is not None and captured.batch is not self.batch:
            self._graphs.clear()  # the step count changed: every graph read the old buffers
            captured = None
        if captured is None:
            kind = "I420" if yuv else "RGB"
            nets = f", ControlNets {layout}" if layout else ""
            if self.batch.bank_live:
                nets += ", feature bank " + ("full" if self.batch.bank_full else "filling")
            log.info(
                "[%s] capturing the frame step for %dx%d %s input%s",
                self.session_id,
                width,
                height,
                kind,
                nets,
            )
            while len(self._graphs) >= KEPT_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            control = self._captured_control() if self._control is not None else None
            captured = self._graphs[key] = _FrameGraph(self, height, width, yuv, control)
        return captured

    def _captured_control(self) -> CapturedControl:
        assert self._control is not None
        if self._canny is None:
            self._canny = compiled_canny()
        return CapturedControl(
            self._control,
            size=(self.height, self.width),
            rows=self.config.frame_buffer_size,
            device=self.bundle.device,
            dtype=self.bundle.dtype,
            networks=self.bundle.control_networks,
            canny=self._canny,
        )

    def run(self, group: FrameGroup) -> list[StreamOutput]:
        if self.params.latent_feedback:  # the blend needs the host between two frames
            if not self._said_feedback:
                log.info(
                    "[%s] latent feedback: frames run call by call, not as one graph",
                    self.session_id,
                )
                self._said_feedback = True
            return super().run(group)
        outside = not_captured(self._control)
        if outside:  # their networks are not captured yet: the frame goes call by call
            if outside != self._said_outside:
                log.info(
                    "[%s] the %s preprocessor: frames run call by call, not as one graph",
                    self.session_id,
                    " and ".join(outside),
                )
                self._said_outside = outside
            return super().run(group)
        skipped = self.skip_outputs(group)
        if skipped is not None:
            return skipped
        first = group.images[0]
        kinds = {(frame_size(image), isinstance(image, YuvFrame)) for image in group.images}
        if len(kinds) > 1:
            return super().run(group)  # mixed sizes inside one group: the eager path handles them
        height, width = frame_size(first)
        self.set_bank_call(group)  # as Stream.begin: static inputs the graph reads
        graph = self.graph_for(height, width, isinstance(first, YuvFrame))
        if graph.control is not None and self._control is not None:
            graph.control.refresh(self._control, self._client_images, self._previous_output())
        rgb = graph.replay(group.images).clone()
        return self.complete(group, rgb)
