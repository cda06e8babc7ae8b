"""The streaming compute: per-stream Stream Batch state and the multi-session runtime.

Owns the frozen config dataclasses (:mod:`.config`, :mod:`.runtime_config`), the LCM schedule
(:mod:`.schedule`), RCFG (:mod:`.rcfg`), the Stream Batch buffers (:mod:`.stream_batch`), the
similarity filter, and one stream end to end (:class:`~.stream.Stream`, or
:class:`~.captured_stream.CapturedStream` as one CUDA graph). For many sessions over one model
it owns the cross-session batcher, the deadline scheduler, the GPU worker thread, degrading
under overload and the metrics. :mod:`.backend_fit` fits a stream to a model backend.

Entry points: :class:`~.stream.Stream` (one stream, synchronous) and
:class:`~.runtime.Engine` (sessions, asyncio; ``open_session`` gives a
:class:`~.session.Session`).

It imports ``models`` and ``kernels`` and never ``streams``, ``clients`` or ``bench``: no
sockets, codecs or HTTP here. The event loop never runs its CUDA work; the worker thread does.
"""
