"""How long this process has been running, for the start-up account ``livediff serve`` prints."""

from __future__ import annotations

import os


def seconds_since_start() -> float | None:
    """Wall seconds since the kernel started this process (from ``/proc``, 10 ms steps), so that
    the interpreter's start and the imports count too; ``None`` where there is no ``/proc``."""
    try:
        with open("/proc/self/stat") as stat_file:
            stat = stat_file.read()
        with open("/proc/uptime") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
        ticks_per_s = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    # the fields after the command name (in parentheses, which may hold spaces) start at the
    # 3rd; the 22nd is the start time in clock ticks after boot
    fields = stat[stat.rindex(")") + 2 :].split()
    return max(0.0, uptime - int(fields[22 - 3]) / ticks_per_s)
