"""Plots people look at: training curves beside ``history.csv``.

:func:`write_curves` draws any training history (router, segmenter, generalist, tune
trial) as one PNG of side-by-side panels, one line per column, with the best epoch
marked. It takes the rows as they are written to ``history.csv`` (one mapping per epoch),
so every training loop plots the same way. Matplotlib is imported when a plot is drawn,
with the non-interactive Agg backend (no screen needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from triageseg.datasets.atomic import atomic_path

CURVES_PNG = "curves.png"

# A panel: its title and the (column, legend label) pairs drawn in it.
Panel = tuple[str, Sequence[tuple[str, str]]]


def _number(value: Any) -> float:
    """A history cell as a float (NaN for missing or empty cells)."""
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def write_curves(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    panels: Sequence[Panel],
    *,
    x: str = "epoch",
    best: float | None = None,
    title: str | None = None,
) -> Path | None:
    """Draw ``rows`` (one mapping per epoch) as side-by-side ``panels`` into the PNG ``path``.

    Args:
        path: the PNG to write (atomically: a temporary file, then a rename).
        rows: the history, e.g. the rows of ``history.csv``; missing or empty cells are gaps.
        panels: ``(title, [(column, label), ...])`` per panel; columns absent from every row
            are left out, and a panel with none of its columns is not drawn.
        x: the column on the horizontal axis.
        best: the ``x`` of the best epoch, marked by a dashed vertical line in every panel.
        title: a title over the whole figure.

    Returns:
        The path written, or None when there is nothing to plot (no rows or no columns).
    """
    xs = [_number(r.get(x)) for r in rows]
    drawn = []
    for name, series in panels:
        lines = [(col, label, [_number(r.get(col)) for r in rows]) for col, label in series]
        lines = [line for line in lines if any(math.isfinite(v) for v in line[2])]
        if lines:
            drawn.append((name, lines))
    if not rows or not drawn:
        return None

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], drawn, strict=True):
        for _col, label, ys in lines:
            marker = "o" if len(xs) <= 30 else None
            ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1.5, label=label)
        if best is not None and math.isfinite(_number(best)):
            ax.axvline(float(best), color="0.4", linestyle="--", linewidth=1, label=f"best {x} {best:g}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
