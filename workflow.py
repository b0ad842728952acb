"""Whole-system workflows: train a bundle, score it on a split, and the demo.

These compose ``router/``, ``segmenters/`` and ``postprocess/`` the way
``pipeline.py`` does for inference; the CLI commands ``train all``, ``evaluate
--bundle`` and ``demo`` are thin wrappers around them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triageseg import bundle as _bundle
from triageseg.datasets.atomic import write_json_atomic

Log = Callable[[str], None]

SPECIALIST_SPLITS = ("equal", "images")


@dataclass(frozen=True)
class Budget:
    """How much training ``train all`` and the demo spend. ``scale`` multiplies every step count.

    Routed and generalist models get the same number of optimiser steps, from a shared start:

    1. a *base* model trains on all modalities for ``base_fraction`` of the total;
    2. the generalist continues from the base on all modalities for the rest, sampling
       images as they come (the majority modality dominates its batches);
    3. the specialists each continue from the base on their own modality, the rest of the
       total split between them: ``specialist_split="equal"`` (the default) gives every
       modality the same number of steps, ``"images"`` splits in proportion to the training
       images (then each modality gets as many steps of its own images as inside the
       generalist's mix).

    Continuations are fine-tuning: a lower learning rate, a short warm-up and, with
    ``freeze_bn``, the base's BatchNorm statistics kept fixed. Both systems use the same
    recipe, so what differs is only where the last steps go: a specialist spends them all
    on its modality, the generalist on the data's mix. The routed system spends the same
    compute as the generalist and chooses how to share it between the modalities.
    """

    scale: float = 1.0  # multiplier on the step count (and the router's time)
    total_steps: int = 480  # optimiser steps of the generalist = base + all specialists, at scale 1
    base_fraction: float = 0.75  # share of total_steps spent on the shared base model
    finetune_lr_scale: float = 0.3  # continuations from the base run at this fraction of lr
    finetune_warmup_steps: int = 16  # and warm up over this many steps (at most half the run): fresh AdamW
    # moments with frozen BatchNorm statistics make a shorter warm-up spike the loss on one modality's batches
    freeze_bn: bool = True  # continuations keep the base's BatchNorm statistics (one modality's batches shift them)
    specialist_split: str = "equal"  # "equal": same steps per specialist; "images": in proportion to training images
    steps_per_epoch: int = 40  # steps between validations (shorter runs are split into at least 2 epochs)
    batch_size: int = 4  # crops per step (small batches, more steps: better on CPU budgets)
    crop_size: int = 128  # crop side in pixels
    lr: float = 3e-3  # peak AdamW learning rate
    aug_strength: float = 0.5  # augmentation magnitude (short runs learn faster with milder augmentation)
    max_val_images: int = 16  # validation images per epoch and for tuning the watershed (balanced over modalities)
    router_epochs: int = 30  # router epochs (its learning rate follows them: the same router on every machine)
    # A safety net at scale 1: 30 epochs took 45-50 s on 2 quiet cores and 55-60 s on loaded ones.
    router_seconds: float = 90.0
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16)  # Unet decoder widths (smaller = faster on CPU)

    def schedule(self, steps: int) -> tuple[int, int]:
        """(epochs, steps per epoch) with exactly ``steps`` (>= 2) steps, epochs near steps / steps_per_epoch."""
        steps = max(2, int(steps))
        target = max(2, round(steps / self.steps_per_epoch))
        epochs = min((d for d in range(2, steps + 1) if steps % d == 0), key=lambda d: (abs(d - target), d))
        return epochs, steps // epochs

    def split(self, counts: dict[str, int]) -> tuple[int, int, dict[str, int]]:
        """(base steps, generalist steps, steps per specialist) at this scale.

        The specialists' steps add up to the generalist's (largest remainders, at least 2 each),
        shared equally or by training images (``specialist_split``).
        """
        if self.specialist_split not in SPECIALIST_SPLITS:
            raise ValueError(f"specialist_split must be one of {SPECIALIST_SPLITS}, got {self.specialist_split!r}")
        total = max(4, int(round(self.total_steps * self.scale)))
        base = int(round(total * self.base_fraction))
        rest = total - base
        weights = {m: (1 if self.specialist_split == "equal" else c) for m, c in counts.items()}
        n = sum(weights.values())
        exact = {m: rest * w / n for m, w in weights.items()}
        steps = {m: int(v) for m, v in exact.items()}
        for m in sorted(exact, key=lambda m: (exact[m] - steps[m], m), reverse=True)[: rest - sum(steps.values())]:
            steps[m] += 1
        return base, rest, {m: max(2, v) for m, v in steps.items()}


def train_bundle(
    data_root: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    *,
    budget: Budget = Budget(),
    device: str = "auto",
    seed: int = 0,
    generalist: bool = True,
    modalities: list[str] | None = None,
    progress: bool = True,
    log: Log = print,
    bundle_quality: bool = True,
    train_diameter: float | None = None,
) -> dict[str, Any]:
    """Train router, one specialist per modality and (optionally) the generalist into one bundle.

    ``train_diameter``: the nucleus diameter (px) every training image is resized to, and so the
    size the segmenters work at (size triage brings each image to it); None: the median over the
    training images.

    With ``bundle_quality`` (and a router), the quality estimate is then refitted as one model
    across the bundle's segmenters on the validation images routed as at inference
    (:func:`triageseg.pipeline.local.bundle_quality.fit_bundle_quality`).

    Returns:
        A summary: seconds per model, router test accuracy, validation F1 per segmenter.
    """
    from triageseg.datasets.layout import Dataset
    from triageseg.router.train import train_router
    from triageseg.segmenters.train import TrainConfig, train_segmenter, train_segmenter_into_bundle

    data_root = Path(data_root).resolve()
    bundle_dir = Path(bundle_dir)
    ds = Dataset(data_root)
    ds.check()
    mods = modalities or ds.modalities
    unknown = sorted(set(mods) - set(ds.modalities))
    if unknown:
        raise ValueError(f"{data_root}: no images of modality {unknown}; the dataset has {ds.modalities}")
    summary: dict[str, Any] = {"seconds": {}, "val_mean_f1": {}}

    t0 = time.perf_counter()
    if len(mods) > 1:
        log(f"[router] training on {len(mods)} modalities for up to {budget.router_seconds * budget.scale:.0f} s")
        r = train_router(
            data_root, _bundle.router_dir(bundle_dir), epochs=budget.router_epochs, seed=seed, device=device,
            time_budget_s=budget.router_seconds * budget.scale, progress=progress, bundle=bundle_dir,
        )
        summary["router_val_accuracy"] = r.val_accuracy
        summary["router_test_accuracy"] = r.test_accuracy
        summary["seconds"]["router"] = round(time.perf_counter() - t0, 1)
        log(f"[router] val accuracy {r.val_accuracy}, test accuracy {r.test_accuracy} ({summary['seconds']['router']} s)")

    counts = {m: len(ds.select(split="train", modality=m)) for m in mods}
    base_steps, rest, per_specialist = budget.split(counts)
    from triageseg.segmenters.data import canonical_diameter

    # One nucleus size for the shared base and every specialist fine-tuned from it (size triage brings
    # each image to it): the median over all training images.
    canonical = train_diameter or canonical_diameter([ds.load(s)[1] for s in ds.select(split="train")])
    common = TrainConfig(
        modality=None,
        diameter=canonical,
        batch_size=budget.batch_size,
        crop_size=budget.crop_size,
        lr=budget.lr,
        aug_strength=budget.aug_strength,
        max_val_images=budget.max_val_images,
        seed=seed,
        decoder_channels=tuple(budget.decoder_channels),
    )

    def with_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
        epochs, per_epoch = budget.schedule(steps)
        return cfg.replace(epochs=epochs, steps_per_epoch=per_epoch)

    work = bundle_dir / "_work"
    jobs: list[tuple[str, TrainConfig, Path | None]] = []
    init = None
    if base_steps:
        init = work / "base"
        jobs.append(("base", with_steps(common, base_steps), init))
    for m in mods:
        jobs.append((m, with_steps(common.replace(modality=m), per_specialist[m]), None))
    if generalist:
        jobs.append((_bundle.GENERALIST, with_steps(common, rest), None))
    summary["steps"] = {}
    for name, cfg, run_dir in jobs:
        if name != "base" and init is not None:
            steps = cfg.epochs * cfg.steps_per_epoch
            warmup = min(budget.finetune_warmup_steps, steps // 2) / cfg.steps_per_epoch
            cfg = cfg.replace(init_from=str(init.resolve()), lr=budget.lr * budget.finetune_lr_scale,
                              warmup_epochs=warmup, freeze_bn=budget.freeze_bn)
        t0 = time.perf_counter()
        log(f"[{name}] training {cfg.epochs} epochs x {cfg.steps_per_epoch} steps (batch {cfg.batch_size}, "
            f"crop {cfg.crop_size})" + (" from the shared base" if cfg.init_from else ""))
        if run_dir is not None:
            # `train all` does not resume: a checkpoint left by an interrupted run is replaced (with a note)
            res = train_segmenter(cfg.replace(tune_postprocess=False), data_root, run_dir, device=device,
                                  progress=progress, overwrite=True)
        else:
            res = train_segmenter_into_bundle(cfg, data_root, bundle_dir, device=device, progress=progress,
                                              overwrite=True)
        summary["seconds"][name] = round(time.perf_counter() - t0, 1)
        summary["steps"][name] = cfg.epochs * cfg.steps_per_epoch
        summary["val_mean_f1"][name] = round(res.val_mean_f1_tuned, 4)
        log(f"[{name}] val mean F1 {res.val_mean_f1_tuned:.3f}, best epoch {res.best_epoch} "
            f"({summary['seconds'][name]} s)")
    if work.exists():
        shutil.rmtree(work)
    _bundle.update_manifest(
        bundle_dir,
        modalities=[m for m in mods],
        provenance=_bundle.provenance(data=str(data_root), ids_sha256=ds.ids_hash(ds.samples), seed=seed,
                                      budget=dataclasses.asdict(budget)),
    )
    if bundle_quality and len(mods) > 1 and ds.select(split="val"):
        from triageseg.pipeline.local.bundle_quality import fit_bundle_quality

        summary["quality"] = fit_bundle_quality(bundle_dir, data_root, device=device, log=log)
    return summary


@dataclass
class BundleScores:
    """Scores of a bundle on one split: routed pipeline vs the generalist, plus the router."""

    protocol: str
    routed: Any  # per-modality report (postprocess.metrics report) of the routed pipeline
    generalist: Any | None  # same, every image through the generalist (None without one)
    router_accuracy: float | None
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # true -> predicted -> count
    used_models: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    routing: dict[str, dict[str, str]] = field(default_factory=dict)  # image id -> its routing.csv-like row
    # where `seconds` went: loading the models (and exporting them, once per weights), segmenting
    # (router + networks + watershed, routed and generalist), scoring and writing the predictions
    stages: dict[str, float] = field(default_factory=dict)
    backend: str = ""  # the inference backend and precision that ran ("onnx fp32", "torch fp32", ...)


def evaluate_bundle(
    bundle_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    split: str = "test",
    protocol: str = "default",
    device: str = "auto",
    out_dir: str | os.PathLike | None = None,
    compare_generalist: bool = True,
    progress: bool = True,
) -> BundleScores:
    """Segment ``split`` of a dataset with the bundle and score it per modality and overall.

    Args:
        out_dir: when given, the routed predictions are written there (``<id>.tif``,
            overlays) by the same code path as ``triageseg segment``.
    """
    from tqdm import tqdm

    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline, write_overlay
    from triageseg.postprocess.folders import report_from_results
    from triageseg.postprocess.metrics import match_image

    t0 = time.perf_counter()
    ds = Dataset(data_root)
    samples = ds.select(split=split)
    if not samples:
        raise ValueError(f"{data_root}: no samples in split {split!r}")
    pipe = Pipeline.from_bundle(bundle_dir, device=device)
    gen = compare_generalist and pipe.has_generalist
    pipe.load_router()  # models first (an exported backend exports each once): not counted as segmenting
    for name in pipe.available:
        pipe.segmenter(name)
    stages = {"load": time.perf_counter() - t0, "segment": 0.0, "score": 0.0}
    modality_of: dict[str, str] = {}
    routed_results, gen_results = [], []
    confusion: dict[str, dict[str, int]] = {}
    used: dict[str, int] = {}
    routing: dict[str, dict[str, str]] = {}
    correct = n_routed = 0
    for sample in tqdm(samples, desc=f"evaluate {split}", unit="img", disable=not progress):
        image, gt = ds.load(sample)
        t_seg = time.perf_counter()
        result = pipe.segment(image)
        stages["segment"] += time.perf_counter() - t_seg
        if result.confidence is not None and sample.modality is not None:
            n_routed += 1
            correct += result.modality == sample.modality
            row = confusion.setdefault(sample.modality, {})
            row[result.modality] = row.get(result.modality, 0) + 1
        used[result.used_model] = used.get(result.used_model, 0) + 1
        routing[sample.id] = {"modality": result.modality, "used_model": result.used_model,
                              "decision": result.decision,
                              "confidence": "" if result.confidence is None else f"{result.confidence:.4f}"}
        modality_of[sample.id] = sample.modality or "unknown"
        if gen:
            if result.used_model == _bundle.GENERALIST:
                gen_labels = result.labels
            else:  # the generalist with its own size decision, as the routed specialists get theirs
                t_seg = time.perf_counter()
                gen_labels = pipe.segment(image, modality=_bundle.GENERALIST).labels
                stages["segment"] += time.perf_counter() - t_seg
        t_score = time.perf_counter()
        routed_results.append(match_image(gt, result.labels, protocol=protocol, id=sample.id))
        if gen:
            gen_results.append(match_image(gt, gen_labels, protocol=protocol, id=sample.id))
        if out_dir is not None:
            from triageseg.datasets.io import write_labels

            out = Path(out_dir)
            write_labels(out / f"{sample.id}.tif", result.labels)
            write_overlay(out / "overlays" / f"{sample.id}.png", image, result.labels)
        stages["score"] += time.perf_counter() - t_score
    routed = report_from_results(routed_results, modality_of, protocol=protocol)
    general = report_from_results(gen_results, modality_of, protocol=protocol) if gen else None
    return BundleScores(
        protocol=protocol,
        routed=routed,
        generalist=general,
        router_accuracy=(correct / n_routed) if n_routed else None,
        confusion=confusion,
        used_models=dict(sorted(used.items())),
        seconds=time.perf_counter() - t0,
        routing=routing,
        stages={k: round(v, 2) for k, v in stages.items()},
        backend=describe_backend(pipe),
    )


def describe_backend(pipe) -> str:
    """What ran a pipeline's networks, in words: ``"onnx fp32 (auto), 2 threads"``."""
    import torch

    choice = pipe.choice
    return (f"{choice.backend} {choice.precision}{' (auto)' if choice.auto else ''} on {pipe.device}, "
            f"{torch.get_num_threads()} threads")


def write_bundle_report(
    path: str | os.PathLike,
    scores: BundleScores,
    data_root: str | os.PathLike,
    pred_dir: str | os.PathLike,
    *,
    worst: int = 6,
    title: str = "triageseg evaluation report: routed pipeline",
) -> Path:
    """The HTML report (``postprocess.report``) of the routed pipeline of :func:`evaluate_bundle`.

    Args:
        path: the HTML file to write (atomically).
        scores: what :func:`evaluate_bundle` returned when it wrote its predictions to ``pred_dir``.
        data_root: the dataset it scored (ground truth and images, by id).
        pred_dir: the folder of the routed label images (``<id>.tif``).
        worst: how many of the lowest-F1 images to show, outlined.

    Returns:
        The path written.
    """
    from triageseg.datasets.layout import Dataset
    from triageseg.postprocess.folders import with_files
    from triageseg.postprocess.report import write_report

    pred_dir = Path(pred_dir)
    ids = {r.id for r in scores.routed.overall.per_image}
    samples = [s for s in Dataset(data_root).samples if s.id in ids]
    report = with_files(scores.routed, {s.id: s.label_path for s in samples},
                        {s.id: pred_dir / f"{s.id}.tif" for s in samples})
    sources = {"ground truth and images": str(data_root), "predictions": str(pred_dir),
               "models used": ", ".join(f"{k}: {v}" for k, v in scores.used_models.items())}
    return write_report(path, report, confusion=scores.confusion or None, routing=scores.routing,
                        images={s.id: s.image_path for s in samples}, worst=worst, title=title, sources=sources)


def format_comparison(scores: BundleScores, *, classical: Any | None = None) -> str:
    """The routed-vs-generalist table: mean F1 per modality and overall."""
    columns = [("routed", scores.routed)]
    if scores.generalist is not None:
        columns.append(("generalist", scores.generalist))
    if classical is not None:
        columns.append(("classical", classical))
    names = sorted(scores.routed.per_modality)
    lines = [f"mean F1 ({scores.protocol} protocol, IoU 0.50:0.95)", ""]
    header = f"{'modality':<16}{'images':>7}" + "".join(f"{name:>12}" for name, _ in columns)
    lines.append(header)
    lines.append("-" * len(header))
    for m in names + ["overall"]:
        rep = scores.routed.per_modality[m] if m != "overall" else scores.routed.overall
        row = f"{m:<16}{rep.n_images:>7}"
        for _, col in columns:
            r = col.per_modality[m] if m != "overall" else col.overall
            row += f"{r.mean_f1:>12.3f}"
        lines.append(row)
    if scores.router_accuracy is not None:
        lines += ["", f"router accuracy: {scores.router_accuracy:.3f}", format_confusion(scores.confusion)]
    lines.append("models used: " + ", ".join(f"{k}: {v}" for k, v in scores.used_models.items()))
    return "\n".join(lines)


def format_confusion(confusion: dict[str, dict[str, int]]) -> str:
    """Router confusion matrix as text (rows: true modality, columns: predicted)."""
    classes = sorted(set(confusion) | {p for row in confusion.values() for p in row})
    if not classes:
        return ""
    w = max(12, *(len(c) + 2 for c in classes))
    lines = ["confusion (rows: true, columns: routed to)", f"{'':<{w}}" + "".join(f"{c:>{w}}" for c in classes)]
    for t in classes:
        lines.append(f"{t:<{w}}" + "".join(f"{confusion.get(t, {}).get(p, 0):>{w}}" for p in classes))
    return "\n".join(lines)


def scores_to_dict(scores: BundleScores) -> dict[str, Any]:
    """JSON-ready form of :class:`BundleScores`."""
    return {
        "protocol": scores.protocol,
        "routed": scores.routed.to_dict(),
        "generalist": None if scores.generalist is None else scores.generalist.to_dict(),
        "router_accuracy": scores.router_accuracy,
        "confusion": scores.confusion,
        "used_models": scores.used_models,
        "seconds": round(scores.seconds, 2),
        "stages": scores.stages,
        "backend": scores.backend,
    }


# The demo's splits: 70 training and 14 validation images of its 130, and a test split of
# 46 (25 fluorescence, 7 brightfield, 7 H&E, 7 IHC) so that per-modality scores are not three images.
DEMO_SPLITS = (0.54, 0.115, 0.345)
# The demo's nuclei: a median diameter per image drawn log-uniform in this range (px), so that size
# triage is trained (each segmenter at its training set's median) and tested across magnifications.
DEMO_DIAMETERS = (8.0, 48.0)


def run_demo(out: str | os.PathLike, *, budget: float = 1.0, seed: int = 0, device: str = "auto",
             n: int = 130, size: int = 256, log: Log = print, progress: bool = True,
             train_diameter: float | None = None) -> dict[str, Any]:
    """Synthetic data -> train the whole bundle -> segment the test split -> print the tables, write the report.

    ``train_diameter``: as for :func:`train_bundle`.
    """
    from triageseg.datasets.synth import make_dataset

    t_start = time.perf_counter()
    out = Path(out)
    data = out / "data"
    bundle_dir = out / "bundle"
    log(f"[data] generating {n} synthetic images of {size}x{size} in {data}")
    make_dataset(data, n=n, size=size, seed=seed, splits=DEMO_SPLITS, diameter_range=DEMO_DIAMETERS)
    summary = train_bundle(data, bundle_dir, budget=Budget(scale=budget), device=device, seed=seed,
                           progress=progress, log=log, train_diameter=train_diameter)
    log("[evaluate] segmenting the held-out test split")
    scores = evaluate_bundle(bundle_dir, data, split="test", device=device, out_dir=out / "predictions",
                             progress=progress)
    report_path, report_seconds = demo_report(out, scores, data)
    log(evaluate_line(scores, report_seconds))
    table = format_comparison(scores)
    wall = time.perf_counter() - t_start
    report = {"train": summary, "scores": scores_to_dict(scores), "report_seconds": round(report_seconds, 2),
              "wall_seconds": round(wall, 1)}
    write_json_atomic(out / "demo_results.json", report)
    log("")
    log(table)
    log("")
    log(f"outputs: bundle {bundle_dir}, predictions and overlays {out / 'predictions'}, "
        f"scores {out / 'demo_results.json'}")
    for line in demo_plot_lines(report_path, report_seconds, bundle_dir):
        log(line)
    log(f"demo wall time: {wall:.0f} s")
    return report


def evaluate_line(scores: BundleScores, report_seconds: float) -> str:
    """The evaluate stage's seconds and the backend that ran: the figure the speed work is judged by."""
    st = scores.stages
    n = sum(scores.used_models.values())
    return (f"[evaluate] {n} images in {scores.seconds:.1f} s on {scores.backend or 'torch'}: load "
            f"{st.get('load', 0.0):.1f} s (exports included), segment {st.get('segment', 0.0):.1f} s "
            f"(routed{' + generalist' if scores.generalist is not None else ''}), score + write "
            f"{st.get('score', 0.0):.1f} s; report {report_seconds:.1f} s")


def demo_report(out: Path, scores: BundleScores, data: Path, *, worst: int = 6) -> tuple[Path, float]:
    """Write the demo's ``report.html`` (the routed pipeline on the test split); (its path, seconds taken)."""
    t0 = time.perf_counter()
    path = write_bundle_report(Path(out) / "report.html", scores, data, Path(out) / "predictions", worst=worst,
                               title="triageseg demo: routed pipeline on the held-out test split")
    return path, time.perf_counter() - t0


def demo_plot_lines(report_path: Path, report_seconds: float, bundle_dir: Path) -> list[str]:
    """Where the report and the training curves are: every ``curves.png`` in the bundle, found by glob."""
    lines = [f"report: {report_path} (written in {report_seconds:.1f} s)"]
    curves = sorted(Path(bundle_dir).rglob("curves.png"))
    if curves:
        lines.append("training curves:")
        lines += [f"  {p}" for p in curves]
    else:
        lines.append(f"training curves: none in {bundle_dir}")
    return lines
