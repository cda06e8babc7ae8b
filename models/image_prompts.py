"""Image prompts: an image in, the IP-Adapter's prompt tokens out, off the hot path, cached.

:class:`ImagePromptEncoder` runs what diffusers' pipelines run for ``ip_adapter_image``
(``encode_image`` + the UNet's image projection): CLIP's image processor (resize the short
side, centre crop, normalise), the CLIP vision encoder — its pooled, projected embedding for
a plain adapter, its penultimate hidden states for a plus one — and the adapter's projection.
The result is an :class:`ImagePrompt`: ``tokens`` ``[T, D]`` for a row's ``UNetBatch.ip_tokens``
and ``uncond_tokens``, what diffusers gives the unconditional rows of guidance (the projection
of a zero embedding, or of the encoder's features of a black image, for plus).

Encoding costs a full CLIP vision pass, so prompts are cached by content: the SHA-256 of the
image's bytes and the adapter's name, in a bounded least-recently-used cache (one per encoder,
safe to share between threads). Images arrive as encoded files (PNG, JPEG, WebP …) or as
uint8 RGB arrays; undecodable or oversized input is refused with an
:class:`~livediff.exceptions.InvalidFrameError` naming ``field="ip_image"``.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import CLIPImageProcessor

from livediff.exceptions import FrameTooLargeError, InvalidFrameError, ParameterError
from livediff.models.ip_adapter import LoadedIPAdapter

FIELD = "ip_image"
DEFAULT_CACHE_ENTRIES = 64
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ImagePrompt:
    """One image's prompt tokens for one adapter (on the adapter's device and dtype)."""

    key: str  # hex SHA-256 of the adapter's name and the image's bytes
    tokens: torch.Tensor  # [T, D]
    uncond_tokens: torch.Tensor  # [T, D]


class ImagePromptEncoder:
    """Images → :class:`ImagePrompt` for one loaded adapter, with a bounded cache by content."""

    def __init__(
        self,
        adapter: LoadedIPAdapter,
        *,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if cache_entries < 1:
            raise ParameterError(
                f"cache_entries={cache_entries} must be at least 1", field="cache_entries"
            )
        self.adapter = adapter
        self.max_image_bytes = max_image_bytes
        self.max_pixels = max_pixels
        self.cache_entries = cache_entries
        size = adapter.image_size
        self._processor = CLIPImageProcessor(size=size, crop_size=size)  # as diffusers builds it
        self._cache: OrderedDict[str, ImagePrompt] = OrderedDict()
        self._pinned: set[str] = set()  # kept however many others arrive (a start-up image)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def cache_key(self, data: bytes) -> str:
        digest = hashlib.sha256(self.adapter.name.encode() + b"\0")
        digest.update(data)
        return digest.hexdigest()

    def lookup(self, key: str) -> ImagePrompt | None:
        """The prompt of an image encoded before, by its :attr:`ImagePrompt.key` (``None``:
        never encoded here, or left the cache)."""
        return self._cached(key)

    def encode_bytes(self, data: bytes, *, pin: bool = False) -> ImagePrompt:
        """An encoded image file (PNG, JPEG, WebP …) → its prompt, from the cache when seen.

        ``pin``: the prompt never leaves the cache (the image a server or a file job starts
        with, which sessions name by its key however many uploads follow).
        """
        if len(data) > self.max_image_bytes:
            raise FrameTooLargeError(
                f"the style image is {len(data)} bytes; at most {self.max_image_bytes} bytes are accepted",
                field=FIELD,
                limit=self.max_image_bytes,
            )
        key = self.cache_key(data)
        prompt = self._cached(key) or self._store(key, self.encode(self._decode(data)))
        if pin:
            with self._lock:
                self._pinned.add(key)
        return prompt

    def encode_array(self, image: np.ndarray) -> ImagePrompt:
        """A uint8 RGB ``[H, W, 3]`` array → its prompt (cached by its bytes and shape)."""
        array = np.ascontiguousarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise InvalidFrameError(
                f"a style image array must be uint8 [H, W, 3]; got {array.dtype} {array.shape}",
                field=FIELD,
            )
        self._check_pixels(array.shape[1], array.shape[0])
        key = self.cache_key(repr(array.shape).encode() + array.tobytes())
        return self._cached(key) or self._store(key, self.encode(Image.fromarray(array)))

    @torch.inference_mode()
    def encode(self, image: Image.Image | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached: ``(tokens, uncond_tokens)``, each ``[T, D]``."""
        encoder = self.adapter.image_encoder
        parameter = next(encoder.parameters())
        pixels = self._processor(image, return_tensors="pt").pixel_values
        pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
        if self.adapter.variant.uses_patch_features:
            both = torch.cat([pixels, torch.zeros_like(pixels)])
            features = encoder(both, output_hidden_states=True).hidden_states[-2]
        else:
            embeds = encoder(pixels).image_embeds
            features = torch.cat([embeds, torch.zeros_like(embeds)])
        tokens = self.adapter.projection(features)
        return tokens[0], tokens[1]

    def _decode(self, data: bytes) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            self._check_pixels(*image.size)  # from the header, before the pixels are decoded
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            if isinstance(exc, FrameTooLargeError):
                raise
            raise InvalidFrameError(
                f"the style image does not decode as an image file: {exc}", field=FIELD
            ) from exc
        return image.convert("RGB")

    def _check_pixels(self, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise InvalidFrameError("the style image has no pixels", field=FIELD)
        if width * height > self.max_pixels:
            raise FrameTooLargeError(
                f"the style image is {width}×{height}; at most {self.max_pixels} pixels are accepted",
                field=FIELD,
                limit=self.max_pixels,
            )

    def _cached(self, key: str) -> ImagePrompt | None:
        with self._lock:
            prompt = self._cache.get(key)
            if prompt is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            return prompt

    def _store(self, key: str, encoded: tuple[torch.Tensor, torch.Tensor]) -> ImagePrompt:
        prompt = ImagePrompt(key, *encoded)
        with self._lock:
            self.misses += 1
            self._cache[key] = prompt
            self._cache.move_to_end(key)
            evictable = [k for k in self._cache if k not in self._pinned and k != key]
            for old in evictable[: max(0, len(self._cache) - self.cache_entries)]:
                del self._cache[old]
        return prompt


def row_inputs(
    prompts: list[ImagePrompt | None],
    scales: list[float],
    adapter: LoadedIPAdapter,
    *,
    unconditional: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ip_tokens [rows, T, D], ip_scales [rows])`` for rows with these prompts (None: off).

    A convenience for tests and simple callers; the engine writes its static buffers in place.
    """
    parameter = next(adapter.projection.parameters())
    opts: dict[str, Any] = {"device": parameter.device, "dtype": parameter.dtype}
    tokens = torch.zeros(len(prompts), *adapter.token_shape, **opts)
    for row, prompt in enumerate(prompts):
        if prompt is not None:
            tokens[row] = prompt.uncond_tokens if unconditional else prompt.tokens
    values = [s if p is not None else 0.0 for p, s in zip(prompts, scales, strict=True)]
    return tokens, torch.tensor(values, **opts)
