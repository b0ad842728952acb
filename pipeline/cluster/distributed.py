"""Many image files on a Ray cluster: the routed pipeline as Ray Data stages.

:func:`segment_files_ray` is what ``triageseg segment --address ...`` (or ``--ray``) runs.
It makes the same files as :func:`triageseg.pipeline.local.batch.segment_files` (label TIFFs,
``routing.csv`` with the same columns) in one pass over the inputs still to do:

```
read + normalise (CPU tasks) -> route + segment (one actor pool; each actor holds the router
                                and every segmenter its images need, loaded once)
                             -> watershed + write (CPU tasks) -> rows to the driver -> routing.csv
```

That is the Ray Data pass GPU actors get. CPU actors read, decode and write their own
images as well (``ClusterOptions.decode``), on plain actors
(:mod:`~triageseg.pipeline.cluster.actor_pass`): one actor per node with every CPU of it.

The model pools run side by side inside one pool: an image is routed and segmented in
the same actor, so each image is read once and a run pays actor start and each model's
load once per actor (a pass per model paid them per model: +78-88 % over the local run
on 48 images of 512 x 512). The stages call the same functions as the local path (see
:mod:`~triageseg.pipeline.cluster.ray_stages`).

Guarantees, as locally: outputs are atomic (rename, or one upload for a URI); an input
is done when its label file exists and ``routing.csv`` has its row, so a rerun after the
driver died redoes at most the images whose rows it had not yet recorded; ``on_error``
is applied per file; a task on a lost worker or node is retried by Ray (tasks
``max_retries``, actors ``max_restarts``), and rewriting an output under the same name
leaves no duplicate. Temporary files of killed writers are removed at the end.

Huge images (local inputs above the block threshold, a pyramid level, slide formats)
go the block path as Ray tasks instead, all of them interleaved and at the same time as
the pass, from a driver thread (:mod:`~triageseg.pipeline.cluster.ray_slides`: scan + route,
probability bands on one actor pool, block decodes and a finish as CPU tasks; the labels
are the local block path's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from triageseg.datasets.errors import DataError
from triageseg.pipeline.cluster import storage
from triageseg.pipeline.cluster.ray_stages import (
    BundleSource,
    SegmentActor,
    StageOptions,
    read_stage,
    row_error,
    write_stage,
)
from triageseg.pipeline.local.batch import (
    ROUTING_CSV,
    SEGMENT_CONFIG,
    BatchReport,
    RoutingJournal,
    _fail,
    _read_routing,
    _write_routing,
    check_outputs_apart,
    format_quality,
    output_names,
    output_settings,
    rebuild_rows,
    routing_row,
    verify_output,
)
from triageseg.ray_cluster import check_storage, cluster_info, is_shared, is_uri
from triageseg.router.policy import SKIPPED, UNKNOWN_DECISION

Log = Callable[[str], None]
# Task seconds the report sums: loading models (once per actor) apart from the per-image stages.
STAGES = ("read", "load", "route", "segment", "write")


def _echo(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class ClusterOptions:
    """How a run is spread over the Ray cluster (``triageseg segment --address/--ray`` options)."""

    address: str | None = None  # the cluster joined ("auto", HOST:PORT), None for a local Ray; named in messages
    actors: str = "auto"  # actors per model: "N" fixed, "MIN:MAX" autoscaling, "auto" = 1 up to what fits
    cpus_per_actor: float | None = None  # CPUs reserved per actor (also its torch threads); None: actor_cpus
    gpus_per_actor: float = 0.0  # GPUs per actor; fractions share a GPU (0.25 = four actors per GPU)
    images_per_batch: int = 4  # images handed to an actor at once (all for its model)
    ship_bundle: bool | None = None  # copy the bundle through the object store; None = when a node could not read it
    progress: bool = True  # Ray Data's progress bars
    flush_seconds: float = 5.0  # how often routing.csv is rewritten while results arrive
    band_chunk_rows: int = 8  # probability chunk rows (of 256) per band task of a block-wise image
    scratch: str | None = None  # where block-wise images' journals live (a shared folder or URI); None: beside labels
    # where small images' watershed + writes run: "actor" (the actor that computed the probabilities, as the local
    # path does), "tasks" (CPU tasks beside the actors), "auto" (actor for CPU actors, tasks for GPU actors)
    decode: str = "auto"

    def decode_in_actor(self) -> bool:
        """Whether small images are decoded and written by the actor that segmented them (see ``decode``)."""
        if self.decode not in ("auto", "actor", "tasks"):
            raise ValueError(f"decode must be auto, actor or tasks, got {self.decode!r}")
        return self.decode == "actor" or (self.decode == "auto" and self.gpus_per_actor <= 0)


@dataclass
class DistributedReport(BatchReport):
    """Outcome of :func:`segment_files_ray`: a :class:`BatchReport` plus where the time went.

    URI inputs and outputs are kept as the strings given (local ones as Paths).
    """

    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    passes: list[tuple[str, int, float]] = field(default_factory=list)  # (pass, images, wall seconds)
    slides: object = None  # ray_slides.SlideStats of the block-wise images (band actors' time), None without


def parse_actors(spec: str) -> tuple[int, int] | None:
    """``"N"`` -> (N, N), ``"MIN:MAX"`` (or ``MIN-MAX``) -> (MIN, MAX), ``"auto"`` -> None.

    Raises:
        ValueError: anything else, or sizes below 1 / MAX < MIN.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return None
    parts = text.replace("-", ":").split(":")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--actors must be N, MIN:MAX or auto, got {spec!r}") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or sizes[0] < 1 or sizes[1] < sizes[0]:
        raise ValueError(f"--actors must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got {spec!r}")
    return sizes[0], sizes[1]


