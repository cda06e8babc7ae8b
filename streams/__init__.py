"""The media edges: where frames and control enter and leave the engine.

Owns the typed media items (:mod:`.media`), PyAV file and camera sources and the file sink
(:mod:`.file_source`, :mod:`.camera_source`, :mod:`.file_sink`), the virtual camera
(:mod:`.vcam`), aiortc peers and tracks (:mod:`.peer`, :mod:`.webrtc_tracks`), the
websocket handler (:mod:`.ws_handler`), control-message parsing (:mod:`.control`), the
server's limits, access and shutdown rules, and the aiohttp app that serves it all
(:mod:`.app`: signaling, ``/ws``, the page, ``/metrics``, ``/healthz``, ``/stats``).
With the ``ray`` extra, the same app serves a Ray Serve cluster: the ingress
(:mod:`.ray_ingress`, :mod:`.ray_proxy`, :mod:`.ray_directory`) and the engine replicas
(:mod:`.ray_replica`), set up by :mod:`.ray_config` and scaled by :mod:`.ray_autoscale`.

Entry points: :func:`~.app.create_app` and :func:`~.slow_clients.start_runner` for the
server; :func:`~.local_pipeline.run_local_pipeline` for camera → engine → sinks.

It talks to the engine only through :class:`~.engine_protocol.EngineLike` and
:class:`~.engine_protocol.SessionLike`, and speaks the wire protocol through
:mod:`livediff.wire`; it does no denoising math and is imported by no lower layer.
"""
