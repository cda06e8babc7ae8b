"""PNG plots of single-stream records (``single``, ``peers`` and ``stages`` suites).

``fps_latency``: one bar per configuration, frames per second on the left and milliseconds
per frame (median bar, p99 tick) on the right. ``stages``: milliseconds per stage, stacked,
one bar per configuration. Both read the JSON-lines records the suites write, so a plot can
be drawn again later from a results file (``--replot``) on a machine without a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from livediff.exceptions import RecordError

DEFAULT_RECIPE = {"sdpa", "qkv", "cl", "compile:default", "cudnn-bench"}


def config_label(record: dict[str, Any]) -> str:
    """A short name for a record's configuration: system, variant, model, size, steps …"""
    parts = [record["system"]]
    variant = record.get("variant") or record.get("backend")
    if variant:
        parts.append(str(variant))
    extras = [
        t for t in str(record.get("recipe") or "").split("+") if t and t not in DEFAULT_RECIPE
    ]
    parts += extras
    parts.append(f"{record['model']} {record['width']}²")
    steps = int(record["steps"])
    parts.append(f"{steps} step" + ("s" if steps > 1 else ""))
    if record.get("rcfg", "none") != "none":
        parts.append(f"rcfg {record['rcfg']}")
    if record.get("mode", "img2img") != "img2img":
        parts.append(str(record["mode"]))
    return ", ".join(parts)


def _figure(rows: int, columns: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(2.8, 1.4 + 0.45 * rows)
    return plt, plt.subplots(1, columns, figsize=(6 * columns, height), squeeze=False)


def save_figure(plt: Any, figure: Any, path: Path) -> None:
    """Lay out, write ``path`` (its folder made) and close the figure."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def fps_latency(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Frames per second and ms per frame (median, p99) for each record."""
    labels = [config_label(r) for r in records]
    plt, (figure, axes) = _figure(len(records), 2)
    rate, latency = axes[0]
    positions = list(range(len(records)))
    rate.barh(positions, [r["fps"] for r in records], color="tab:blue")
    rate.set_yticks(positions, labels, fontsize="small")
    rate.invert_yaxis()
    rate.set(xlabel="frames per second", title=f"{records[0]['device']}")
    latency.barh(positions, [r["ms_median"] for r in records], color="tab:orange", label="median")
    latency.scatter([r["ms_p99"] for r in records], positions, color="black", marker="|", s=200)
    latency.set_yticks(positions, [""] * len(records))
    latency.invert_yaxis()
    latency.set(xlabel="ms per frame (bar: median, tick: p99)")
    for axis in (rate, latency):
        axis.grid(True, axis="x", alpha=0.3)
    save_figure(plt, figure, path)


def stages(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Milliseconds per stage, stacked, for each record with ``stages_ms_median``."""
    rows = [r for r in records if r.get("stages_ms_median")]
    if not rows:
        raise RecordError("no record has stages_ms_median", field="stages_ms_median")
    names: list[str] = []
    for r in rows:
        names += [n for n in r["stages_ms_median"] if n not in names]
    plt, (figure, axes) = _figure(len(rows), 1)
    axis = axes[0][0]
    positions = list(range(len(rows)))
    left = [0.0] * len(rows)
    for name in names:
        widths = [float(r["stages_ms_median"].get(name, 0.0)) for r in rows]
        axis.barh(positions, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axis.set_yticks(positions, [config_label(r) for r in rows], fontsize="small")
    axis.invert_yaxis()
    axis.set(xlabel="ms per frame, by stage (medians)", title=f"{rows[0]['device']}")
    axis.legend(
        fontsize="small", ncol=min(len(names), 4), loc="upper center", bbox_to_anchor=(0.5, -0.35)
    )
    axis.grid(True, axis="x", alpha=0.3)
    save_figure(plt, figure, path)


def draw(records: Sequence[dict[str, Any]], path: Path) -> None:
    """The stage plot for ``stages`` records, else frames per second and latency."""
    if any(r.get("stages_ms_median") for r in records):
        stages(records, path)
    else:
        fps_latency(records, path)


def draw_or_explain(
    records: Sequence[dict[str, Any]],
    path: Path | None,
    painter: Callable[[Sequence[dict[str, Any]], Path], None] = draw,
) -> None:
    """Draw ``records`` to ``path`` (if given); without matplotlib say how to draw them later."""
    if path is None or not records:
        return
    try:
        painter(records, path)
    except ImportError as exc:
        print(f"no plot: {exc}; draw it later with --replot FILE --plot {path}", file=sys.stderr)


def replot(
    source: Path,
    path: Path | None,
    painter: Callable[[Sequence[dict[str, Any]], Path], None] = draw,
) -> int:
    """``--replot``: draw ``path`` from the records in ``source``."""
    from livediff.bench.records import read_records

    records = read_records(source)
    if not records:
        raise SystemExit(f"{source}: no benchmark records to plot")
    painter(records, path or source.with_suffix(".png"))
    return 0
