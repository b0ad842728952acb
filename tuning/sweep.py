"""The sweep driver behind ``triageseg tune``: one Ray Tune experiment per modality.

Example:
    >>> cfg = SweepConfig(data="data/", modality="he", num_samples=16, out="tune_out")  # doctest: +SKIP
    >>> results = run_sweeps(cfg)                                                       # doctest: +SKIP
    >>> results["he"].best_f1, results["he"].best_config_path                           # doctest: +SKIP

Ray: with ``address=None`` a local Ray is started for the sweep (all CPUs/GPUs of the
machine) and shut down afterwards; with an address the driver joins that cluster and
only disconnects. If Ray is already initialised in the process (a notebook, a test),
that connection is used and left open.

Experiments live in ``<storage>/<name>_<modality>`` (``storage`` defaults to
``<out>/ray_results``); outputs in ``<out>/<modality>/``: ``best_config.json``,
``trials.csv``, ``f1_per_trial.png`` and ``sweep.json`` (what was run).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from triageseg.datasets.atomic import atomic_path, write_json_atomic, write_text_atomic
from triageseg.datasets.errors import DataError
from triageseg.ray_cluster import DEFAULT_CONNECT_TIMEOUT_S, check_storage, ray_connection, resolve_storage
from triageseg.tuning import space as spaces
from triageseg.tuning.trainable import INJECT_FAILURES_ENV, parse_inject_failures

METRIC = "val_mean_f1"
MODE = "max"
SEARCHERS = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What ``triageseg tune`` runs (one per invocation; modality may be ``"all"``)."""

    data: str | os.PathLike  # dataset root (DESIGN layout); same absolute path on every node
    modality: str = "all"  # one modality, or "all" = every modality of the dataset in turn
    num_samples: int = 8  # trials per modality
    search: str = "random"  # search algorithm: random | optuna
    scheduler: str = "asha"  # trial scheduler: asha (early stopping) | fifo (run all to the end)
    cpus_per_trial: float = 1.0  # CPUs reserved per trial (also torch threads)
    gpus_per_trial: float = 0.0  # GPUs per trial; 0.5 = two trials share a GPU
    max_concurrent: int = 0  # most trials at once (0 = as many as resources allow)
    address: str | None = None  # None = local Ray for this run; "auto" or HOST:PORT = join a cluster
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S  # seconds to reach the cluster at address before giving up
    storage: str | None = None  # results/checkpoints path or URI (s3://...); None = <out>/ray_results
    name: str = "sweep"  # experiment name prefix: <storage>/<name>_<modality>
    resume: bool = False  # continue an interrupted sweep of the same name
    max_failures: int = 0  # retries of a crashed trial (from its last checkpoint)
    space_file: str | os.PathLike | None = None  # JSON/YAML search-space overrides
    epochs: int | None = None  # pin epochs (removes it from the search)
    steps_per_epoch: int | None = None  # pin steps per epoch
    base_config: str | os.PathLike | None = None  # TrainConfig JSON every trial starts from
    out: str | os.PathLike = "tune_out"  # folder for best_config.json, trials.csv, plots
    bundle: str | os.PathLike | None = None  # copy each modality's best model into this bundle
    seed: int = 0  # seed of the search (and of training unless base_config sets one)
    verbose: int = 1  # Ray Tune verbosity 0-3


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """The outcome of one modality's sweep."""

    modality: str  # the modality tuned
    experiment_path: str  # Ray Tune experiment folder or URI (resumed with the same --name/--storage)
    n_trials: int  # trials in the experiment
    n_completed: int  # trials that trained to the end and tuned their watershed
    n_pruned: int  # trials stopped early by the scheduler
    n_errored: int  # trials that failed (after their retries)
    best_trial_id: str | None  # id of the best completed trial
    best_f1: float  # its tuned validation mean F1 (nan if no trial completed)
    best_params: dict  # its sampled hyperparameters
    best_config_path: Path | None  # <out>/<modality>/best_config.json
    trials_csv: Path  # <out>/<modality>/trials.csv
    plot_path: Path  # <out>/<modality>/f1_per_trial.png
    bundle_dir: Path | None  # where the best model was copied, if a bundle was given
    wall_s: float  # wall time of the Tune run

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _echo(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------- helpers


def check_resources(cfg: SweepConfig, cluster: Mapping[str, float], *, log: Log = _echo) -> None:
    """Refuse a trial that can never be placed on this machine; warn on a cluster.

    Ray would otherwise leave such trials pending forever. A cluster may still grow (the
    autoscaler adds GPU workers for waiting trials), so there it is only a warning.

    Raises:
        ValueError: local Ray, and a trial needs more CPUs or GPUs than the machine has.
    """
    for key, need in (("CPU", cfg.cpus_per_trial), ("GPU", cfg.gpus_per_trial)):
        have = cluster.get(key, 0.0)
        if need <= have:
            continue
        flag = f"--{key.lower()}s-per-trial {need:g}"
        if cfg.address is None:
            raise ValueError(f"{flag}, but this machine has {have:g} {key}s (as Ray sees them)")
        log(f"warning: {flag}, but the cluster has {have:g} {key}s now; trials wait until nodes with "
            f"enough {key}s join (e.g. added by the autoscaler)")


def dataset_modalities(data: str | os.PathLike) -> list[str]:
    """Modalities present in a dataset (from ``modalities.csv``), sorted."""
    root = Path(data)
    path = root / "modalities.csv"
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist")
    if not path.is_file():
        raise DataError(path, "missing: --modality all needs the dataset's modalities.csv (id,modality)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "modality" not in reader.fieldnames:
            raise DataError(path, f"expected columns id,modality, got {reader.fieldnames}")
        found = sorted({row["modality"] for row in reader if row.get("modality")})
    if not found:
        raise DataError(path, "no modality listed")
    return found


def make_scheduler(name: str, *, max_epochs: int):
    """Trial scheduler by name; ASHA compares trials on per-epoch validation F1.

    ASHA's ``max_t`` is one past the longest trial so it never stops a trial on its last
    epoch just for having reached it: the trial still has to tune its watershed and
    report the tuned F1. Rungs start at a quarter of the epochs (at least 1) and halve
    the field at each doubling, which still prunes with 2-5 epoch sweeps.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "fifo":
        return FIFOScheduler()
    if name == "asha":
        grace = max(1, int(max_epochs) // 4)
        return ASHAScheduler(time_attr="epoch", max_t=int(max_epochs) + 1, grace_period=grace, reduction_factor=2)
    raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")


def make_searcher(name: str, *, seed: int):
    """Search algorithm by name; Optuna is optional and asked for by name only."""
    if name == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    if name == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ValueError(
                "--search optuna needs Optuna, which is not installed: pip install 'triageseg[optuna]' "
                "(or pip install 'optuna>=3'), or use --search random"
            ) from None
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    raise ValueError(f"unknown search algorithm {name!r}; valid: {', '.join(SEARCHERS)}")


def base_train_config(cfg: SweepConfig, modality: str):
    """The TrainConfig every trial of ``modality`` starts from."""
    from triageseg.segmenters.train import TrainConfig

    if cfg.base_config is not None:
        base = TrainConfig.from_json(cfg.base_config)
        base = base.replace(modality=modality)
    else:
        base = TrainConfig(modality=modality, seed=cfg.seed)
    changes = {}
    if cfg.steps_per_epoch is not None:
        changes["steps_per_epoch"] = int(cfg.steps_per_epoch)
    if cfg.epochs is not None:
        changes["epochs"] = int(cfg.epochs)
    return base.replace(**changes) if changes else base


def _validate_cfg(cfg: SweepConfig) -> None:
    if cfg.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {cfg.num_samples}")
    if cfg.cpus_per_trial <= 0:
        raise ValueError(f"--cpus-per-trial must be > 0, got {cfg.cpus_per_trial}")
    if cfg.gpus_per_trial < 0:
        raise ValueError(f"--gpus-per-trial must be >= 0, got {cfg.gpus_per_trial}")
    if cfg.gpus_per_trial > 1 and not float(cfg.gpus_per_trial).is_integer():
        raise ValueError(f"--gpus-per-trial above 1 must be a whole number, got {cfg.gpus_per_trial}")
    if cfg.max_concurrent < 0:
        raise ValueError(f"--max-concurrent must be >= 0, got {cfg.max_concurrent}")
    if cfg.max_failures < 0:
        raise ValueError(f"--max-failures must be >= 0, got {cfg.max_failures}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
        raise ValueError(f"--steps-per-epoch must be >= 1, got {cfg.steps_per_epoch}")
    if cfg.search not in SEARCHERS:
        raise ValueError(f"unknown search algorithm {cfg.search!r}; valid: {', '.join(SEARCHERS)}")
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if not cfg.name or "/" in cfg.name or os.sep in cfg.name:
        raise ValueError(f"--name must be a plain folder name, got {cfg.name!r}")
    if not Path(cfg.data).is_dir():
        raise DataError(cfg.data, "dataset folder does not exist")


def _preflight(base, space: Mapping[str, Any]) -> None:
    # Build the TrainConfig at every bound and choice now, so a value TrainConfig refuses
    # fails here in a second instead of in every trial.
    from triageseg.tuning.trainable import build_train_config

    for row in spaces.corner_values(space):
        try:
            build_train_config(base, row)
        except (TypeError, ValueError) as err:
            raise ValueError(f"search space value refused by TrainConfig ({row}): {err}") from None


# ---------------------------------------------------------------------------- one sweep


def trial_dirname(trial) -> str:
    """Trial folder name: ``trial_<id>`` (Ray's default packs every parameter into it)."""
    return f"trial_{trial.trial_id}"


def experiment_path(cfg: SweepConfig, modality: str) -> str:
    """``<storage>/<name>_<modality>``: the Tune experiment of one modality."""
    storage = resolve_storage(cfg.storage, cfg.out)
    return f"{storage.rstrip('/')}/{cfg.name}_{modality}"


def run_sweep(
    cfg: SweepConfig, modality: str, *, n_nodes: int = 1, start_if_missing: bool = False, log: Log = _echo
) -> SweepResult:
    """Run (or resume) the sweep of one modality on the connected Ray and write its outputs.

    Ray must be initialised (see :func:`ray_connection`). ``start_if_missing`` lets a
    resumed multi-modality run start the sweeps it never reached.

    Raises:
        ValueError: bad options, a sweep to resume that does not exist (or one that
            exists when not resuming), no trial that finished.
    """
    from ray import tune

    from triageseg.tuning.trainable import train_trial

    _validate_cfg(cfg)
    data_root = str(Path(cfg.data).resolve())
    storage = resolve_storage(cfg.storage, cfg.out)
    check_storage(storage, address=cfg.address, n_nodes=n_nodes, log=log)
    exp_name = f"{cfg.name}_{modality}"
    exp_path = experiment_path(cfg, modality)

    base = base_train_config(cfg, modality)
    overrides = spaces.load_space_file(cfg.space_file) if cfg.space_file is not None else None
    fixed = {"epochs": int(cfg.epochs)} if cfg.epochs is not None else None
    space = spaces.resolve_space(modality, overrides=overrides, fixed=fixed)
    _preflight(base, space)
    max_epochs = int(spaces.max_value(space, "epochs", base.epochs))

    inject = parse_inject_failures(os.environ.get(INJECT_FAILURES_ENV))
    threads = max(1, int(cfg.cpus_per_trial))
    trainable = tune.with_parameters(
        train_trial,
        base=base,
        data_root=data_root,
        device="cuda" if cfg.gpus_per_trial > 0 else "cpu",
        threads=threads,
        inject_failures=inject,
    )
    trainable = tune.with_resources(trainable, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})

    can_restore = tune.Tuner.can_restore(exp_path)
    if can_restore and not cfg.resume:
        raise ValueError(
            f"a sweep already exists at {exp_path}: pass --resume to continue it, "
            "or a different --name (or --storage) to start a new one"
        )
    if cfg.resume and not can_restore:
        if not start_if_missing:
            raise ValueError(f"--resume: no sweep to resume at {exp_path} (check --storage, --name, --out)")
        log(f"{modality}: nothing to resume at {exp_path}; starting this sweep")
    if can_restore:
        log(f"{modality}: resuming {exp_path} (errored trials resume from their last checkpoint)")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=spaces.to_tune(space),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                num_samples=cfg.num_samples,
                search_alg=make_searcher(cfg.search, seed=cfg.seed),
                scheduler=make_scheduler(cfg.scheduler, max_epochs=max_epochs),
                max_concurrent_trials=cfg.max_concurrent or None,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=exp_name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=cfg.verbose,
            ),
        )
    log(
        f"{modality}: {cfg.num_samples} trials, {cfg.search} search, {cfg.scheduler} scheduler, "
        f"{cfg.cpus_per_trial:g} CPU + {cfg.gpus_per_trial:g} GPU per trial -> {exp_path}"
    )
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    return write_outputs(grid, cfg=cfg, modality=modality, base=base, space=space, exp_path=exp_path,
                         wall_s=wall, log=log)


