"""The rules of ``livediff serve --ray`` that need no cluster: settings, placement, aggregation,
the autoscaling policy, and that the product runs without Ray installed.

(The real two-node cluster is ``test_ray_serve.py``.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.streams_testing import REPO
from livediff.cli import build_parser, main
from livediff.cmd_serve_ray import replica_plan, settings
from livediff.exceptions import ParameterError, ProtocolError
from livediff.streams.ray_autoscale import SessionsPerReplica
from livediff.streams.ray_config import (
    POLICY_PATH,
    AutoscalingSettings,
    RayConfig,
    node_host_addresses,
)
from livediff.streams.ray_directory import (
    ReplicaDirectory,
    ReplicaInfo,
    aggregate_health,
    aggregate_stats,
    merge_expositions,
    placement_order,
)


def info(rid: str, sessions: int = 0, capacity: int = 4, **changes: Any) -> ReplicaInfo:
    report = {
        "id": rid,
        "url": f"http://10.0.0.{len(rid)}:9000/",
        "node_ip": "10.0.0.1",
        "node_id": "n-" + rid,
        "pid": 100,
        "host_addresses": ["10.0.0.1"],
        "sessions": sessions,
        "capacity": capacity,
        "degrade_level": "normal",
        "healthy": True,
        **changes,
    }
    return ReplicaInfo.from_report(report)


def health(sessions: int, max_sessions: int = 4, status: str = "ok") -> dict[str, Any]:
    return {"status": status, "sessions": sessions, "max_sessions": max_sessions}


# ---------------------------------------------------------------- settings
def test_ray_table_defaults_and_checks() -> None:
    config = RayConfig.from_table({})
    assert config.replicas is None and config.autoscaling is None
    assert config.proxy_location.value == "HeadOnly"
    with pytest.raises(ParameterError, match=r"unknown key\(s\) in \[ray\]: replica;"):
        RayConfig.from_table({"replica": 2})
    with pytest.raises(ParameterError, match="heartbeat") as refused:
        RayConfig.from_table({"heartbeat_s": 2.0, "replica_timeout_s": 3.0})
    assert refused.value.field == "replica_timeout_s"
    with pytest.raises(ParameterError, match="proxy_location"):
        RayConfig.from_table({"proxy_location": "Everywhere"})
    with pytest.raises(ParameterError, match="exclude each other"):
        RayConfig.from_table({"replicas": 2, "autoscaling": {"max_replicas": 4}})
    with pytest.raises(ParameterError, match="min_replicas"):
        AutoscalingSettings(min_replicas=0)
    with pytest.raises(ParameterError, match="max_replicas"):
        AutoscalingSettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ParameterError, match="metrics interval"):
        AutoscalingSettings(look_back_period_s=5)


def test_replica_options_are_fixed_or_autoscaled_by_sessions() -> None:
    fixed = RayConfig.from_table({"drain_timeout_s": 5.0, "max_replicas_per_node": 1})
    options = fixed.replica_options(replicas=3, num_gpus=1.0, shutdown_timeout_s=10.0)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert options["max_replicas_per_node"] == 1
    assert options["graceful_shutdown_timeout_s"] > 5.0 + 10.0  # the drain fits in it
    scaled = RayConfig.from_table(
        {"autoscaling": {"min_replicas": 2, "max_replicas": 6, "target_sessions_per_replica": 4}}
    )
    options = scaled.replica_options(replicas=2, num_gpus=1.0, shutdown_timeout_s=10.0)
    assert "num_replicas" not in options
    autoscaling = options["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (2, 6)
    assert autoscaling["policy"] == {
        "policy_function": POLICY_PATH,
        "policy_kwargs": {"target_sessions_per_replica": 4},
    }
    # --replicas on the command line replaces [ray.autoscaling]
    assert (
        RayConfig.from_table({"autoscaling": {"max_replicas": 4}}, replicas=3).replica_options(
            replicas=3, num_gpus=0, shutdown_timeout_s=1
        )["num_replicas"]
        == 3
    )


def test_replicas_default_to_one_per_gpu_and_cpu_clusters_must_say_how_many() -> None:
    assert replica_plan(RayConfig(), {"CPU": 64, "GPU": 8}) == (8, 1.0)
    assert replica_plan(RayConfig(num_gpus=2), {"GPU": 8}) == (4, 2)
    assert replica_plan(RayConfig(replicas=3), {"CPU": 4}) == (3, 0.0)
    scaled = RayConfig(autoscaling=AutoscalingSettings(min_replicas=2, max_replicas=5))
    assert replica_plan(scaled, {"GPU": 8}) == (2, 1.0)
    with pytest.raises(ParameterError, match="no GPU: --replicas N"):
        replica_plan(RayConfig(), {"CPU": 16})


def test_host_addresses_are_per_node() -> None:
    assert node_host_addresses("10.1.2.3", {}) == ("10.1.2.3",)
    env = {"LIVEDIFF_HOST_ADDRESS": "203.0.113.5, 10.1.2.3"}
    assert node_host_addresses("10.1.2.3", env) == ("203.0.113.5", "10.1.2.3")
    args = build_parser().parse_args(
        ["serve", "--ray", "--host-address", "192.168.1.2", "--replicas", "2"]
    )
    with pytest.raises(ParameterError, match="LIVEDIFF_HOST_ADDRESS"):
        settings(args, {})


def test_replicas_without_ray_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--replicas", "2", "--model", "tiny", "--weights", "random"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err


# ---------------------------------------------------------------- placement
def test_directory_forgets_silent_and_dead_replicas() -> None:
    now = [0.0]
    directory = ReplicaDirectory(timeout_s=3.0, clock=lambda: now[0])
    assert directory.report(info("a")) and directory.report(info("b"))
    assert not directory.report(info("a", sessions=1))  # known: an update
    assert [r.id for r in directory.live()] == ["a", "b"]
    now[0] = 2.0
    directory.report(info("a"))
    now[0] = 4.0  # b silent for 4 s
    assert [r.id for r in directory.live()] == ["a"]
    directory.forget("a")
    assert directory.live() == []
    now[0] = 5.0
    assert not directory.report(info("a"))  # a heartbeat that was in flight: ignored
    assert directory.live() == []
    now[0] = 8.0
    assert directory.report(info("a"))  # heard long after: alive after all
    with pytest.raises(ProtocolError, match="lacks or garbles 'node_ip'"):
        ReplicaInfo.from_report({"id": "x", "url": "u"})


def test_sessions_go_where_the_most_slots_are_free() -> None:
    replicas = [info("a"), info("b"), info("c"), info("d")]
    answers = {
        "a": health(3),  # 1 free
        "b": health(1),  # 3 free
        "c": health(4),  # full
        "d": health(0, status="failed"),
    }
    assert [r.id for r in placement_order(replicas, answers)] == ["b", "a"]
    assert [r.id for r in placement_order(replicas, {**answers, "b": None})] == ["a"]
    tie = {"a": health(1, max_sessions=3), "b": health(2, max_sessions=4)}
    assert [r.id for r in placement_order(replicas[:2], tie)] == ["a", "b"]  # fewer sessions


def test_health_and_stats_cover_every_replica() -> None:
    replicas = [info("a"), info("b")]
    body, status = aggregate_health(replicas, {"a": health(1), "b": health(2)})
    assert (status, body["status"], body["sessions"], body["max_sessions"]) == (200, "ok", 3, 8)
    body, status = aggregate_health(replicas, {"a": health(4), "b": health(4)})
    assert body["status"] == "degraded"  # every slot taken
    body, status = aggregate_health(replicas, {"a": health(0), "b": None})
    assert body["status"] == "degraded" and body["replicas"][1]["status"] == "unreachable"
    body, status = aggregate_health(replicas, {"a": None, "b": health(0, status="failed")})
    assert (status, body["status"]) == (503, "failed")
    assert aggregate_health([], {})[1] == 503
    stats = aggregate_stats(
        replicas,
        {"a": {"peers": [{"session": "s1"}], "websockets": 2, "engine": {}}, "b": None},
    )
    assert stats["peers"] == [{"session": "s1", "replica": "a"}] and stats["websockets"] == 2
    assert [row["reachable"] for row in stats["replicas"]] == [True, False]


def test_metrics_of_all_replicas_are_one_valid_exposition() -> None:
    def text(value: int) -> str:
        return textwrap.dedent(f"""\
            # HELP livediff_sessions Open sessions
            # TYPE livediff_sessions gauge
            livediff_sessions {value}.0
            # HELP livediff_frames_total Frames
            # TYPE livediff_frames_total counter
            livediff_frames_total{{direction="in"}} {10 * value}.0
            """)

    merged = merge_expositions({"a": text(1), "b": text(2)}).decode()
    assert merged.count("# TYPE livediff_sessions gauge") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    sessions = {s.labels["replica"]: s.value for s in families["livediff_sessions"].samples}
    assert sessions == {"a": 1.0, "b": 2.0}
    frames = families["livediff_frames"].samples
    assert {(s.labels["replica"], s.labels["direction"], s.value) for s in frames} == {
        ("a", "in", 10.0),
        ("b", "in", 20.0),
    }


# ---------------------------------------------------------------- autoscaling
def test_the_policy_asks_for_sessions_over_the_target() -> None:
    policy = SessionsPerReplica(target_sessions_per_replica=6)
    assert [policy.desired(n) for n in (0, 1, 6, 7, 12, 13)] == [0, 1, 1, 2, 2, 3]
    ctx = SimpleNamespace(
        aggregated_metrics={"sessions": {"r1": 5.0, "r2": 4.0}}, target_num_replicas=4
    )
    assert policy(ctx) == (2, {"sessions": 9.0})
    quiet = SimpleNamespace(aggregated_metrics={}, target_num_replicas=3)
    assert policy(quiet) == (3, {})  # nothing reported yet: keep the target


# ---------------------------------------------------------------- without Ray
def test_the_product_runs_without_ray() -> None:
    code = textwrap.dedent("""\
        import sys
        for name in ("ray", "starlette", "fastapi"):
            sys.modules[name] = None  # not installed
        import livediff.cli, livediff.cmd_serve, livediff.streams.app
        import livediff.streams.ray_config, livediff.streams.ray_directory
        import livediff.streams.ray_autoscale, livediff.bench.ray_ingress
        livediff.cli.build_parser().parse_args(["serve", "--ray", "--replicas", "2"])
        code = livediff.cli.main(["serve", "--ray", "--replicas", "1", "--model", "tiny"])
        print("exit", code)
        """)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exit 2" in result.stdout
    assert "--ray needs Ray Serve" in result.stderr and "livediff[ray]" in result.stderr


# ---------------------------------------------------------------- the KubeRay example
def test_the_kuberay_manifest_deploys_this_application() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with Ray (the ray extra)")
    import importlib

    from livediff.cli import build_parser

    manifest = yaml.safe_load((REPO / "deploy" / "kuberay-rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = build_parser().parse_args(["serve", *app["args"]["argv"]])
    assert args.replicas == 2 and args.model == "sd-turbo"
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    env = {e["name"] for e in workers["containers"][0]["env"]}
    assert {"LIVEDIFF_TOKEN", "LIVEDIFF_HOST_ADDRESS"} <= env
