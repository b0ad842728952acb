"""The router's training history: ``history.json``, ``history.csv`` and ``curves.png``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from triageseg.datasets.atomic import write_json_atomic, write_text_atomic

CURVES = "curves.png"
PANELS = (
    ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
    ("accuracy", [("train_accuracy", "train"), ("val_accuracy", "validation")]),
)


def write_history(run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write ``history.json`` (epochs + summary) and ``history.csv`` (one row per epoch), atomically each."""
    write_json_atomic(run_dir / "history.json", {"epochs": history, "summary": summary})
    cols = ["epoch", "steps", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds",
            "val_confusion"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in history:
        writer.writerow([json.dumps(row[c]) if c == "val_confusion" else row[c] for c in cols])
    write_text_atomic(run_dir / "history.csv", buf.getvalue())


def write_router_curves(run_dir: Path, history: list[dict[str, Any]], best_epoch: int | None) -> Path | None:
    """``curves.png`` beside ``history.csv``: train and validation loss and accuracy per epoch, best epoch marked."""
    from triageseg.postprocess.plots import write_curves

    return write_curves(Path(run_dir) / CURVES, history, PANELS, x="epoch", best=best_epoch,
                        title=f"router: best epoch {best_epoch}" if best_epoch else "router")


__all__ = ["CURVES", "PANELS", "write_history", "write_router_curves"]
