"""Typed keys of the state an app built by :func:`livediff.streams.app.create_app` carries."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from livediff.streams.engine_protocol import EngineLike
from livediff.streams.peer_registry import PeerRegistry
from livediff.streams.server_config import ServerConfig
from livediff.streams.transport_metrics import TransportMetrics

ENGINE = web.AppKey("engine", EngineLike)  # started and stopped by the app's owner
CONFIG = web.AppKey("config", ServerConfig)
PEERS = web.AppKey("peers", PeerRegistry)
WEBSOCKETS = web.AppKey("websockets", set)  # open web.WebSocketResponse objects
METRICS = web.AppKey("metrics", TransportMetrics)
DECODE_POOL = web.AppKey("decode_pool", ThreadPoolExecutor)  # websocket JPEG decoding
NDI_OUT = web.AppKey("ndi_out", str)  # each session's NDI source: "<this> <session>"