def run_sweeps(cfg: SweepConfig, *, log: Log = _echo) -> dict[str, SweepResult]:
    """Connect to Ray and run the sweep of each requested modality in turn.

    Returns:
        modality -> :class:`SweepResult`.
    """
    _validate_cfg(cfg)
    modalities = dataset_modalities(cfg.data) if cfg.modality == "all" else [cfg.modality]
    if cfg.modality != "all" and (Path(cfg.data) / "modalities.csv").is_file():
        known = dataset_modalities(cfg.data)
        if cfg.modality not in known:
            raise DataError(Path(cfg.data) / "modalities.csv",
                            f"no images of modality {cfg.modality!r}; valid: {', '.join(known)}, all")
    if cfg.space_file is not None:
        spaces.load_space_file(cfg.space_file)  # fail before starting Ray
    if cfg.search == "optuna":
        make_searcher("optuna", seed=cfg.seed)  # fail before starting Ray
    results, failed = {}, []
    # Tune warns when checkpoints force frequent experiment snapshots; with one checkpoint
    # per epoch of short epochs that is expected, not a bottleneck worth a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start_if_missing = False
    if cfg.resume and len(modalities) > 1:
        # A resumed multi-modality run starts the sweeps it never reached, as long as
        # it finds at least one to resume (else --name/--storage are probably wrong).
        from ray import tune

        found = [m for m in modalities if tune.Tuner.can_restore(experiment_path(cfg, m))]
        if not found:
            raise ValueError(f"--resume: no sweep to resume at {experiment_path(cfg, '<modality>')} "
                             f"for any of {', '.join(modalities)} (check --storage, --name, --out)")
        start_if_missing = True
    with ray_connection(cfg.address, quiet=cfg.verbose == 0, log=log, connect_timeout=cfg.connect_timeout) as cluster:
        check_resources(cfg, cluster, log=log)
        for modality in modalities:
            try:
                results[modality] = run_sweep(cfg, modality, n_nodes=int(cluster["nodes"]),
                                              start_if_missing=start_if_missing, log=log)
            except ValueError as err:
                if len(modalities) == 1:
                    raise
                # One modality's failure should not throw away the others' sweeps.
                log(f"error: {modality}: {err}")
                failed.append(f"{modality}: {err}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(modalities)} sweeps failed: " + "; ".join(failed))
    return results


