"""Give a loaded model the per-session LoRA library its config names (``--lora-library``).

Attaching rewrites the UNet's target linears once (before the backend compiles it) and loads
every LoRA the library names; a LoRA the loader refuses stops the start with its message.
"""

from __future__ import annotations

import logging

from livediff.exceptions import ModelLoadError
from livediff.models.bundle import ModelBundle
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_library_config import LoraLibraryConfig

log = logging.getLogger(__name__)


def attach_lora_library(bundle: ModelBundle, config: LoraLibraryConfig) -> ModelBundle:
    """``bundle`` with a library of ``config.capacity`` holding ``config.entries()``."""
    entries = config.entries()  # a bad folder or file is refused before the UNet is touched
    library = LoraLibrary.attach(bundle.unet, config.capacity, merge=config.merging)
    for entry in entries:
        try:
            library.load(entry.name, entry.source, weight_name=entry.weight_name)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"--lora-library: LoRA {entry.name!r} ({entry.source}): {exc}",
                field="library",
                limit=exc.limit,
            ) from exc
    log.info("per-session LoRA library: %s", ", ".join(library.names()) or "empty")
    return bundle.with_loras(library)
