"""The routed pipeline: image -> router -> specialist -> watershed -> labels.

- :mod:`~triageseg.pipeline.single`: one in-memory image (:class:`Pipeline`, :class:`Result`).
- :mod:`~triageseg.pipeline.batch`: many files on this machine (``routing.csv``, resume).
- :mod:`~triageseg.pipeline.probstore`, :mod:`~triageseg.pipeline.blocks`, :mod:`~triageseg.pipeline.stitch`,
  :mod:`~triageseg.pipeline.large`: huge images: probabilities once per pixel on disk, decoded block by
  block into the whole image's labels, streamed to disk.
- :mod:`~triageseg.pipeline.outputs`: overlays and ROI sets beside the label images.
- :mod:`~triageseg.pipeline.interactive`: one image as the web page and napari show it (every probability).
- :mod:`~triageseg.pipeline.distributed`: many files on a Ray cluster (one Ray Data pass;
  stages in :mod:`~triageseg.pipeline.ray_stages`, huge images as Ray tasks in
  :mod:`~triageseg.pipeline.ray_blocks`, paths and URIs in :mod:`~triageseg.pipeline.storage`).
  Imported on use, not here.
"""

from triageseg.pipeline.batch import ROUTING_COLUMNS, BatchReport, segment_files
from triageseg.pipeline.outputs import write_overlay, write_rois
from triageseg.pipeline.single import Pipeline, Result, load_pipeline

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
