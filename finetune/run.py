"""Fine-tune one modality's specialist on corrected images and write a new bundle beside the old one.

``finetune(bundle, data, out)`` is the loop's one library function (the CLI ``triageseg
finetune`` and napari's "Fine-tune" button both call it):

1. copy the parent bundle into ``<out>.partial`` and stage the corrected images of the
   modality there (a frozen copy, so a resumed run sees the same data);
2. score the model the parent uses for that modality on the collected ``val`` images (before);
3. train from it (``segmenters.train.train_segmenter`` with ``init_from`` = the parent's
   specialist, BatchNorm statistics frozen), steps chosen from the number of images, within
   a CPU-minutes budget; a Stop request ends training like the budget does and the best
   epoch so far is kept;
4. score again (after); an existing specialist that got worse on ``val`` is put back;
5. a modality the bundle did not know: the new specialist starts from the generalist, and
   the router learns the class (:mod:`triageseg.finetune.router_add`);
6. record the provenance (parent, dataset and its checksum, before/after F1) in
   ``bundle.json`` and rename ``<out>.partial`` to ``<out>``.

The parent bundle is only read. An interrupted fine-tune leaves ``<out>.partial`` with
its training checkpoint: ``resume=True`` continues it, ``overwrite=True`` starts over,
and without either a rerun is refused, as ``train segmenter`` does.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triageseg import bundle as _bundle
from triageseg.datasets.atomic import write_json_atomic
from triageseg.datasets.errors import DataError

Progress = Callable[[int, int, str], None]  # (done, total, what runs now)
STATE = "finetune_state.json"  # in <out>.partial while a fine-tune is unfinished
WORK = "_finetune_work"  # staged data, inside <out>.partial, removed at the end
PARTIAL = ".partial"
VAL_COPY = "__val"  # id suffix of a training image staged again as val when no val image was collected
LR_SCALE = 0.3  # fine-tuning runs at this fraction of the parent's learning rate (as train all's continuations)
STEPS_PER_IMAGE = 40  # optimiser steps per corrected training image ...
MIN_STEPS, MAX_STEPS = 60, 400  # ... within these bounds; the minutes budget may end it sooner
TRAIN_SHARE = 0.75  # share of the minutes budget for training; the rest scores, tunes the watershed, writes


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did; the same is recorded under ``provenance.finetune`` in the new bundle."""

    out: Path  # the new bundle
    parent: Path  # the bundle it was made from (unchanged)
    modality: str
    new_modality: bool  # the parent had no such modality: a new specialist and a new router class
    init_from: str  # the parent model the specialist started from (its name in the parent bundle)
    val_f1_before: float  # mean per-image F1 on the collected val images: the parent's model
    val_f1_after: float  # the same with the new bundle's specialist
    kept: str  # "finetuned", or "parent" when fine-tuning made val F1 worse (the parent's specialist is kept)
    n_train: int
    n_val: int
    val_source: str  # "val split", or "training images" when no corrected image is in val
    steps_planned: int
    epochs_completed: int
    stopped: bool  # ended by Stop or by the minutes budget
    seconds: float
    data: str
    data_sha256: str
    router: dict[str, Any] = field(default_factory=dict)  # what adding the modality to the router did

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["parent"] = str(self.out), str(self.parent)
        return d


def plan_steps(n_train: int) -> int:
    """Optimiser steps for ``n_train`` corrected training images (the minutes budget may stop sooner)."""
    return int(min(MAX_STEPS, max(MIN_STEPS, STEPS_PER_IMAGE * (n_train + 1))))


