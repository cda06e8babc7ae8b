"""What users run against ``livediff serve``: the browser page (``web/``), a Python websocket
client (:mod:`.ws_client`) and a Python WebRTC client (:mod:`.webrtc_client`).

The Python clients speak the wire protocol only: they import :mod:`livediff.wire`,
:mod:`livediff.exceptions`, :mod:`livediff.ice` and their own :mod:`.media` (PyAV sources and
writers), never ``streams``, ``engine``, ``models`` or ``kernels``, so they work against any
server that speaks the protocol (``tests/test_boundaries.py`` checks it).

Entry points: :class:`.ws_client.WsClient`, :class:`.webrtc_client.WebRTCClient`, and
``python -m livediff.clients.ws_client`` / ``python -m livediff.clients.webrtc_client``.
"""