def pool_size(options: ClusterOptions, cluster: dict[str, float], *, spare_cpu: bool = True) -> tuple[int, int]:
    """(min, max) actors of one pool: ``--actors``, or for ``auto`` as many as the cluster holds.

    ``auto`` keeps one CPU free for the read and write tasks when actors use CPUs only
    (``spare_cpu``). Actors that read, decode and write their own images keep none, nor do
    the band actors of block-wise images: they are stopped whenever no band waits, and the
    scans and decodes get the CPUs then.
    """
    sizes = parse_actors(options.actors)
    if sizes is not None:
        return sizes
    if options.gpus_per_actor > 0:
        most = int(cluster["GPU"] // options.gpus_per_actor)
    else:
        most = int(max(1.0, cluster["CPU"] - spare_cpu) // (options.cpus_per_actor or 1.0))
    return 1, max(1, most)


def actor_cpus(options: ClusterOptions, cluster: dict[str, float]) -> float:
    """CPUs (and torch threads) of one small-image actor: ``--cpus-per-actor``, else by the layout.

    CPU actors that decode their own images (``ClusterOptions.decode``) get every CPU of
    the smallest node: one actor per node, as a local run is one process using every core
    (on 2 cores, 48 images of 512 x 512: one actor of 2 threads +15 to +40 % over the local
    run, two actors of one thread +52 to +75 %; ``benchmarks/RESULTS.md``). GPU actors, and CPU actors
    beside write tasks, get one.
    """
    if options.cpus_per_actor is not None:
        return float(options.cpus_per_actor)
    if options.gpus_per_actor > 0 or not options.decode_in_actor():
        return 1.0
    return max(1.0, float(int(cluster.get("node_CPU") or cluster["CPU"])))


def check_cluster(options: ClusterOptions, cluster: dict[str, float], *, log: Log = _echo) -> None:
    """Refuse actors that can never be placed on a local Ray (they would wait forever); warn on a cluster."""
    options.decode_in_actor()  # a bad ``decode`` is refused here
    cpus = actor_cpus(options, cluster)
    if cpus <= 0 or options.gpus_per_actor < 0:
        raise ValueError(f"--cpus-per-actor must be > 0 and --gpus-per-actor >= 0, got "
                         f"{cpus:g} and {options.gpus_per_actor:g}")
    if options.gpus_per_actor > 1 and not float(options.gpus_per_actor).is_integer():
        raise ValueError(f"--gpus-per-actor above 1 must be a whole number, got {options.gpus_per_actor:g}")
    if options.images_per_batch < 1:
        raise ValueError(f"images per batch must be >= 1, got {options.images_per_batch}")
    short = []
    if cpus > cluster["CPU"]:
        short.append(f"{cpus:g} CPUs per actor but the cluster has {cluster['CPU']:g}")
    if options.gpus_per_actor > cluster["GPU"]:
        short.append(f"{options.gpus_per_actor:g} GPUs per actor but the cluster has {cluster['GPU']:g}")
    if short and options.address is None:
        raise ValueError("actors cannot be placed: " + "; ".join(short))
    for line in short:
        log(f"warning: {line}; the actors wait until the cluster grows")


def bundle_source(bundle: str | os.PathLike, options: ClusterOptions, n_hosts: int, *,
                  log: Log = _echo) -> BundleSource:
    """The bundle's path when every node reads it, else one copy in the object store."""
    path = str(Path(bundle).resolve())
    ship = options.ship_bundle if options.ship_bundle is not None else not is_shared(path, n_hosts=n_hosts)
    if not ship:
        return BundleSource(path=path)
    import ray

    digest, files = storage.bundle_payload(path)
    log(f"bundle: shipping {sum(map(len, files.values())) / 1e6:.1f} MB to the nodes once (object store)")
    return BundleSource(ref=ray.put(files), digest=digest)


def _check_locations(out: str, files: Sequence[str], options: ClusterOptions, cluster, log: Log) -> None:
    nodes, hosts = int(cluster["nodes"]), int(cluster["hosts"])
    check_storage(out, address=options.address, n_nodes=nodes, n_hosts=hosts, log=log, option="--out",
                  what="label files", example="s3://BUCKET/labels")
    if hosts > 1:  # on one machine every node reads the inputs; no warning needed for them
        for folder in sorted({str(Path(f).resolve().parent) for f in files if not is_uri(f)}):
            check_storage(folder, address=options.address, n_nodes=nodes, n_hosts=hosts, log=log, option="INPUT",
                          what="input images", example="s3://BUCKET/images/")


class _Journal:
    """routing.csv rows by output name, rewritten atomically every few seconds and at the end."""

    def __init__(self, out: str, every: float):
        import threading

        self.location = storage.join(out, ROUTING_CSV)
        self.lock = threading.RLock()  # the slides' thread and the pass's both add rows
        self.rows = self._read(out)
        self.every = every
        self.last = time.monotonic()
        # rows lost from routing.csv, from the label files (each carries its row, as locally)
        self.rebuilt = [] if is_uri(self.location) else rebuild_rows(out, self.rows)
        if self.rebuilt:
            self.flush()

    def _read(self, out: str) -> dict[str, dict]:
        if not is_uri(self.location):
            # rows that a killed local run (`segment` without Ray) logged for its label files
            return RoutingJournal(out).recover(_read_routing(Path(self.location)))
        import tempfile

        text = storage.read_text(self.location)
        if text is None:
            return {}
        with tempfile.TemporaryDirectory(prefix="triageseg-") as tmp:
            local = Path(tmp) / ROUTING_CSV
            local.write_text(text, encoding="utf-8")
            return _read_routing(local)

    def add(self, name: str, row: dict) -> None:
        with self.lock:
            self.rows[name] = row
            if time.monotonic() - self.last >= self.every:
                self.flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if is_uri(self.location):
            import tempfile

            with tempfile.TemporaryDirectory(prefix="triageseg-") as tmp:
                local = Path(tmp) / ROUTING_CSV
                _write_routing(local, self.rows)
                storage.upload(local, self.location)
        else:
            _write_routing(Path(self.location), self.rows)
        self.last = time.monotonic()


def _as_input(file: str):
    return file if is_uri(file) else Path(file)


def _plan(files: list[str], names: list[str], out: str, journal: _Journal, overwrite: bool, page: int | None,
          report, suffix: str = ".tif") -> list[dict]:
    """Inputs still to do: no label file, one that does not verify, no routing.csv row, or ``overwrite``.

    A local label file is verified as the local command does (it opens, is whole and has
    its input's height and width); a URI output counts when it exists and has its row.
    """
    from triageseg.datasets.shapes import image_shape

    existing = storage.names_in(out)
    todo = []
    for index, (file, name) in enumerate(zip(files, names)):
        label = f"{name}{suffix}"  # <name>.tif, or the folder <name>.ome.zarr (--format ome-zarr)
        present = label in existing or (not is_uri(out) and suffix != ".tif" and (Path(out) / label).is_dir())
        done = not overwrite and present and name in journal.rows
        if done and not is_uri(out):
            target = Path(out) / label
            try:
                problem = verify_output(target, None if is_uri(file) or file.endswith(".zarr")
                                        else image_shape(file, page=page))
            except DataError:
                problem = ""  # the input itself is bad: segmenting it again reports why
            if problem:
                report.incomplete.append((target, problem))
            done = problem is None
        if done:
            report.skipped.append(_as_input(file))
        else:
            journal.rows.pop(name, None)
            todo.append({"index": index, "file": file, "name": name})
    return todo


def pass_dataset(items: list[dict], actor, constructor_args: tuple, options: ClusterOptions, sizes: tuple[int, int],
                 stage: StageOptions, *, write: bool):
    """The Ray Data graph of a pass: read tasks -> an actor pool -> (write tasks).

    For actors that write their own images, see :mod:`~triageseg.pipeline.cluster.actor_pass`
    instead: a task stage beside actors that hold every CPU would wait for a CPU forever, and
    Ray Data fuses a task stage into an actor pool only when their CPU requests match.
    """
    import ray.data as rd

    gpus = options.gpus_per_actor
    ds = rd.from_items(items, override_num_blocks=max(1, min(len(items), 10_000)))
    # Ray Data's defaults are the retry policy: tasks max_retries=-1 (system failures such
    # as a lost node), pool actors max_restarts=-1 and max_task_retries=-1.
    if stage.decode_in_actor:
        raise ValueError("actors that decode their own images run on plain actors (actor_pass), not Ray Data")
    ds = ds.map(read_stage, fn_kwargs={"options": stage}, num_cpus=1)
    ds = ds.map_batches(
        actor, fn_constructor_args=constructor_args, batch_size=options.images_per_batch, batch_format="numpy",
        compute=_strategy(sizes), num_cpus=options.cpus_per_actor, num_gpus=gpus if gpus > 0 else None,
    )
    if write:
        ds = ds.map(write_stage, fn_kwargs={"options": stage}, num_cpus=1)
    return ds


def _strategy(sizes: tuple[int, int]):
    import ray.data as rd

    low, high = sizes
    return rd.ActorPoolStrategy(size=low) if low == high else rd.ActorPoolStrategy(min_size=low, max_size=high)


def _configure_ray_data(progress: bool) -> None:
    import ray.data as rd

    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    # Ray Data's INFO lines (execution plans, log folders) would bury the progress bars,
    # and without bars its one warning is that they are off.
    logging.getLogger("ray.data").setLevel(logging.WARNING if progress else logging.ERROR)


def _stage_times(report: DistributedReport, row: dict) -> None:
    for stage in STAGES:
        value = row.get(f"t_{stage}")
        if value is not None and not math.isnan(float(value)):
            report.stage_seconds[stage] += float(value)


def segment_files_ray(
    pipe,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    modality: str | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
    overlays: bool = False,
    rois: bool = False,
    channel: int | None = None,
    page: int | None = None,
    names: Sequence[str] | None = None,
    cluster_options: ClusterOptions | None = None,
    log: Log = _echo,
    blocks=None,
) -> DistributedReport:
    """Segment files on the connected Ray cluster into ``out_dir``, as ``segment_files`` does on one machine.

    Ray must be initialised (:func:`triageseg.ray_cluster.ray_connection`). ``pipe`` (a
    :class:`~triageseg.pipeline.local.single.Pipeline`) is the bundle and its options; the
    driver loads no model, the actors do.

    Args:
        inputs: image files: local paths every node reads (absolute or relative to here) or URIs.
        out_dir: output folder, a shared path or a URI (``s3://bucket/labels``).
        modality, overwrite, on_error, overlays, rois, channel, page, names: as for the local path
            (:func:`~triageseg.pipeline.local.batch.segment_files`), with the same safety checks:
            outputs apart from the inputs, settings recorded in ``segment_config.json`` and
            checked on resume, failures listed in ``failures.csv``.
        cluster_options: actors, CPU/GPU shares, bundle shipping, progress.
        log: where one-line notes go (pass sizes, warnings).
        blocks: :class:`~triageseg.pipeline.blockwise.large.BlockOptions`: local images above its
            threshold go the block path as Ray tasks (:mod:`~triageseg.pipeline.cluster.ray_slides`),
            interleaved, at the same time as the pass over the others.

    Raises:
        OutputConflict: an output would overwrite or shadow an input, or ``out_dir`` holds
            outputs made with other settings (and not ``overwrite``).
        DataError: a bad input with ``on_error="fail"`` (rows finished before it are kept).
        ValueError: bad options, or paths a multi-node cluster cannot share.
    """
    import ray

    options = cluster_options or ClusterOptions()
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if not ray.is_initialized():
        raise ValueError("Ray is not initialised: connect first (triageseg.ray_cluster.ray_connection)")
    shown = [os.fspath(f) if is_uri(os.fspath(f)) else str(Path(f)) for f in inputs]
    names = output_names(shown, names)
    out = os.fspath(out_dir) if is_uri(os.fspath(out_dir)) else str(Path(out_dir).resolve())
    if not is_uri(out):
        local = [(f, n) for f, n in zip(shown, names) if not is_uri(f)]
        check_outputs_apart([f for f, _ in local], [n for _, n in local], out)
    if modality is not None:
        pipe.check_modality(modality)  # fail fast, before any file is read
    settings = output_settings(pipe.path, modality=modality, tile_size=pipe.tile_size, tta=pipe.tta,
                               diameter=pipe.diameter,
                               channel=channel, page=page)
    storage.check_settings_at(out, settings, overwrite=overwrite)
    cluster = cluster_info()
    check_cluster(options, cluster, log=log)
    _check_locations(out, shown, options, cluster, log)
    if not is_uri(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    storage.write_text(storage.join(out, SEGMENT_CONFIG), json.dumps({
        **settings, "device": "cuda" if options.gpus_per_actor > 0 else "cpu", "batch_size": pipe.batch_size,
        "address": options.address or "local", "actors": options.actors,
        "cpus_per_actor": actor_cpus(options, cluster),
        "gpus_per_actor": options.gpus_per_actor, "n_inputs": len(shown)}, indent=2) + "\n")

    report = DistributedReport()
    journal = _Journal(out, options.flush_seconds)
    report.rebuilt = len(journal.rebuilt)
    todo = _plan(shown, names, out, journal, overwrite, page, report, ".tif" if blocks is None else blocks.suffix)
    for item in todo:
        item["source"] = item["file"] if is_uri(item["file"]) else str(Path(item["file"]).resolve())
    big = _blockwise(todo, blocks)
    todo = [item for item in todo if item not in big]
    start = time.perf_counter()
    # block-wise images in a thread of their own, at the same time as the pass over the others
    from triageseg.pipeline.cluster.ray_slides import SlidesThread

    slides = SlidesThread(pipe, big, out, journal, report, options, blocks, modality=modality, channel=channel,
                          on_error=on_error, log=log)
    try:
        if todo:
            _small_images(pipe, todo, out, journal, report, options, cluster, on_error, log, channel=channel,
                          page=page, modality=modality, overlays=overlays, rois=rois)
    except BaseException:
        slides.stop.set()
        raise
    finally:
        slides.join()
    storage.write_failures_at(out, report.failures)
    report.seconds = time.perf_counter() - start
    return report


def _small_images(pipe, todo, out, journal, report, options, cluster, on_error, log, *, channel, page, modality,
                  overlays, rois) -> None:
    """The one pass over the images not segmented block-wise (plain actors or Ray Data, ``_Run.segment``)."""
    if todo:
        options = dataclasses.replace(options, cpus_per_actor=actor_cpus(options, cluster))
        stage = StageOptions(
            out=out, threads=max(1, int(options.cpus_per_actor)), channel=channel, page=page, modality=modality,
            overlays=overlays, rois=rois, decode_in_actor=options.decode_in_actor(),
            # an actor sees only the GPUs Ray gave it: cuda with a GPU share, else cpu
            pipeline={"device": "cuda" if options.gpus_per_actor > 0 else "cpu", "tile_size": pipe.tile_size,
                      "overlap": pipe.overlap, "batch_size": pipe.batch_size, "tta": pipe.tta,
                      "backend": pipe.backend, "precision": pipe.precision,
                      "prob_dtype": getattr(pipe, "prob_dtype", "float32"),
                      "unknown": pipe.unknown, "diameter": pipe.diameter, "use_pixel_size": pipe.use_pixel_size},
        )
        run = _Run(pipe, todo, options, cluster, stage, on_error, report, journal, log)
        try:
            run.execute()
        finally:
            journal.flush()
            if not is_uri(out):
                storage.remove_partial_files(out, [t["name"] for t in todo])


def _blockwise(todo: list[dict], blocks) -> list[dict]:
    """The local inputs the block path takes (above the block threshold, a pyramid level, a slide format)."""
    from triageseg.pipeline.blockwise.large import BlockOptions, use_blocks

    blocks = BlockOptions() if blocks is None else blocks
    return [item for item in todo if not is_uri(item["file"]) and use_blocks(Path(item["source"]), blocks)]


class _Run:
    """One call of :func:`segment_files_ray` with inputs to do: one pass that routes, segments and writes."""

    def __init__(self, pipe, todo: list[dict], options: ClusterOptions, cluster: dict, stage: StageOptions,
                 on_error: str, report: DistributedReport, journal: _Journal, log: Log):
        self.pipe, self.todo, self.options, self.stage = pipe, todo, options, stage
        self.on_error, self.report, self.journal, self.log = on_error, report, journal, log
        # actors that decode their own images leave no task a CPU to keep free for
        self.sizes = pool_size(options, cluster, spare_cpu=not stage.decode_in_actor)
        self.n_hosts = int(cluster["hosts"])
        self.by_index = {item["index"]: item for item in todo}

    def execute(self) -> None:
        self.bundle = bundle_source(self.pipe.path, self.options, self.n_hosts, log=self.log)
        self.segment(self.todo)

    def _rows(self, label: str, n: int, rows) -> Iterator[tuple[dict, dict]]:
        """(input item, result row) of a pass's ``rows``; failed inputs go to ``on_error`` instead."""
        low, high = self.sizes
        self.log(f"{label}: {n} image(s), {low if low == high else f'{low}-{high}'} actor(s)")
        t0 = time.perf_counter()
        for row in rows:
            _stage_times(self.report, row)
            item = self.by_index[int(row["index"])]
            err = row_error(row)
            if err is not None:
                where = err.path if err.path not in (None, item["source"]) else item["file"]
                if self.on_error == "fail":
                    self.journal.flush()  # keep the rows of what finished: the run stops here
                _fail(self.report, _as_input(item["file"]), DataError(where, err.problem), self.on_error)
                continue
            yield item, row
        seconds = time.perf_counter() - t0
        self.report.passes.append((label, n, seconds))
        self.log(f"{label}: done in {seconds:.1f} s")

    def segment(self, items: list[dict]) -> None:
        """The pass: read tasks, one actor pool that routes and segments with every model, write tasks (or the
        actors decode and write, ``ClusterOptions.decode``)."""
        if self.stage.decode_in_actor:  # nothing left for Ray Data to schedule: plain actors (actor_pass)
            from triageseg.pipeline.cluster.actor_pass import actor_pass

            rows = actor_pass(items, self.bundle, self.stage, actors=self.sizes[1], cpus=self.options.cpus_per_actor,
                              gpus=self.options.gpus_per_actor, images_per_batch=self.options.images_per_batch,
                              progress=self.options.progress)
        else:  # Ray Data is imported only here (0.6 s of the driver's time before the first actor starts)
            _configure_ray_data(self.options.progress)
            rows = pass_dataset(items, SegmentActor, (self.bundle, self.stage), self.options, self.sizes, self.stage,
                                write=True).iter_rows()
        for item, row in self._rows("segment", len(items), rows):
            self.record(item, row, objects=int(row["objects"]), seconds=float(row["t_route"]) +
                        float(row["t_segment"]) + float(row["t_write"]))

    def record(self, item: dict, row: dict, *, objects: int, seconds: float) -> None:
        """The routing.csv row of one input (a label file written, or skipped as an unknown modality)."""
        confidence, score = float(row["confidence"]), float(row["ood_score"])
        entry = routing_row(_as_input(item["file"]), item["name"], str(row["modality"]),
                            None if math.isnan(confidence) else confidence, str(row["used_model"]),
                            str(row["decision"]), ood_score=None if math.isnan(score) else score,
                            size=_size_of(row))
        entry["objects"] = objects
        quality = float(row.get("quality", math.nan))
        entry["quality"] = format_quality(None if math.isnan(quality) else quality)
        entry["seconds"] = f"{seconds:.3f}"
        if entry["decision"].startswith(UNKNOWN_DECISION):
            self.report.unknown.append((_as_input(item["file"]), entry["decision"]))
        self.journal.add(item["name"], entry)
        if entry["used_model"] == SKIPPED:
            self.report.unknown_skipped.append(_as_input(item["file"]))
            return
        self.report.rows.append(entry)
        target = storage.join(self.stage.out, f"{item['name']}.tif")
        self.report.written.append(target if is_uri(target) else Path(target))


def _size_of(row) -> SimpleNamespace:
    """The size decision carried in a Ray row (NaN = none), as routing_row reads it."""
    def num(key):
        value = float(row.get(key, math.nan))
        return None if math.isnan(value) else value

    return SimpleNamespace(diameter=num("diameter"), scale=num("scale"), size_source=str(row.get("size_source", "")))
