"""GPU kernels: each a ``torch.library`` custom op (namespace ``livediff``) with a Triton kernel
for CUDA and a plain-PyTorch reference for every other case.

- :mod:`.preprocess`: uint8 RGB / I420 / NV12 frames → model input (crop, bilinear resize).
- :mod:`.postprocess`: model output → uint8 RGB or packed I420.
- :mod:`.similarity`: cosine similarity of two frames, as a device tensor.
- :mod:`.fused_step`: one Stream Batch step (RCFG, LCM step, shift, re-noise, stock noise).
- :mod:`.lora_rows`: each row of a shared batch adds its own LoRAs' ``scale·(x·A)·B``
  (Punica's segmented low-rank update) over LoRA weights packed in fixed device buffers.
- :mod:`.yuv`: the BT.601 limited-range conversions and plane layouts.
- :mod:`.canny`: Canny edges with per-row thresholds (the canny ControlNets' input). Plain
  PyTorch on every device, no Triton kernel: nothing to fall back from, so it is not in
  ``kernels_status()``.
- :mod:`.status`: ``kernels_status()``, which op runs Triton on a device and why not.

The ``_triton_*`` modules hold the kernels and import Triton; they are loaded on the first
CUDA call only, so CPU machines without Triton import this package fine. This layer imports
torch, Triton and :mod:`livediff.exceptions` (bad arguments are
:class:`~livediff.exceptions.KernelInputError`), never ``engine``, ``models`` or ``streams``.

No silent fallback, by this rule:

- Off CUDA the reference is the implementation; nothing is reported per call.
- On CUDA each call runs the Triton kernel when the guard in :mod:`._dispatch` holds.
  Otherwise it runs the reference: Triton cannot be imported, or a tensor is not contiguous,
  of a dtype the kernel was not written for, or of 2**31 elements or more. The first such call
  of each op logs a WARNING naming the op and the reason. ``kernels_status()`` reports the op's
  ``fallback`` (the first reason and the count of such calls) from then on.
- At start-up the engine logs ``kernels_status()`` (a WARNING on CUDA when ops run their
  references). The ``compile`` backend on CUDA with a Triton that cannot be imported does not
  start (``BackendError``), because Inductor needs Triton there as well.
- A Triton kernel that raises is an error of that call; it is never retried as the reference.
"""

if __name__ == "kernels":  # the checkout is on sys.path: the installed `kernels` is meant
    from livediff.top_level import hand_over

    hand_over(__name__, __file__)
