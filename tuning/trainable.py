"""The Ray Tune trainable: one trial = one ``train_segmenter`` run with sampled hyperparameters.

The trial trains in a node-local scratch folder (an absolute path inside the trial's
Ray working directory on the node that runs it) with the very function behind
``triageseg train segmenter``. After every epoch it reports
``val_mean_f1`` (watershed with default parameters) and hands the run folder to Tune as
a checkpoint, which Tune persists to the sweep's storage; a restarted or resumed trial
copies its last checkpoint back and continues with ``resume=True``. When training ends,
``train_segmenter`` tunes the watershed on the validation predictions, and the trial
reports once more: ``val_mean_f1`` is then the tuned F1 (``tuned = 1``), with the
finished model run folder as the checkpoint. That last report carries no ``epoch``, so
the ASHA scheduler (``time_attr="epoch"``) compares trials on epoch results only. The
scratch folder is removed when the trial ends (finished, pruned or failed): the
persisted checkpoints hold everything.

Fault injection for testing retries: ``TRIAGESEG_TUNE_INJECT_FAILURES="0:1,2:5"`` in the
environment of ``triageseg tune`` makes trial 0 raise once and trial 2 five times, each
time right after an epoch's checkpoint, so ``--max-failures`` and resuming from a
checkpoint can be checked on a real sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Environment variable read by the sweep driver (see the module docstring).
INJECT_FAILURES_ENV = "TRIAGESEG_TUNE_INJECT_FAILURES"
# Name of the run folder inside the trial's scratch folder.
RUN_SUBDIR = "run"
# Files of a run folder that make up the model (copied into a bundle); everything else
# (optimizer state, resume checkpoint) stays behind.
MODEL_FILES = ("config.json", "model.safetensors", "postprocess.json", "quality.json", "curves.png")
MODEL_PREFIXES = ("history.",)
# A record of injected failures per trial, kept in the trial dir across retries.
_INJECTED = ".injected_failures"


class InjectedFailure(RuntimeError):
    """Raised by a trial on purpose (``TRIAGESEG_TUNE_INJECT_FAILURES``) to test retries."""


def parse_inject_failures(spec: str | None) -> dict[int, int]:
    """Parse ``"0:1,2:5"`` (trial index: number of failures) into ``{0: 1, 2: 5}``.

    Raises:
        ValueError: a malformed spec, naming the environment variable.
    """
    out: dict[int, int] = {}
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        index, sep, times = part.partition(":")
        try:
            out[int(index)] = int(times) if sep else 1
        except ValueError:
            raise ValueError(
                f"{INJECT_FAILURES_ENV}={spec!r}: expected 'trial_index:times,...', e.g. '0:1'"
            ) from None
    return out


def _coerce(value: Any, like: Any) -> Any:
    # Tune samples numpy scalars; TrainConfig wants plain ints/floats/str (JSON-serialisable).
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(like, bool):
        return bool(value)
    if isinstance(like, int) and not isinstance(like, bool):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def build_train_config(base, params: Mapping[str, Any]):
    """``base`` (a TrainConfig) with the sampled ``params`` applied and type-coerced.

    Raises:
        ValueError: a parameter that is not a TrainConfig field (the valid ones are
            listed) or a value TrainConfig refuses.
    """
    fields = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(
            f"not TrainConfig fields: {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    changes = {}
    for name, value in params.items():
        try:
            changes[name] = _coerce(value, getattr(base, name))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return base.replace(**changes) if hasattr(base, "replace") else dataclasses.replace(base, **changes)


def _metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    # Only finite-or-nan numbers go to Tune; strings and arrays stay in history.json.
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def tuned_f1(result, run_dir: Path) -> tuple[float, float | None]:
    """(tuned watershed F1, best epoch's F1 with default parameters) of a finished run.

    Taken from the :class:`TrainResult`; ``history.json`` (``final``) of the run folder
    is the fallback.
    """
    tuned = getattr(result, "val_mean_f1_tuned", None)
    if tuned is not None:
        untuned = getattr(result, "best_val_mean_f1", None)
        return float(tuned), None if untuned is None else float(untuned)
    path = run_dir / "history.json"
    final = (json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}).get("final") or {}
    if "val_mean_f1_tuned" not in final:
        raise ValueError(f"{path}: train_segmenter recorded no tuned F1 (val_mean_f1_tuned)")
    untuned = final.get("val_mean_f1_default")
    return float(final["val_mean_f1_tuned"]), None if untuned is None else float(untuned)


def _scratch_root() -> Path:
    # Ray runs each trial in its own node-local working directory under the Ray session
    # folder (never synced to storage unless asked), so even a trial killed before it can
    # clean up leaves nothing outside Ray's own temp folder.
    if os.environ.get("RAY_CHDIR_TO_TRIAL_DIR", "1") != "0":
        return Path.cwd()
    return Path(tempfile.gettempdir())


def _maybe_inject_failure(trial_dir: Path, trial_index: int, inject: Mapping[int, int]) -> None:
    times = inject.get(trial_index, 0)
    if times <= 0:
        return
    trial_dir.mkdir(parents=True, exist_ok=True)
    record = trial_dir / _INJECTED
    done = int(record.read_text()) if record.is_file() else 0
    if done < times:
        record.write_text(str(done + 1))
        raise InjectedFailure(f"injected failure {done + 1}/{times} of trial {trial_index} ({INJECT_FAILURES_ENV})")


def train_trial(
    params: dict[str, Any],
    *,
    base,
    data_root: str,
    device: str = "cpu",
    threads: int = 1,
    inject_failures: Mapping[int, int] | None = None,
) -> None:
    """Ray Tune function trainable: train one sampled configuration and report its F1.

    Bind the keyword arguments with ``tune.with_parameters``; ``params`` is the
    sampled point of the search space.

    Args:
        params: sampled hyperparameters (TrainConfig field -> value).
        base: the TrainConfig every trial starts from (modality, steps, seed, encoder...).
        data_root: absolute dataset folder, the same path on every node.
        device: ``"cpu"`` or ``"cuda"`` (Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU share).
        threads: torch CPU threads (the trial's CPU share).
        inject_failures: trial index -> times to raise on purpose (tests of retries).
    """
    import torch
    from ray import tune

    from triageseg.segmenters.train import train_segmenter

    torch.set_num_threads(max(1, threads))
    context = tune.get_context()
    trial_id = context.get_trial_id()
    # get_trial_dir() is the driver's staging folder, which the driver copies to storage:
    # only the small fault-injection record goes there, never the run folder.
    trial_dir = Path(context.get_trial_dir()).resolve()
    config = build_train_config(base, params)
    try:
        trial_index = int(trial_id.rsplit("_", 1)[-1])
    except ValueError:
        trial_index = -1

    # The run folder is node-local scratch; the checkpoints Tune persists are the state.
    scratch = Path(tempfile.mkdtemp(prefix="triageseg-run-", dir=_scratch_root())).resolve()
    run_dir = scratch / RUN_SUBDIR
    resume = False
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            shutil.copytree(ckpt_dir, run_dir)
        resume = True
    run_dir.mkdir(parents=True, exist_ok=True)

    def report(epoch: int, metrics: dict, _run_dir: Path) -> None:
        values = {**_metrics(metrics), "epoch": int(epoch), "tuned": 0}
        # tune.report copies the folder to storage before it returns, so the live run
        # folder can be handed over as it is.
        tune.report(values, checkpoint=tune.Checkpoint.from_directory(run_dir))
        _maybe_inject_failure(trial_dir, trial_index, inject_failures or {})

    try:
        result = train_segmenter(config, data_root, run_dir, device=device, resume=resume, report=report,
                                 progress=False)
        tuned, default = tuned_f1(result, run_dir)
        final = {"val_mean_f1": tuned, "val_mean_f1_default": math.nan if default is None else default, "tuned": 1}
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(run_dir))
    finally:
        # Everything worth keeping is in the persisted checkpoints; a stopped (pruned),
        # failed or finished trial leaves no second copy of its weights behind.
        shutil.rmtree(scratch, ignore_errors=True)


def is_model_file(name: str) -> bool:
    """Whether a run-folder file belongs to the finished model (goes into a bundle)."""
    return name in MODEL_FILES or name.startswith(MODEL_PREFIXES)


def export_model(checkpoint_dir: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the model files of a final trial checkpoint into ``dest``, replacing it atomically.

    Returns:
        The names of the copied files.

    Raises:
        DataError: the checkpoint holds no model weights.
    """
    from triageseg.datasets.errors import DataError

    src = Path(checkpoint_dir)
    names = sorted(p.name for p in src.iterdir() if p.is_file() and is_model_file(p.name))
    if "model.safetensors" not in names:
        raise DataError(src, f"no model.safetensors in the trial checkpoint (found: {', '.join(names) or 'nothing'})")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for name in names:
            shutil.copy2(src / name, tmp / name)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return names
