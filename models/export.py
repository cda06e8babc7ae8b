"""Write a model as a self-contained diffusers folder (``livediff export``).

The folder holds ``model_index.json``, ``unet/``, the text encoders and tokenizers,
``scheduler/``, the full ``vae/`` and, beside them, ``vae_tiny/``, so loading it later needs
nothing else: ``--source FOLDER`` picks up the tiny VAE from there. LoRAs are already fused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from livediff.models.loading import ModelSpec, load_components, resolve_dtype
from livediff.models.pipelines import as_pipeline
from livediff.models.presets import get_preset


def export_model(
    spec: ModelSpec, folder: str | Path, *, dtype: str | torch.dtype | None = "fp32"
) -> Path:
    """Load (or build) ``spec`` and save it to ``folder``; returns the folder."""
    target = Path(folder)
    preset = get_preset(spec.preset)
    components, scheduler_config, _ = load_components(
        spec, tiny_vae=True, full_vae=True, device=torch.device("cpu")
    )
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    pipeline = as_pipeline(preset, components, scheduler_config)
    pipeline.to(dtype=torch_dtype)
    pipeline.save_pretrained(target, safe_serialization=True)
    assert components.tiny_vae is not None
    tiny_vae: Any = components.tiny_vae  # diffusers' stubs hide nn.Module's .to()
    tiny_vae.to(dtype=torch_dtype).save_pretrained(target / "vae_tiny", safe_serialization=True)
    return target
