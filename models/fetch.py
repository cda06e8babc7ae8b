"""Fetching model files: local paths, the Hugging Face cache, and the network unless offline.

Every failure becomes one clear :class:`~livediff.exceptions.ModelLoadError` (a local path) or
:class:`~livediff.exceptions.ModelNotAvailableError` (a hub id that is not cached and cannot be
downloaded), naming the model, the cache folder and what to do; the original error is chained.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from huggingface_hub import constants as hf_constants

from livediff.exceptions import ModelLoadError, ModelNotAvailableError

T = TypeVar("T")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_local(source: str) -> bool:
    return (
        os.path.exists(source)
        or source.startswith((".", "/", "~"))
        or source.endswith(SINGLE_FILE_SUFFIXES)
    )


def fetch(
    what: str,
    source: str,
    offline: bool,
    load: Callable[[bool], T],
    *,
    without_weights: str = "--weights random",
) -> T:
    """Run ``load(local_files_only)``; cache first, then the network unless offline.

    Every failure becomes one clear :class:`ModelLoadError`; the original is chained as cause.
    ``without_weights`` is how the message tells the user to go on without this model's weights.
    """
    if is_local(source):
        if not os.path.exists(os.path.expanduser(source)):
            raise ModelLoadError(f"{what}: no such file or folder: {source}")
        try:
            return load(True)
        except Exception as exc:
            raise ModelLoadError(f"{what}: could not load {source}: {exc}") from exc
    try:
        return load(True)
    except Exception as cached_exc:
        if offline:
            raise ModelNotAvailableError(
                not_cached_message(
                    what, source, "downloads are off (HF_HUB_OFFLINE=1)", without_weights
                )
            ) from cached_exc
    try:
        return load(False)
    except Exception as exc:
        raise ModelNotAvailableError(
            not_cached_message(
                what,
                source,
                f"the download failed ({type(exc).__name__}: {exc})",
                without_weights,
            )
        ) from exc


def not_cached_message(
    what: str, source: str, reason: str, without_weights: str = "--weights random"
) -> str:
    return (
        f"{what} '{source}' is not in the Hugging Face cache ({hf_constants.HF_HUB_CACHE}) and {reason}. "
        f"Download it once with network access (hf download {source}), point --source at a "
        f"local copy, or try the pipeline without weights using {without_weights}."
    )
