"""The streaming compute: per-stream Stream Batch state and the multi-session runtime.

Owns the frozen config dataclasses (:mod:`.config`, :mod:`.runtime_config`), the LCM schedule
(:mod:`.lcm_schedule`), RCFG (:mod:`.rcfg`), the Stream Batch buffers (:mod:`.stream_batch`),
the similarity filter, and one stream end to end (:class:`~.stream.Stream`, or
:class:`~.captured_stream.CapturedStream` as one CUDA graph). For many sessions over one model:
the runtime (:mod:`.runtime`) and its GPU worker thread (:mod:`.worker`), which plans batches
earliest deadline first (:mod:`.batch_planning`), runs one batch (:mod:`.batch_step`) by
packing every session's rows into one model call (:mod:`.batch_packing`), overlaps batches
(:mod:`.overlap`), sheds faults (:mod:`.faults`) and degrades under overload
(:mod:`.degrade`); Streams for sessions are planned on the control thread
(:mod:`.session_plans`); sessions and their frames (:mod:`.session`, :mod:`.frames`); the
metrics. :mod:`.backend_fit` fits a stream to a model backend.

Entry points: :class:`~.stream.Stream` (one stream, synchronous) and
:class:`~.runtime.Engine` (sessions, asyncio; ``open_session`` gives a
:class:`~.session.Session`).

It imports ``models`` and ``kernels`` and never ``streams``, ``clients`` or ``bench``: no
sockets, codecs or HTTP here. The event loop never runs its CUDA work; the worker thread does.
"""
