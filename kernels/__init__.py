"""GPU kernels: each a ``torch.library`` custom op (namespace ``livediff``) with a Triton kernel
for CUDA and a plain-PyTorch reference for every other case.

- :mod:`.preprocess`: uint8 RGB / I420 / NV12 frames → model input (crop, bilinear resize).
- :mod:`.postprocess`: model output → uint8 RGB or packed I420.
- :mod:`.similarity`: cosine similarity of two frames, as a device tensor.
- :mod:`.fused_step`: one Stream Batch step (RCFG, LCM step, shift, re-noise, stock noise).
- :mod:`.yuv`: the BT.601 limited-range conversions and plane layouts.
- :mod:`.status`: ``kernels_status()``, which op runs Triton on a device and why not.

The ``_triton_*`` modules hold the kernels and import Triton; they are loaded on the first
CUDA call only, so CPU machines without Triton import this package fine.
"""
