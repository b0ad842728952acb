"""The routed pipeline: image -> router -> specialist -> watershed -> labels, in three folders by data flow.

- :mod:`~triageseg.pipeline.local`: the in-memory and batch path. :mod:`~.local.single` segments
  one in-memory image (:class:`Pipeline`, :class:`Result`; the size decision in :mod:`~.local.sizing`,
  the exported router in :mod:`~.local.router_backend`); :mod:`~.local.batch` many files on this
  machine (``routing.csv`` rows in :mod:`~.local.records`, resume, :mod:`~.local.outputs` and
  :mod:`~.local.remake` for the files beside the labels); :mod:`~.local.interactive` one image as
  the web page and napari show it.
- :mod:`~triageseg.pipeline.blockwise`: the block path for huge images. Normalisation statistics
  (:mod:`~.blockwise.normalise`), probabilities once per pixel into a store (:mod:`~.blockwise.probstore`,
  journalled by :mod:`~.blockwise.journal`), decoded block by block (:mod:`~.blockwise.blocks`,
  :mod:`~.blockwise.stitch`) into the whole image's labels, streamed to disk (:mod:`~.blockwise.large`),
  and GeoJSON (:mod:`~.blockwise.geojson`).
- :mod:`~triageseg.pipeline.cluster`: the Ray path. Many files in one Ray Data pass
  (:mod:`~.cluster.distributed`, stages in :mod:`~.cluster.ray_stages`), huge images as Ray tasks
  (:mod:`~.cluster.ray_blocks`, scheduled across slides by :mod:`~.cluster.ray_slides`), paths and
  URIs on shared storage (:mod:`~.cluster.storage`). Imported on use, not here.
"""

from triageseg.pipeline.local.batch import ROUTING_COLUMNS, BatchReport, segment_files
from triageseg.pipeline.local.outputs import write_overlay, write_rois
from triageseg.pipeline.local.single import Pipeline, Result, load_pipeline

__all__ = [
    "ROUTING_COLUMNS",
    "BatchReport",
    "Pipeline",
    "Result",
    "load_pipeline",
    "segment_files",
    "write_overlay",
    "write_rois",
]
