"""The router's ViT through the inference backend the specialists use (:mod:`triageseg.segmenters.backends`).

At 512² the route stage (thumbnails, the ViT on 6 views, the size estimate) is about a
third of an image's end-to-end time once the specialist runs on ONNX Runtime or OpenVINO,
and the ViT is about 40% of that stage (a profile on 2 cores), so the ViT is exported the
same way as the specialists: one ONNX file per router weights, in the same cache (never in
the bundle), giving both outputs the pipeline reads from one pass: the logits (routing: modality, confidence) and the pooled pre-logits
features (the OOD score). :func:`triageseg.router.model.router_outputs` runs the wrapper
this module makes through its ``numpy_logits_and_features`` method, on numpy arrays; the
router package itself never imports a backend.

The router always runs fp32, whatever ``--precision`` says: its outputs are thresholded
(the confidence fallback, the OOD threshold), and those thresholds were calibrated on fp32
outputs; bf16 moves probabilities by up to a few hundredths, enough to flip a decision
near a threshold, for a network that costs a few percent of the specialist's compute.

Example:
    >>> model, config = load_router("bundle/router")                          # doctest: +SKIP
    >>> net = prepare_router(model, "bundle/router", choice=resolve("onnx"))   # doctest: +SKIP
    >>> logits, features = router_outputs(net, config, thumbs)                 # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os

import numpy as np

from triageseg.segmenters import backends as _backends

KIND = "router"  # the export cache's kind: logits and features, fixed thumbnail side, dynamic batch


def is_timm_vit(model) -> bool:
    """Whether ``model`` has timm's ``forward_features`` / ``forward_head`` / ``head`` (what is exported)."""
    return all(hasattr(model, a) for a in ("forward_features", "forward_head", "head"))


def prepare_router(model, run_dir: str | os.PathLike | None, *, choice: _backends.Choice,
                   threads: int | None = None):
    """The router module the pipeline runs for ``choice``: ``model`` itself, or a wrapper running its export.

    Args:
        model: the eager router (eval mode), from :func:`triageseg.router.model.load_router`.
        run_dir: its folder (``config.json`` + ``model.safetensors``): the export cache's key.
        choice: the resolved backend (:func:`~triageseg.segmenters.backends.resolve`); its
            precision is not used (the router runs fp32, see the module docstring).
        threads: intra-op threads of the exported runtime (default: the network's, ``threads.current_threads``).

    Returns:
        ``model`` (torch, or a router that is not a timm ViT), or a module whose
        ``numpy_logits_and_features(x)`` gives ``(logits N x C, features N x D)`` as numpy arrays.

    Raises:
        Exception: the export or its runtime failed for a backend asked for by name (``auto``
            falls back to ``model`` with one note instead).
    """
    import torch

    from triageseg.segmenters.threads import current_threads

    if choice.backend == "torch" or not is_timm_vit(model):
        return model
    fp32 = _backends.Choice(choice.backend, "fp32", auto=choice.auto)
    try:
        path = _backends.export_onnx(model, run_dir, kind=KIND, export=_export_router)
        run = _backends.runner(fp32, path, threads or current_threads(), outputs=2)
        head = getattr(model, "head", None)
        if run_dir is not None and isinstance(head, torch.nn.Linear):  # what load_served_router needs
            from triageseg.segmenters.served import write_meta

            write_meta(path, {"feature_dim": head.in_features, "classes": head.out_features})
    except Exception as err:  # noqa: BLE001 - `auto` must never be worse than torch
        if not choice.auto:
            raise
        _backends.note(f"backend auto: {choice.backend} could not run the router ({type(err).__name__}: {err}); "
                       "running it on torch")
        return model
    # a new module starts in training mode: mirror the eager one's, so inference never walks it to switch
    return _wrapper()(model, run, choice.backend).train(model.training)


def load_served_router(run_dir: str | os.PathLike, *, choice: _backends.Choice, device="cpu") -> tuple | None:
    """``(router module, config)`` served from the export cache without building the ViT; None if not.

    The router is a :class:`~triageseg.segmenters.served.ServedRouter` (no torch module: the
    pipeline runs it on numpy arrays, as it runs :func:`prepare_router`'s wrapper). None (no
    valid cached export of exactly this folder's files, the torch backend, a GPU, an export
    whose classes differ from the config's) means the caller loads with
    :func:`triageseg.router.model.load_router` and :func:`prepare_router`.
    """
    from pathlib import Path

    from triageseg.bundle import CONFIG
    from triageseg.router.model import RouterConfig
    from triageseg.segmenters import served

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        return None
    config = RouterConfig.from_json(run_dir / CONFIG)
    got = served.cached_runner(run_dir, choice, device, kind=KIND, outputs=2)
    if got is None:
        return None
    run, meta = got
    try:
        feature_dim, classes = int(meta["feature_dim"]), int(meta["classes"])
    except (KeyError, TypeError, ValueError):
        return None
    if classes != len(config.class_names):
        return None
    return served.ServedRouter(run, choice.backend, feature_dim, classes), config


def _export_router(model, path) -> None:
    """The ViT -> ONNX with two outputs, ``logits`` and ``features`` (the pre-logits); dynamic batch only.

    The thumbnail side is fixed by the position embedding (``patch_embed.img_size``).
    """
    import torch

    side = tuple(getattr(model.patch_embed, "img_size", (224, 224)))
    param = next(model.parameters())
    example = torch.zeros(1, 3, *side, device=param.device)
    torch.onnx.export(_Outputs(model).eval(), (example,), str(path), dynamo=False,
                      opset_version=_backends.ONNX_OPSET, input_names=["thumbs"],
                      output_names=["logits", "features"],
                      dynamic_axes={"thumbs": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})


def _Outputs(vit):  # noqa: N802 - reads as the class it makes
    return _wrapper().outputs(vit)


@functools.cache
def _wrapper():
    """The wrapper classes, made on first use (importing this module does not import torch)."""
    import torch

    class Outputs(torch.nn.Module):
        """What :func:`triageseg.router.model.router_outputs` computes, as one traceable forward."""

        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            pooled = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
            return self.vit.head(pooled), pooled

    class ExportedRouter(torch.nn.Module):
        """An exported router. The eager ViT stays a submodule (device, feature width); only the runner computes."""

        outputs = Outputs

        def __init__(self, eager, run, name: str):
            super().__init__()
            self.eager = eager
            self._run = run
            self.backend_name = name

        def numpy_logits_and_features(self, arr):
            """What ``router_outputs`` runs: normalised thumbnails as numpy, the same way a served router runs."""
            return self._run(arr)

        def forward(self, x):
            logits, _features = self._run(np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()))
            return torch.from_numpy(logits)

    return ExportedRouter
