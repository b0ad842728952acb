"""triageseg: nuclei instance segmentation routed by imaging modality.

A ViT classifier triages each image by modality and routes it to a modality-tuned
Unet; a shared watershed turns class probabilities into instance labels.

Example:
    >>> import triageseg
    >>> pipe = triageseg.load_pipeline("bundle/")          # doctest: +SKIP
    >>> result = pipe.segment(image)                        # doctest: +SKIP
    >>> result.labels, result.modality, result.confidence   # doctest: +SKIP
"""

from triageseg._version import __version__

__all__ = ["Pipeline", "load_pipeline", "__version__"]


def __getattr__(name: str):
    # Heavy imports (torch, timm, smp) only when the pipeline is asked for.
    if name in ("Pipeline", "load_pipeline"):
        from triageseg import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'triageseg' has no attribute {name!r}")
