"""Serve's autoscaling policy for the engine replicas: sessions per replica.

Each replica reports ``{"sessions": open sessions, "capacity": session slots}`` through
Serve's custom autoscaling metrics (``record_autoscaling_stats``, see
:mod:`livediff.streams.ray_replica`). Serve calls the policy on its controller every control
loop with those values aggregated over ``look_back_period_s``; the policy asks for
``ceil(total sessions / target_sessions_per_replica)`` replicas, and Serve applies
``min_replicas``/``max_replicas`` and the up/down delays (``[ray.autoscaling]``,
:mod:`livediff.streams.ray_config`). Before any replica has reported, it keeps the current
target.

Serve imports this module on its controller (by the path in ``POLICY_PATH``), so it imports
nothing heavy.
"""

from __future__ import annotations

import math
from typing import Any

SESSIONS_METRIC = "sessions"
CAPACITY_METRIC = "capacity"


class SessionsPerReplica:
    """``policy_function`` of ``[ray.autoscaling]``: a class, so Serve passes its kwargs once."""

    def __init__(self, target_sessions_per_replica: float) -> None:
        self.target = float(target_sessions_per_replica)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        sessions = (ctx.aggregated_metrics or {}).get(SESSIONS_METRIC)
        if not sessions:
            return ctx.target_num_replicas, {}
        total = float(sum(sessions.values()))
        return self.desired(total), {"sessions": total}

    def desired(self, total_sessions: float) -> int:
        """Replicas for ``total_sessions`` (before Serve's bounds): 0 when there are none."""
        return math.ceil(total_sessions / self.target - 1e-9) if total_sessions > 0 else 0
