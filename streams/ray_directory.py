"""What the Ray ingress knows about the engine replicas, and how it reads their answers.

Pure bookkeeping, no Ray and no I/O, so every rule here is tested without a cluster:

- :class:`ReplicaDirectory`: the replicas that announced themselves (each sends its
  :class:`ReplicaInfo` every ``[ray] heartbeat_s``). One that has not been heard from for
  ``replica_timeout_s``, or that the ingress found dead (:meth:`ReplicaDirectory.forget`), gets
  no new sessions until it announces itself again.
- :func:`placement_order`: the replicas a new session is offered to, most free session slots
  first, from each replica's own ``/healthz`` read just before (sessions, ``max_sessions``,
  status). A replica that still refuses (its slots went to a racing client) sends the
  session on to the next one.
- :func:`aggregate_health`, :func:`aggregate_stats`, :func:`merge_expositions`: the ingress's
  ``/healthz``, ``/stats`` and ``/metrics`` over every replica (metrics: each replica's
  samples with a ``replica`` label, one family per metric name: valid Prometheus text).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from livediff.exceptions import ProtocolError

REPLICA_LABEL = "replica"


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica as it announces itself: where its server listens and what it holds."""

    id: str
    url: str
    node_ip: str
    node_id: str
    pid: int
    host_addresses: tuple[str, ...]
    sessions: int
    capacity: int
    degrade_level: str
    healthy: bool

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.sessions) if self.healthy else 0

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> ReplicaInfo:
        try:
            return cls(
                id=str(report["id"]),
                url=str(report["url"]).rstrip("/"),
                node_ip=str(report["node_ip"]),
                node_id=str(report["node_id"]),
                pid=int(report["pid"]),
                host_addresses=tuple(str(a) for a in report["host_addresses"]),
                sessions=int(report["sessions"]),
                capacity=int(report["capacity"]),
                degrade_level=str(report["degrade_level"]),
                healthy=bool(report["healthy"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"a replica report lacks or garbles {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "node_ip": self.node_ip,
            "node_id": self.node_id,
            "pid": self.pid,
            "host_addresses": list(self.host_addresses),
            "sessions": self.sessions,
            "capacity": self.capacity,
            "free": self.free,
            "degrade_level": self.degrade_level,
            "healthy": self.healthy,
        }


class ReplicaDirectory:
    """The replicas heard from lately (see the module docstring). Event loop only."""

    def __init__(self, timeout_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._replicas: dict[str, tuple[ReplicaInfo, float]] = {}
        self._failed: dict[str, float] = {}  # replicas found dead, and when

    def report(self, info: ReplicaInfo) -> bool:
        """Record a heartbeat; ``True`` when the replica is new (or back).

        Heartbeats of a replica found dead are ignored for ``timeout_s`` (one may have been in
        flight when it died); one heard after that is alive after all.
        """
        now = self._clock()
        failed_at = self._failed.get(info.id)
        if failed_at is not None:
            if now - failed_at <= self.timeout_s:
                return False
            del self._failed[info.id]
        new = info.id not in self._replicas
        self._replicas[info.id] = (info, now)
        return new

    def forget(self, replica_id: str) -> ReplicaInfo | None:
        """The ingress found ``replica_id`` dead: no new sessions go to it."""
        entry = self._replicas.pop(replica_id, None)
        self._failed[replica_id] = self._clock()
        return None if entry is None else entry[0]

    def live(self) -> list[ReplicaInfo]:
        """Replicas heard from within ``timeout_s``, by id; stale ones are dropped."""
        now = self._clock()
        stale = [rid for rid, (_, seen) in self._replicas.items() if now - seen > self.timeout_s]
        for rid in stale:
            del self._replicas[rid]
        for rid in [rid for rid, at in self._failed.items() if now - at > self.timeout_s]:
            del self._failed[rid]
        return sorted((info for info, _ in self._replicas.values()), key=lambda i: i.id)

    def get(self, replica_id: str) -> ReplicaInfo | None:
        entry = self._replicas.get(replica_id)
        return None if entry is None else entry[0]


def free_slots(health: Mapping[str, Any] | None) -> int:
    """Session slots a replica's ``/healthz`` answer leaves free (0 if failed or unreadable)."""
    if not health or health.get("status") == "failed":
        return 0
    try:
        return max(0, int(health["max_sessions"]) - int(health["sessions"]))
    except (KeyError, TypeError, ValueError):
        return 0


def placement_order(
    replicas: Sequence[ReplicaInfo], health: Mapping[str, Mapping[str, Any] | None]
) -> list[ReplicaInfo]:
    """Replicas with a free slot, most free first (then fewer sessions, then id)."""
    ranked = [
        (free_slots(health.get(r.id)), int((health.get(r.id) or {}).get("sessions", 0)), r)
        for r in replicas
    ]
    ranked = [item for item in ranked if item[0] > 0]
    ranked.sort(key=lambda item: (-item[0], item[1], item[2].id))
    return [replica for _, _, replica in ranked]


def aggregate_health(
    replicas: Sequence[ReplicaInfo], health: Mapping[str, Mapping[str, Any] | None]
) -> tuple[dict[str, Any], int]:
    """The ingress's ``/healthz`` body and status code over every replica's own answer.

    ``failed`` (503) when no replica answers as working; ``degraded`` when one is degraded,
    failed or silent, or every slot is taken; else ``ok``.
    """
    rows: list[dict[str, Any]] = []
    for replica in replicas:
        answer = health.get(replica.id)
        row: dict[str, Any] = {"id": replica.id, "node_ip": replica.node_ip}
        row.update(answer if answer else {"status": "unreachable"})
        rows.append(row)
    working = [row for row in rows if row["status"] in ("ok", "degraded")]
    sessions = sum(int(row.get("sessions", 0)) for row in working)
    capacity = sum(int(row.get("max_sessions", 0)) for row in working)
    if not working:
        status = "failed"
    elif len(working) < len(rows) or any(row["status"] != "ok" for row in rows):
        status = "degraded"
    else:
        status = "degraded" if sessions >= capacity else "ok"
    body = {
        "status": status,
        "sessions": sessions,
        "max_sessions": capacity,
        "peers": sum(int(row.get("peers", 0)) for row in working),
        "websockets": sum(int(row.get("websockets", 0)) for row in working),
        "replicas": rows,
    }
    return body, 503 if status == "failed" else 200


def aggregate_stats(
    replicas: Sequence[ReplicaInfo], stats: Mapping[str, Mapping[str, Any] | None]
) -> dict[str, Any]:
    """The ingress's ``/stats``: each replica's own ``/stats``, and every peer with its replica."""
    rows: list[dict[str, Any]] = []
    peers: list[dict[str, Any]] = []
    websockets = 0
    for replica in replicas:
        answer = stats.get(replica.id)
        row: dict[str, Any] = {**replica.as_dict(), "reachable": answer is not None}
        if answer is not None:
            row["engine"] = answer.get("engine")
            row["websockets"] = int(answer.get("websockets", 0))
            websockets += row["websockets"]
            peers.extend({**peer, REPLICA_LABEL: replica.id} for peer in answer.get("peers", ()))
        rows.append(row)
    return {"replicas": rows, "peers": peers, "websockets": websockets}


class _Families:
    """A collector that yields already-built metric families (for :func:`generate_latest`)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(texts: Mapping[str, str], *, label: str = REPLICA_LABEL) -> bytes:
    """One Prometheus text exposition from several, each sample labelled ``label=<key>``.

    Families of the same name are merged (one ``# HELP``/``# TYPE`` each), as the text
    format requires.
    """
    merged: dict[str, Metric] = {}
    for key, text in texts.items():
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                target.add_sample(
                    sample.name,
                    {**sample.labels, label: key},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry)
