"""Style images for the IP-Adapter: an uploaded image file → the key sessions name it by.

The image is encoded once on every device's model (each has its own
:class:`~livediff.models.image_prompts.ImagePromptEncoder` cache), so a session finds it
whichever device it runs on, and the key (the SHA-256 of the adapter's name and the bytes) is
the same on all of them. Blocking: call it from a worker thread, never the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.image_prompts import FIELD


def encode_style_image(
    bundles: Sequence[ModelBundle], image_file: bytes, *, pin: bool = False
) -> str:
    """Encode ``image_file`` (PNG, JPEG, WebP …) for every model; returns its key.

    ``pin``: keep it in every cache for good (``--style-image``, the sessions' default).

    Refuses a model without IP-Adapter (``ParameterError``) and an image that does not
    decode or is too large (``InvalidFrameError``), each with ``field="ip_image"``.
    """
    encoders = [bundle.image_prompts for bundle in bundles]
    if any(encoder is None for encoder in encoders):
        raise ParameterError(
            "this server runs no IP-Adapter: start it with --ip-adapter SOURCE[:VARIANT] "
            "([model.ip_adapter]) to use style images",
            field=FIELD,
        )
    keys = set()
    for encoder in encoders:
        assert encoder is not None
        prompt = encoder.encode_bytes(image_file, pin=pin)
        if prompt.tokens.is_cuda:  # the GPU worker reads the tokens on its own stream
            torch.cuda.current_stream(prompt.tokens.device).synchronize()
        keys.add(prompt.key)
    (key,) = keys
    return key