def partial_dir(out: str | os.PathLike) -> Path:
    """Where an unfinished fine-tune into ``out`` builds its bundle."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL)


def finetune(
    bundle: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    modality: str | None = None,
    minutes: float = 5.0,
    stop_event: threading.Event | None = None,
    progress: Progress | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    steps: int | None = None,
    device: str = "auto",
    seed: int = 0,
    keep_better: bool = True,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``modality``'s specialist of ``bundle`` on the corrected images in ``data``; write ``out``.

    Args:
        bundle: the parent bundle (never modified).
        data: corrections dataset (``add_to_training_set`` writes it): ``train`` images train,
            ``val`` images score before and after (the training images when there are none).
        out: the new bundle folder; must not exist (``overwrite`` replaces it).
        modality: which modality to fine-tune; None: the dataset's only modality.
        minutes: CPU budget for the whole fine-tune (training stops at ~75 % of it).
        stop_event: set it to stop early; the best epoch so far is kept and the bundle written.
        progress: called as ``progress(done, total, text)``.
        resume: continue an interrupted fine-tune into the same ``out``.
        overwrite: delete an interrupted fine-tune (or an existing ``out``) and start afresh.
        steps: optimiser steps (default :func:`plan_steps` of the number of training images).
        device: ``auto|cpu|cuda|...``.
        seed: seeds crops, augmentation and the router head.
        keep_better: put the parent's specialist back when fine-tuning lowered the val F1.
        log: where messages go (default: nowhere).

    Returns:
        :class:`FinetuneResult`.

    Raises:
        DataError: bad bundle, dataset or modality; ``out`` is the parent or exists; an
            interrupted fine-tune without ``resume``/``overwrite``, or one made from other data.
    """
    from triageseg.datasets.layout import Dataset
    from triageseg.finetune.collect import dataset_checksum
    from triageseg.segmenters.train import CHECKPOINT_DIR, CHECKPOINT_FILE, train_segmenter

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    bundle, data, out = Path(bundle), Path(data), Path(out)
    manifest = _bundle.read_manifest(bundle)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    _check_out(bundle, out, overwrite=overwrite)
    ds = Dataset(data)
    ds.check()
    modality = _pick_modality(ds, modality)
    new_modality = modality not in manifest.get("modalities", [])
    init_name = modality if new_modality is False else _start_model(manifest, bundle)
    checksum = dataset_checksum(data)
    part = partial_dir(out)
    state_path = part / STATE
    ckpt = _bundle.segmenter_dir(part, modality) / CHECKPOINT_DIR / CHECKPOINT_FILE
    state = _open_partial(bundle, ds, modality, part, checksum, init_name, new_modality, resume=resume,
                          overwrite=overwrite, log=say)
    staged = part / WORK / "data"
    n_train, n_val = state["n_train"], state["n_val"]
    total_steps = int(steps or plan_steps(n_train))
    extra = 2 + (1 if new_modality else 0)
    report = progress or (lambda *_: None)

    # ---- before: the parent's model on the val images
    if state.get("val_f1_before") is None:
        report(0, total_steps + extra, "scoring the bundle before")
        state["val_f1_before"] = score_model(bundle, init_name, staged, device=device)
        write_json_atomic(state_path, state)
    before = float(state["val_f1_before"])
    say(f"{modality}: val mean F1 before {before:.4f} ({init_name} of {bundle})")

    # ---- train
    config = _train_config(bundle, init_name, modality, total_steps, staged, seed=seed,
                           budget_s=max(5.0, minutes * 60 * TRAIN_SHARE - (time.perf_counter() - t0)))
    stopper = stop_event.is_set if stop_event is not None else None
    result = train_segmenter(
        config, staged, _bundle.segmenter_dir(part, modality), device=device, resume=resume and ckpt.is_file(),
        overwrite=True, progress=log is not None, should_stop=stopper,
        on_step=lambda step: report(1 + min(step, total_steps - 1), total_steps + extra, "fine-tuning"),
    )
    stopped = result.stopped_by_budget

    # ---- after
    report(total_steps + 1, total_steps + extra, "scoring the new bundle")
    after, kept = _score_after(bundle, part, modality, staged, before, keep=keep_better and not new_modality,
                               device=device, log=say)
    router_info: dict[str, Any] = {}
    if new_modality:
        from triageseg.finetune.router_add import add_modality

        report(total_steps + 2, total_steps + extra, "adding the modality to the router")
        router_info = add_modality(part, modality, staged, seed=seed, device=device, log=say)

    seconds = time.perf_counter() - t0
    res = FinetuneResult(
        out=out, parent=bundle.resolve(), modality=modality, new_modality=new_modality, init_from=init_name,
        val_f1_before=round(before, 6), val_f1_after=round(after, 6), kept=kept, n_train=n_train, n_val=n_val,
        val_source=state["val_source"], steps_planned=total_steps, epochs_completed=result.epochs_completed,
        stopped=stopped, seconds=round(seconds, 2), data=str(data.resolve()), data_sha256=checksum,
        router=router_info,
    )
    _finish(part, out, res)
    report(total_steps + extra, total_steps + extra, "done")
    return res


