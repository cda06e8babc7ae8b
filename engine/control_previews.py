"""Previews of the control images a session's ControlNets took, for a client that asks.

A client may ask to see what its ControlNets see (``{"control_preview": true}``, handled by
the transports: :mod:`livediff.streams.control_previews`). The preview is read here, on the
worker thread between two batches (:meth:`~livediff.engine.worker.Worker.between_batches`),
from the session's own UNet inputs: the control images of the newest frame in its Stream
Batch buffer (:meth:`~livediff.engine.stream_batch.StreamBatch.latest_control`), one per net
the session uses, nothing recomputed. A net fed ``client`` that has no image yet (it runs at
scale 0) has no preview.
"""

from __future__ import annotations

import numpy as np

from livediff.engine.client_control import awaiting
from livediff.engine.stream import Stream
from livediff.models.bundle import ModelBundle
from livediff.models.control_images import to_preview


def read_previews(stream: Stream, bundle: ModelBundle) -> dict[str, np.ndarray]:
    """Worker thread: ControlNet name → uint8 RGB ``[H, W, 3]`` of the control image the
    newest frame of ``stream`` took, for each net its session uses (in its order)."""
    latest = stream.batch.latest_control()
    if latest is None:
        return {}
    loaded = [net.name for net in bundle.controlnets]
    waiting = set(awaiting(stream.params, bundle, stream.client_images))
    nets = list(
        dict.fromkeys(
            use.controlnet
            for use in stream.params.controlnets
            if use.controlnet in loaded and use.controlnet not in waiting
        )
    )
    if not nets:
        return {}
    images = to_preview(latest[[loaded.index(net) for net in nets]]).cpu().numpy()
    return dict(zip(nets, images, strict=True))