# ---------------------------------------------------------------------------- outputs


def _trial_info(grid) -> dict[str, Any]:
    # Status and retry counts live on the Trial objects; ResultGrid does not expose them.
    analysis = getattr(grid, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None) or []
    return {t.trial_id: t for t in trials}


def _f(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def trial_rows(grid, *, param_names: list[str]) -> list[dict[str, Any]]:
    """One row per trial: id, status, epochs, F1 (final, best, tuned, best epoch), retries, params."""
    info = _trial_info(grid)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (result.config or {}).get("trial_id") or Path(result.path).name
        trial = info.get(trial_id)
        history = result.metrics_dataframe
        f1s = [] if history is None or METRIC not in history else [_f(v) for v in history[METRIC]]
        f1s = [v for v in f1s if not math.isnan(v)]
        epoch_rows = history[history["epoch"].notna()] if history is not None and "epoch" in history else None
        epochs = [] if epoch_rows is None else [int(v) for v in epoch_rows["epoch"]]
        epoch_f1s = [] if epoch_rows is None or METRIC not in epoch_rows else [_f(v) for v in epoch_rows[METRIC]]
        tuned = _f(metrics.get("tuned")) == 1.0
        if result.error is not None:
            status = "error"
        elif tuned:
            status = "completed"
        elif trial is not None and trial.status == "TERMINATED":
            status = "pruned"
        else:
            status = "unfinished"
        error = "" if result.error is None else str(result.error).strip().splitlines()[-1][:300]
        row = {
            "trial_id": trial_id,
            "status": status,
            "epochs_done": max(epochs, default=0),
            # The last F1 reported (the tuned one for a completed trial) and the best of all.
            "final_f1": f1s[-1] if f1s else math.nan,
            "best_f1": max(f1s, default=math.nan),
            # Completed trials: F1 of the kept (best-epoch) weights after watershed tuning...
            "tuned_f1": _f(metrics.get(METRIC)) if tuned else math.nan,
            # ... and the best epoch's F1 with default watershed parameters (every trial).
            "best_epoch_f1": max((v for v in epoch_f1s if not math.isnan(v)), default=math.nan),
            "num_failures": int(getattr(trial, "num_failures", 0) or 0),
            "time_s": round(_f(metrics.get("time_total_s")), 2),
            "error": error,
        }
        config = result.config or {}
        for name in param_names:
            value = config.get(name)
            row[name] = value.item() if hasattr(value, "item") else value
        row["path"] = result.path
        row["_result"] = result
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = [k for k in rows[0] if not k.startswith("_")] if rows else ["trial_id", "status"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


def plot_trials(path: Path, rows: list[dict[str, Any]], *, modality: str) -> None:
    """F1 per trial over epochs; a star marks each completed trial's tuned-watershed F1."""
    # A bare Figure (no pyplot): no global backend switch, no GUI, safe in any process.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for i, row in enumerate(rows):
        history = row["_result"].metrics_dataframe
        color = f"C{i % 10}"
        label = f"{row['trial_id']} ({row['status']})"
        style = "--" if row["status"] == "error" else "-"
        if history is not None and "epoch" in history and METRIC in history:
            epochs = history[history["epoch"].notna()]
            ax.plot(epochs["epoch"], epochs[METRIC], style, marker="o", ms=3, color=color, label=label)
            label = None
        if row["status"] == "completed":
            ax.plot([row["epochs_done"]], [row["tuned_f1"]], marker="*", ms=12, color=color, ls="", label=label)
    ax.set_xlabel("epoch (training iteration)")
    ax.set_ylabel("validation mean F1")
    ax.set_title(f"{modality}: F1 per trial (star = after watershed tuning)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _checkpoint_dir(result) -> contextlib.AbstractContextManager:
    # Local storage: the folder itself; a URI: downloaded to a temporary folder.
    return result.checkpoint.as_directory()


def write_outputs(
    grid,
    *,
    cfg: SweepConfig,
    modality: str,
    base,
    space: Mapping[str, Any],
    exp_path: str,
    wall_s: float,
    log: Log = _echo,
) -> SweepResult:
    """Write ``trials.csv``, the plot, ``best_config.json``, ``sweep.json`` (and the bundle)."""
    from triageseg.tuning.trainable import build_train_config, export_model

    out_dir = Path(cfg.out).resolve() / modality
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(grid, param_names=list(space))
    trials_csv = out_dir / "trials.csv"
    plot_path = out_dir / "f1_per_trial.png"
    _write_csv(trials_csv, rows)
    plot_trials(plot_path, rows, modality=modality)

    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "pruned", "error", "unfinished")}
    completed = [r for r in rows if r["status"] == "completed" and not math.isnan(r["tuned_f1"])]
    # Highest tuned F1; ties go to the earliest trial so reruns pick the same one.
    best = min(completed, key=lambda r: (-r["tuned_f1"], r["trial_id"]), default=None)
    best_config_path = bundle_dir = None
    best_params: dict[str, Any] = {}
    if best is not None:
        best_params = {k: best[k] for k in space}
        best_config_path = out_dir / "best_config.json"
        config = build_train_config(base, best_params)
        with atomic_path(best_config_path) as tmp:
            config.to_json(tmp)
        if cfg.bundle is not None:
            from triageseg import bundle as bundle_mod

            bundle_dir = bundle_mod.segmenter_dir(Path(cfg.bundle).resolve(), modality)
            with _checkpoint_dir(best["_result"]) as ckpt:
                export_model(ckpt, bundle_dir)
            bundle_mod.update_manifest(
                cfg.bundle,
                tuning={modality: {"trial_id": best["trial_id"], "val_mean_f1": best["tuned_f1"],
                                   "experiment": exp_path}},
            )
            log(f"{modality}: best model copied to {bundle_dir}")

    result = SweepResult(
        modality=modality,
        experiment_path=exp_path,
        n_trials=len(rows),
        n_completed=counts["completed"],
        n_pruned=counts["pruned"],
        n_errored=counts["error"],
        best_trial_id=None if best is None else best["trial_id"],
        best_f1=math.nan if best is None else best["tuned_f1"],
        best_params=best_params,
        best_config_path=best_config_path,
        trials_csv=trials_csv,
        plot_path=plot_path,
        bundle_dir=bundle_dir,
        wall_s=round(wall_s, 2),
    )
    sweep_cfg = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(cfg).items()}
    write_json_atomic(out_dir / "sweep.json", {"config": sweep_cfg, "space": dict(space), "result": result.to_dict()})
    log(
        f"{modality}: {result.n_trials} trials ({counts['completed']} completed, {counts['pruned']} pruned, "
        f"{counts['error']} errored) in {wall_s:.1f} s; "
        + (f"best {result.best_trial_id} F1 {result.best_f1:.4f} -> {best_config_path}" if best
           else "no trial finished")
    )
    if counts["unfinished"]:
        log(f"{modality}: {counts['unfinished']} trials unfinished: rerun with --resume to continue {exp_path}")
    if best is None:
        raise ValueError(f"{modality}: no trial finished training; see {trials_csv} (errors are listed there)")
    return result


def summary_table(results: Mapping[str, SweepResult]) -> str:
    """A plain-text table: modality, trials, completed/pruned/errored, best F1, wall time."""
    header = f"{'modality':<14}{'trials':>7}{'done':>6}{'pruned':>8}{'errors':>8}{'best F1':>9}{'wall s':>9}"
    lines = [header + "  best trial"]
    for m, r in results.items():
        lines.append(
            f"{m:<14}{r.n_trials:>7}{r.n_completed:>6}{r.n_pruned:>8}{r.n_errored:>8}"
            f"{r.best_f1:>9.4f}{r.wall_s:>9.1f}  {r.best_trial_id}"
        )
    return "\n".join(lines)