def _open_partial(bundle: Path, ds, modality: str, part: Path, checksum: str, init_name: str, new_modality: bool,
                  *, resume: bool, overwrite: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The state of the fine-tune in ``part``: an interrupted one resumed (same parent, modality, data) or a new one."""
    if part.exists():
        if overwrite:
            shutil.rmtree(part)
        elif not resume:
            raise DataError(part, "an interrupted fine-tune is here; continue it with resume=True (CLI: --resume) "
                                  "or start afresh with overwrite=True (CLI: --overwrite), which deletes it")
    if not part.exists():
        return _start(bundle, ds, modality, part, checksum, init_name, new_modality)
    state = _bundle.read_json(part / STATE)
    same = (state.get("parent") == str(bundle.resolve()) and state.get("modality") == modality
            and state.get("data_sha256") == checksum)
    if not same:
        raise DataError(part, "the interrupted fine-tune was made from another bundle, modality or data "
                              f"(data checksum then {str(state.get('data_sha256'))[:12]}, now {checksum[:12]}); "
                              "start afresh with overwrite=True (CLI: --overwrite)")
    log(f"resuming the fine-tune in {part}")
    return state


def _score_after(bundle: Path, part: Path, modality: str, staged: Path, before: float, *, keep: bool, device: str,
                 log: Callable[[str], None]) -> tuple[float, str]:
    """Val F1 of the new specialist; with ``keep``, the parent's is put back when that is lower. (F1, kept)."""
    _bundle.update_manifest(part)  # a new specialist folder is listed before the pipeline opens the bundle
    after = score_model(part, modality, staged, device=device)
    if keep and after < before:
        log(f"{modality}: fine-tuning lowered val F1 ({before:.4f} -> {after:.4f}); keeping the parent's specialist")
        seg = _bundle.segmenter_dir(part, modality)
        shutil.rmtree(seg)
        shutil.copytree(_bundle.segmenter_dir(bundle, modality), seg, ignore=_copy_ignore)
        return before, "parent"
    log(f"{modality}: val mean F1 after {after:.4f}")
    return after, "finetuned"


def _check_out(bundle: Path, out: Path, *, overwrite: bool) -> None:
    b, o = bundle.resolve(), out.resolve()
    if o == b or b in o.parents:
        raise DataError(out, f"the new bundle must be outside the parent bundle {bundle} (it is never modified)")
    if out.exists():
        if not overwrite:
            raise DataError(out, "already exists; choose another output folder or pass overwrite=True "
                                 "(CLI: --overwrite) to replace it")
        if (out / _bundle.MANIFEST).is_file() or not any(out.iterdir()):
            shutil.rmtree(out)
        else:
            raise DataError(out, "exists and is not a bundle; refusing to delete it")


def _pick_modality(ds, modality: str | None) -> str:
    have = ds.modalities
    if modality is None:
        if len(have) != 1:
            raise DataError(ds.root, f"the dataset holds modalities {have or 'none'}; say which one to fine-tune "
                                     "(--modality)")
        return have[0]
    if modality not in have:
        raise DataError(ds.root, f"no corrected image of modality {modality!r}; the dataset has {have or 'none'}")
    return modality


def _start_model(manifest: dict[str, Any], bundle: Path) -> str:
    """The parent model a new modality's specialist starts from: the generalist (else the first specialist)."""
    segs = list(manifest.get("segmenters", []))
    if _bundle.GENERALIST in segs:
        return _bundle.GENERALIST
    if not segs:
        raise DataError(bundle, "the bundle holds no segmenter to start from")
    return segs[0]


def _copy_ignore(_dir: str, names: list[str]) -> list[str]:
    """Never copy a training checkpoint or a train-all work folder into the new bundle."""
    return [n for n in names if n in ("checkpoint", "_work", WORK) or n.startswith(".")]


def stage_data(ds, modality: str, staged: Path) -> tuple[int, int]:
    """Copy the modality's labelled images of ``ds`` into ``staged`` (train, and val or a copy of train).

    Returns:
        (training images, val images); with no val image the training images are staged a second
        time as ``<id>__val`` (``train_segmenter`` needs a val split to keep its best epoch).
    """
    from triageseg.datasets.layout import write_index

    train = [s for s in ds.select(split="train", modality=modality) if s.label_path is not None]
    val = [s for s in ds.select(split="val", modality=modality) if s.label_path is not None]
    if not train:
        train, val = val, []  # only val images: train on them and score on them (said in val_source)
    if not train:
        raise DataError(ds.root, f"no labelled train or val image of modality {modality!r}")
    mods, splits = {}, {}
    pairs = [(s, s.id, "train") for s in train] + [(s, s.id, "val") for s in val]
    if not val:
        pairs += [(s, f"{s.id}{VAL_COPY}", "val") for s in train]
    for sample, new_id, split in pairs:
        for src, sub in ((sample.image_path, "images"), (sample.label_path, "labels")):
            dst = staged / sub / f"{new_id}{src.suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        mods[new_id], splits[new_id] = modality, split
    write_index(staged, modalities=mods, splits=splits)
    return len(train), len(val)


def _start(bundle: Path, ds, modality: str, part: Path, checksum: str, init_name: str,
           new_modality: bool) -> dict[str, Any]:
    """Copy the parent, stage the modality's corrected images; the state of the run (written beside them)."""
    tmp = part.with_name(part.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle, tmp, ignore=_copy_ignore)
    n_train, n_val = stage_data(ds, modality, tmp / WORK / "data")
    state = {"parent": str(bundle.resolve()), "modality": modality, "data": str(ds.root.resolve()),
             "data_sha256": checksum, "init_from": init_name, "new_modality": new_modality,
             "n_train": n_train, "n_val": n_val, "val_source": "val split" if n_val else "training images",
             "val_f1_before": None}
    write_json_atomic(tmp / STATE, state)
    os.replace(tmp, part)
    return state


def _train_config(bundle: Path, init_name: str, modality: str, steps: int, staged: Path, *, seed: int,
                  budget_s: float):
    """The fine-tuning TrainConfig: the parent model's architecture and recipe, fewer steps, a lower lr."""
    from triageseg.datasets.layout import Dataset
    from triageseg.segmenters.model import SegmenterConfig
    from triageseg.segmenters.train import TrainConfig
    from triageseg.workflow import Budget

    init_dir = _bundle.segmenter_dir(bundle, init_name)
    seg = SegmenterConfig.from_json(init_dir / _bundle.CONFIG)
    saved = _bundle.read_json(init_dir / _bundle.CONFIG).get("train") or {}
    names = set(TrainConfig.__dataclass_fields__)
    base = TrainConfig.from_dict({k: v for k, v in saved.items() if k in names}) if saved else TrainConfig(
        batch_size=4, crop_size=128, lr=3e-3, aug_strength=0.5)
    ds = Dataset(staged)
    smallest = min(min(ds.load(s)[1].shape) for s in ds.samples)
    crop = max(32, min(base.crop_size, int(smallest * seg.scale) // 32 * 32))
    per_epoch = Budget(steps_per_epoch=20)
    epochs, steps_per_epoch = per_epoch.schedule(steps)
    total = epochs * steps_per_epoch
    return base.replace(
        modality=modality, encoder=seg.encoder, decoder_channels=tuple(seg.decoder_channels),
        encoder_weights=None, init_from=str(init_dir.resolve()), tile_size=seg.tile_size, overlap=seg.overlap,
        boundary_width=seg.boundary_width, boundary_mode=seg.boundary_mode, scale=seg.scale,
        epochs=epochs, steps_per_epoch=steps_per_epoch, crop_size=crop,
        lr=base.lr * LR_SCALE, warmup_epochs=min(16, total // 2) / steps_per_epoch, freeze_bn=True,
        time_budget_s=budget_s, seed=seed, max_val_images=16, tune_postprocess=True,
    )


def score_model(bundle: str | os.PathLike, model_name: str, data: str | os.PathLike, *,
                split: str = "val", device: str = "auto") -> float:
    """Mean per-image F1 (default protocol) of one segmenter of ``bundle`` on ``split`` of ``data``.

    The model runs as ``segment`` runs it (its tiling and tuned watershed parameters), not routed:
    before and after are the same model slot, so the comparison is the fine-tuning's alone.
    """
    from triageseg.datasets.layout import Dataset
    from triageseg.pipeline import Pipeline
    from triageseg.postprocess.metrics import match_image
    from triageseg.postprocess.watershed import watershed

    pipe = Pipeline.from_bundle(bundle, device=device)
    ds = Dataset(data)
    scores = []
    for sample in ds.select(split=split):
        image, gt = ds.load(sample)
        labels = watershed(pipe.probabilities(image, model_name), pipe.params(model_name))
        scores.append(match_image(gt, labels).mean_f1)
    return float(np.mean(scores)) if scores else math.nan


def _finish(part: Path, out: Path, res: FinetuneResult) -> None:
    """Provenance into bundle.json, the work files out, then the rename that makes ``out`` appear whole."""
    manifest = _bundle.read_json(part / _bundle.MANIFEST)
    segs = dict((manifest.get("provenance") or {}).get("segmenters") or {})
    run_prov = dict(segs.get(res.modality) or {})
    seg_cfg = _bundle.read_json(_bundle.segmenter_dir(part, res.modality) / _bundle.CONFIG)
    if res.kept == "finetuned":
        run_prov = dict(seg_cfg.get("provenance") or {})
        run_prov.update(data=res.data, data_sha256=res.data_sha256, finetuned_from=res.init_from)
    segs[res.modality] = run_prov
    info = res.to_dict()
    info.pop("out")
    history = list((manifest.get("provenance") or {}).get("finetune_history") or [])
    history.append({k: info[k] for k in ("parent", "modality", "data", "data_sha256", "val_f1_before",
                                         "val_f1_after", "kept")})
    _bundle.update_manifest(part, provenance=_bundle.provenance(
        parent=str(res.parent), parent_manifest=manifest.get("provenance", {}).get("created"),
        segmenters=segs, finetune=info, finetune_history=history))
    shutil.rmtree(part / WORK, ignore_errors=True)
    (part / STATE).unlink(missing_ok=True)
    os.replace(part, out)
