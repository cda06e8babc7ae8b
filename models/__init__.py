"""Model families and how they run: presets, loading, text encoding, the speed recipe, backends.

Owns the presets (:mod:`.presets`: ``sd-turbo``, ``sdxl-turbo``, ``sd15-lcm``, ``tiny``),
loading from a Hugging Face id, a diffusers folder or one ``.safetensors`` file, or random
weights (:mod:`.loading`, giving a :class:`~.bundle.ModelBundle`), prompt encoding and blending
(:mod:`.prompts`), the UNet's batch interface (:mod:`.unet_batch`), and the backends
(:mod:`.backends`): the speed recipe (:mod:`.recipe`), per-bucket CUDA graphs
(:mod:`.graphed`), and ONNX export and TensorRT engines (:mod:`.onnx_export`,
:mod:`.tensorrt_engine`). ControlNets: :mod:`.controlnet` (spec, per-row residuals),
:mod:`.controlnet_loading`, :mod:`.controlnet_catalog` (the nets per preset), and their
control images (:mod:`.control_images`, with the :mod:`.depth` and :mod:`.soft_edge` networks).
IP-Adapters (style images): :mod:`.ip_adapter_spec` (spec, h94's files), :mod:`.ip_adapter`
(per-row attention processors), :mod:`.ip_adapter_loading`, and :mod:`.image_prompts` (the
image encoder with its content-hash cache).

Entry points: :func:`~.loading.load_model` with a :class:`~.loading.ModelSpec`, then
:func:`~.backends.prepare_backend`.

It imports ``kernels`` and never ``engine``, ``streams``, ``clients`` or ``bench``: no
queues, asyncio or sessions here.
"""
