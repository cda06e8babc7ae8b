"""A session's per-session LoRAs as per-row inputs: the packed slots and scales of its uses.

The names are looked up in the model's :class:`~livediff.models.lora_library.LoraLibrary` when
the parameters are prepared (off the GPU worker); the result is two small device tensors
that :meth:`StreamBatch.set_loras` copies into every row of the session. A name the library
does not hold, too many uses, or LoRAs on a model without a library are refused with
``field="loras"``, and the session keeps what it had.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.lora_uses import LoraUse


def resolve_loras(
    uses: Sequence[LoraUse], bundle: ModelBundle
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(indices [slots], scales [slots])`` for ``uses``; ``None`` when the model has no
    library (and the session asks for none)."""
    library = bundle.loras
    if library is None:
        if uses:
            raise ParameterError(
                "this server has no per-session LoRA library (LoRAs given with --lora are fused "
                "into the model for every session)",
                field="loras",
            )
        return None
    indices, scales = library.row_inputs([[(use.name, use.scale) for use in uses]])
    return indices[0], scales[0]
