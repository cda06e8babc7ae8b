"""The server's small parts, without a network: config, control parsing, ICE restriction, marker, JPEG."""

from __future__ import annotations

import re

import aioice.ice
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from livediff.cmd_serve import add_parser, server_config_from_args
from livediff.exceptions import EmptyFrameError, InvalidFrameError, ParameterError
from livediff.ice import HostAddressRestriction, rtc_configuration
from livediff.streams.control_messages import params_from_query, parse_control, session_params
from livediff.streams.flow_stats import FlowStats
from livediff.streams.frame_marker import MARKER_MODULUS, read_marker, stamp_marker
from livediff.streams.server_config import IceServer, ServerConfig
from livediff.streams.transport_metrics import TransportMetrics
from livediff.streams.ws_protocol import close_reason
from livediff.wire import decode_jpeg, encode_jpeg


def test_server_table_and_flags_make_a_checked_config() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "serve",
            "--port",
            "0",
            "--host-address",
            "127.0.0.1",
            "--ice-server",
            "stun:stun.example.org",
        ]
    )
    table = {
        "host": "0.0.0.0",
        "port": 9000,
        "max_connections": 3,
        "ice_servers": [{"urls": "turn:t.example.org", "username": "u", "credential": "p"}],
    }
    config = server_config_from_args(args, {"server": table})
    assert (config.host, config.port, config.max_connections) == (
        "0.0.0.0",
        0,
        3,
    )  # flags win over the file
    assert config.host_addresses == ("127.0.0.1",)
    assert config.ice_servers == (IceServer(urls=("stun:stun.example.org",)),)
    assert (
        ServerConfig().ice_servers == () and rtc_configuration().iceServers == []
    )  # no public STUN by default
    servers = rtc_configuration(ServerConfig.from_table(table).ice_servers).iceServers
    assert [(s.urls, s.username, s.credential) for s in servers] == [
        (["turn:t.example.org"], "u", "p")
    ]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"colour": 1}, "unknown key(s) in [server]: colour"),
        ({"port": 70000}, "port=70000 is out of range"),
        ({"host_addresses": ["not-an-ip"]}, "is not an IP address"),
        ({"host_addresses": "127.0.0.1"}, "host_addresses must be a list"),
        ({"ice_servers": [{"urls": ["http://x"]}]}, "starting with stun:"),
        ({"stats_interval_s": 0}, "stats_interval_s=0 is out of range"),
        ({"ws_max_message_bytes": 10}, "ws_max_message_bytes=10 is out of range"),
    ],
)
def test_bad_server_settings_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(ParameterError, match=re.escape(message)):
        ServerConfig.from_table(table)


def test_control_messages_and_query_parameters() -> None:
    request = parse_control('{"prompt": [["a fox", 0.7], ["a cat", 0.3]], "seed": 3, "id": "r1"}')
    assert request.id == "r1"
    assert session_params(request.changes) == {  # JSON arrays become the settings' tuples
        "prompt": (("a fox", 0.7), ("a cat", 0.3)),
        "seed": 3,
    }
    assert params_from_query(
        {"seed": "4", "strength": "0.25", "prompt": "a b", "t_index_list": "20,30"}
    ) == {"seed": 4, "strength": 0.25, "prompt": "a b", "t_index_list": (20, 30)}
    for text, message in [
        ("[]", "JSON object"),
        ('{"id": true, "seed": 1}', "id must be"),
        ("x" * 70_000, "too large"),
    ]:
        with pytest.raises(ParameterError, match=message):
            parse_control(text)
    with pytest.raises(ParameterError, match="unknown parameter"):
        session_params({"prompt": "x", "steps_per_frame": 2})


def test_host_address_restriction_offers_only_its_addresses_and_restores_aioice() -> None:
    original = aioice.ice.get_host_addresses
    with HostAddressRestriction(["127.0.0.1", "::1"]) as restriction:
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
        with pytest.raises(RuntimeError, match="do not stack"):
            HostAddressRestriction(["10.0.0.1"]).install()
        assert restriction.active
    assert aioice.ice.get_host_addresses is original
    restriction.restore()  # idempotent
    assert aioice.ice.get_host_addresses is original


def test_frame_marker_survives_scaling_and_refuses_a_blurred_one() -> None:
    image = np.full((480, 640, 3), 90, np.uint8)
    for value in (0, 1, 513, MARKER_MODULUS - 1, MARKER_MODULUS + 5):
        stamp_marker(image, value)
        small = image[::4, ::5]  # 120×128, roughly what a model answers with
        assert read_marker(image) == read_marker(small) == value % MARKER_MODULUS
    assert read_marker(np.full((128, 128, 3), 128, np.uint8)) is None
    half = image.copy()
    half[: 480 // 4] = (half[: 480 // 4].astype(np.int16) // 4 + 96).astype(
        np.uint8
    )  # low contrast
    assert read_marker(half) is None


def test_jpeg_codec_round_trip_and_refusals() -> None:
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:] = (250, 120, 10)
    back = decode_jpeg(encode_jpeg(image, quality=95))
    assert back.shape == (48, 64, 3) and back.flags.writeable
    assert np.abs(back.astype(int) - image).mean() < 3
    with pytest.raises(EmptyFrameError):
        decode_jpeg(b"")
    with pytest.raises(InvalidFrameError, match="too large"):
        decode_jpeg(encode_jpeg(np.zeros((8, 600, 3), np.uint8)), max_side=512)


def test_flow_stats_measure_server_latency_per_pts() -> None:
    flow = FlowStats()
    flow.frame_in(1, now=10.0)
    flow.frame_in(2, now=10.1)
    assert flow.frame_out(2, now=10.15) == pytest.approx(50.0)
    assert flow.frame_out(99, now=10.2) is None  # not an input of this flow
    snapshot = flow.snapshot(now=10.2)
    assert (snapshot["frames_in"], snapshot["frames_out"]) == (2, 2)
    assert snapshot["server_latency_ms_p50"] == pytest.approx(50.0)


def test_flow_stats_are_the_one_path_for_a_transports_frame_counts() -> None:
    registry = CollectorRegistry()
    metrics = TransportMetrics(registry)
    flow = FlowStats(transport="websocket", metrics=metrics)
    other = FlowStats(transport="webrtc", metrics=metrics)
    flow.frame_in(1, now=10.0)
    flow.frame_in(2, now=10.1)
    flow.frame_out(2, now=10.15)
    flow.frame_dropped()
    other.frame_in(1, now=10.0)

    def frames(transport: str, direction: str) -> float | None:
        labels = {"transport": transport, "direction": direction}
        return registry.get_sample_value("livediff_transport_frames_total", labels)

    snapshot = flow.snapshot(now=10.2)
    assert frames("websocket", "in") == snapshot["frames_in"] == 2
    assert frames("websocket", "out") == snapshot["frames_out"] == 1
    assert frames("websocket", "dropped") == 1
    assert (frames("webrtc", "in"), frames("webrtc", "out")) == (1, 0)
    latency = registry.get_sample_value(
        "livediff_transport_server_latency_seconds_sum", {"transport": "websocket"}
    )
    assert latency == pytest.approx(0.05)
    assert FlowStats().frame_out(1, now=1.0) is None  # unbound: the connection's figures only


def test_close_reasons_fit_a_close_frame() -> None:
    assert close_reason("short") == b"short"
    assert len(close_reason("word " * 100)) <= 123
