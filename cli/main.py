"""Entry point of the ``triageseg`` console script."""

from __future__ import annotations

# Importing the command modules registers their commands on the groups.
from triageseg.cli import (  # noqa: F401
    bioimageio_cmds,
    cluster_cmd,
    data_cmds,
    demo_cmd,
    evaluate_cmd,
    finetune_cmd,
    segment_cmds,
    serve_cmd,
    train_all_cmd,
    train_router_cmd,
    train_segmenter_cmd,
    tune_cmd,
)
from triageseg.cli.groups import cli
from triageseg.segmenters.threads import set_memory_advice, set_thread_waiting


def main() -> None:
    """Run the command line."""
    # Before torch is imported: idle OpenMP threads spin only briefly, then sleep.
    set_thread_waiting()
    set_memory_advice()  # no huge-page advice on NumPy's large arrays (compaction stalls), unless the user chose
    cli(prog_name="triageseg")


if __name__ == "__main__":
    main()
