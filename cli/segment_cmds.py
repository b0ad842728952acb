"""``triageseg segment`` and ``triageseg route``: the commands users run on their images."""

from __future__ import annotations

import glob
from pathlib import Path

import click

from triageseg.cli.groups import cli, diameter_option
from triageseg.datasets.errors import DataError
from triageseg.datasets.io import IMAGE_SUFFIXES
from triageseg.ray_cluster import DEFAULT_CONNECT_TIMEOUT_S, is_uri

# The block path's defaults (pipeline.blockwise.blocks / pipeline.blockwise.large), repeated here so that loading
# the CLI does not import the pipeline; tests/test_blocks.py checks that they agree.
DEFAULT_BLOCK_SIZE, DEFAULT_MARGIN, DEFAULT_THRESHOLD_MP = 2048, 64, 16.8


def expand_inputs(inputs: tuple[str, ...], *, recursive: bool) -> tuple[list[Path | str], list[str]]:
    """Files, folders and globs -> (image files, output names); URIs (s3://...) stay strings.

    Files from a folder keep their path below that folder in the output name
    (``sub/a.png`` -> ``sub__a``) so two files with the same stem do not collide.
    """
    files: list[Path] = []
    names: list[str] = []
    for item in inputs:
        if is_uri(item):
            from triageseg.pipeline.cluster.storage import expand_uri

            found_uris, found_names = expand_uri(item, IMAGE_SUFFIXES, recursive=recursive)
            files.extend(found_uris)
            names.extend(found_names)
            continue
        path = Path(item)
        if path.is_dir() and path.name.lower().endswith(".zarr"):  # an OME-Zarr image is a folder
            files.append(path)
            names.append(path.name[: -len(".zarr")].removesuffix(".ome"))
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(
                p for p in path.glob(pattern) if not p.name.startswith(".")
                and not any(part.lower().endswith(".zarr") for part in p.relative_to(path).parts[:-1])
                and ((p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                     or (p.is_dir() and p.name.lower().endswith(".zarr")))
            )
            if not found:
                raise DataError(path, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                                + ("" if recursive else "; use --recursive for subfolders"))
            for p in found:
                rel = p.relative_to(path).with_suffix("")
                rel = rel.with_suffix("") if p.suffix.lower() == ".zarr" else rel
                files.append(p)
                names.append("__".join(rel.parts))
        elif path.is_file():
            files.append(path)
            names.append(path.stem)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=recursive) if Path(p).is_file())
            if not found:
                raise DataError(item, "the pattern matches no file")
            files.extend(found)
            names.extend(p.stem for p in found)
        else:
            raise DataError(path, "no such file or folder")
    return files, names


def input_folders(inputs: tuple[str, ...]) -> list[Path]:
    """The folders INPUTS read from: folder inputs, and the fixed folder each glob starts in."""
    folders = []
    for item in inputs:
        if is_uri(item):
            continue
        if Path(item).is_dir():
            folders.append(Path(item))
        elif glob.has_magic(item):
            fixed = []
            for part in Path(item).parts:
                if glob.has_magic(part):
                    break
                fixed.append(part)
            folders.append(Path(*fixed) if fixed else Path("."))
    return folders


def _common_options(func):
    for option in reversed(
        [
            click.option("--bundle", "bundle_path", required=True, type=click.Path(exists=True, file_okay=False),
                         help="Model bundle (from `triageseg train all`)."),
            click.option("--recursive", is_flag=True, help="Descend into subfolders of folder inputs."),
            click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
            click.option("--channel", type=click.IntRange(min=0), default=None,
                         help="Channel to use for 2- or >3-channel images (or of the pages of a 2-4 page TIFF)."),
            click.option("--page", type=click.IntRange(min=0), default=None,
                         help="Plane to read from multi-page TIFFs (a stack, or 2-4 pages without axis metadata)."),
        ]
    ):
        func = option(func)
    return func


def _ray_options(func):
    for option in reversed(
        [
            click.option("--address", default=None,
                         help="Run on this Ray cluster: 'auto' (this machine is a node) or HOST:PORT."),
            click.option("--ray", "use_ray", is_flag=True, help="Run on a Ray started on this machine for the run."),
            click.option("--actors", default="auto", show_default=True,
                         help="Actors per model on Ray: N, or MIN:MAX to autoscale; auto = 1 up to what fits."),
            click.option("--cpus-per-actor", default=None, type=click.FloatRange(min=0, min_open=True),
                         help="CPUs per actor on Ray (also its torch threads). Default: CPU actors get every CPU "
                              "of the smallest node (one actor per node, as a local run is one process), GPU "
                              "actors and whole-slide band actors 1."),
            click.option("--gpus-per-actor", default=0.0, show_default=True, type=click.FloatRange(min=0),
                         help="GPUs per actor on Ray; fractions share a GPU (0.25 = four actors per GPU)."),
            click.option("--scratch", default=None,
                         help="On Ray, keep block-wise images' journals (probabilities, finished blocks) here instead "
                              "of beside the labels: a shared folder or a URI (s3://bucket/prefix)."),
            click.option("--connect-timeout", default=DEFAULT_CONNECT_TIMEOUT_S, show_default=True,
                         type=click.FloatRange(min=0, min_open=True),
                         help="Seconds to wait for the cluster at --address before giving up."),
        ]
    ):
        func = option(func)
    return func


def _size_options(func):
    for option in reversed(
        [
            click.option("--diameter", type=float, default=None, callback=diameter_option,
                         help="Median nucleus diameter in pixels of every input (Cellpose's convention): skips the "
                              "size estimate; images are resized so their nuclei reach the segmenter's training size."),
            click.option("--use-pixel-size/--no-use-pixel-size", default=True, show_default=True,
                         help="Take the nucleus size from the file's pixel size (um) when the segmenter knows its "
                              "training nuclei in um; otherwise the size is estimated from the image."),
        ]
    ):
        func = option(func)
    return func


def _tile_size(ctx, param, value: int | None) -> int | None:
    if value is not None and (value < 32 or value % 32):
        raise click.BadParameter(f"{value} is not a positive multiple of 32 (e.g. 256, 512)", ctx=ctx, param=param)
    return value


@cli.command("segment")
@click.argument("inputs", nargs=-1, required=True)
@_common_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--modality", default=None, help="Force this specialist and skip the router.")
@click.option("--unknown", type=click.Choice(["generalist", "skip", "fail"]), default="generalist", show_default=True,
              help="An image unlike every trained modality (OOD score above the router's threshold): segment it "
                   "with the generalist (flagged in the summary), skip it (a routing.csv row, no label file), or "
                   "fail on it (exit 1, naming the file and the score).")
@click.option("--tile-size", type=int, default=None, callback=_tile_size,
              help="Tile side in pixels, a multiple of 32 (default: the model's). A tile too small for the "
                   "model's overlap gets an overlap of a quarter tile.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Tiles per forward pass (default: 4 on a GPU; on a CPU as many as fill one 768 x 768 tile, "
                   "as larger batches are no faster there and cost memory).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes for watershed and writing (0: in the main process).")
@click.option("--tta", is_flag=True, help="D4 test-time augmentation (8x slower, a little more accurate).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx", "openvino"]), default="auto",
              show_default=True, help="How the segmenters run (README: Speed); a missing library falls back to "
              "torch with a note.")
@click.option("--prob-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Round the class probabilities to this before decoding, in memory and block-wise alike: float16 "
              "keeps block-wise images' probabilities in 2-3x less scratch, changing a few edge pixels "
              "(benchmarks/RESULTS.md).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="bf16 on CPUs with AMX or AVX512-BF16 (slightly different answers; fp32 elsewhere). auto: bf16 "
              "with OpenVINO on such a CPU (within 0.002 mean F1 of fp32, README: Speed), else fp32.")
@click.option("--overwrite", is_flag=True,
              help="Redo inputs whose label file exists, whatever settings made it (default: skip them, i.e. resume).")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="On a bad input: stop, or record it and go on.")
@click.option("--overlays", is_flag=True, help="Also write overlays/<name>.png with outlines on the image.")
@click.option("--rois", is_flag=True, help="Also write <name>.rois.zip, an ImageJ/Fiji ROI set.")
@click.option("--level", type=click.IntRange(min=0), default=0, show_default=True,
              help="Pyramid level of TIFF/SVS inputs (0 = full resolution); > 0 reads block-wise.")
@click.option("--blocks-above", "blocks_above", type=click.FloatRange(min=0), default=DEFAULT_THRESHOLD_MP,
              show_default=True, help="Images above this many megapixels are segmented block-wise "
              "(0: every image, inf: none).")
@click.option("--block-size", type=click.IntRange(min=64), default=DEFAULT_BLOCK_SIZE, show_default=True,
              help="Side of a block core in pixels, for block-wise images.")
@click.option("--block-margin", type=click.IntRange(min=0), default=DEFAULT_MARGIN, show_default=True,
              help="Context around each block in pixels (at least twice the largest nucleus diameter).")
@click.option("--geojson", is_flag=True, help="Also write <name>.geojson (QuPath outlines).")
@click.option("--format", "label_format", type=click.Choice(["ome-tiff", "ome-zarr"]), default="ome-tiff",
              show_default=True, help="Label files: <name>.tif, or <name>.ome.zarr (an NGFF labels pyramid, every "
              "image block-wise; with --address/--ray, --out a shared folder).")
@click.option("--review", "review_n", type=click.IntRange(min=0), default=10, show_default=True,
              help="End the summary with this many images of lowest predicted quality, to check first (0: none).")
@click.option("--min-quality", type=click.FloatRange(0, 1), default=None,
              help="Write the images whose predicted quality (mean F1) is below this to review.csv in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_size_options
@_ray_options
def segment(inputs, bundle_path, recursive, device, channel, page, out_dir, modality, unknown, tile_size, batch_size,
            workers, tta, overwrite, on_error, overlays, rois, review_n, min_quality, quiet, address, use_ray, actors,
            cpus_per_actor, gpus_per_actor, scratch, connect_timeout, level, blocks_above, block_size, block_margin,
            geojson, backend, prob_dtype, precision, label_format, diameter, use_pixel_size):
    """Segment nuclei in INPUT images (files, folders or globs) into label TIFFs.

    Writes <name>.tif (uint16/uint32 instance labels, 0 = background) per input and
    routing.csv (file, modality, confidence, OOD score, model used, decision, objects, seconds,
    quality, diameter, scale, size_source) in --out. Each image's median nucleus diameter is
    estimated (or --diameter, or the pixel size) and the image resized so its nuclei reach
    the size its segmenter was trained at; the labels are at the native resolution. An image
    unlike every modality the router was trained on gets the
    decision "unknown modality" and is handled as --unknown says; a forced --modality gets no
    such verdict. quality is a predicted mean F1 from the image's own probabilities and
    objects (no ground truth): the summary ends with the --review N lowest, and
    --min-quality Q writes every image below Q to review.csv.
    Inputs whose outputs exist and verify are skipped unless --overwrite, so an
    interrupted run resumes (with the settings recorded in segment_config.json); outputs
    asked for now (--overlays, --rois, --geojson) but missing or damaged are made from
    their label files. Rows missing from routing.csv are rebuilt from the label files.
    One run at a time per --out: a second is refused, naming the first one's pid.
    --out may not overwrite or shadow an input. Images above --blocks-above megapixels
    (and every --level > 0 or SVS input) are read lazily and segmented block by block
    into a tiled pyramidal TIFF, resumable from their finished blocks. Exit code 0 when
    every input was segmented or skipped; 1 when a bad input stopped the run (--on-error
    fail) or was skipped (--on-error skip, listed in failures.csv); 2 for a usage error.

    With --address (or --ray) the run goes to a Ray cluster (README: "Segmenting a large
    collection on a cluster"); inputs and --out may then be URIs (s3://...).
    """
    from tqdm import tqdm

    from triageseg.pipeline import Pipeline
    from triageseg.pipeline.blockwise.large import BlockOptions
    from triageseg.pipeline.local.batch import OutputConflict, check_outputs_apart

    try:
        blocks = BlockOptions(block_size=block_size, margin=block_margin, threshold_mp=blocks_above, level=level,
                              geojson=geojson, progress=not quiet, format=label_format)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--block-margin") from None
    on_ray = address is not None or use_ray
    if on_ray and label_format != "ome-tiff" and is_uri(out_dir):
        raise click.UsageError("--format ome-zarr on Ray needs --out on a shared folder, not a URI (images go "
                               "block-wise, and the block journal lives beside the labels)")
    if label_format == "ome-zarr":
        from triageseg.datasets.omezarr import ome_zarr_writer

        try:
            ome_zarr_writer()
        except ImportError as err:
            raise click.UsageError(str(err)) from None
    if scratch is not None and not on_ray:
        raise click.UsageError("--scratch is for runs on Ray (--address or --ray); a local run keeps each "
                               "block journal beside its labels")
    cluster_options = _cluster_options(device, workers, quiet, address, actors, cpus_per_actor,
                                       gpus_per_actor, scratch) if on_ray else None
    files, names = expand_inputs(inputs, recursive=recursive)
    if not on_ray and (is_uri(out_dir) or any(isinstance(f, str) for f in files)):
        raise click.UsageError("URI inputs or --out need a Ray run: add --ray or --address")
    out = out_dir if is_uri(out_dir) else Path(out_dir)
    try:
        if not is_uri(out_dir):
            local = [(f, n) for f, n in zip(files, names) if not isinstance(f, str)]
            check_outputs_apart([f for f, _ in local], [n for _, n in local], out, folders=input_folders(inputs),
                                recursive=recursive)
    except OutputConflict as err:
        raise click.BadParameter(str(err), param_hint="'--out'") from None
    if not on_ray:  # Ray actors set their own threads (--cpus-per-actor)
        from triageseg.segmenters.backends import configure_threads

        configure_threads(workers=workers)  # the network gets the cores the watershed workers leave
    with _backend_notes():
        pipe = Pipeline.from_bundle(bundle_path, device="cpu" if on_ray else device, tile_size=tile_size,
                                    batch_size=batch_size, tta=tta, unknown=unknown, backend=backend,
                                    precision=precision, diameter=diameter, use_pixel_size=use_pixel_size,
                                    prob_dtype=prob_dtype)
    for note in pipe.size_notes():
        click.echo(f"note: {note}", err=True)
    if modality is None:
        with _backend_notes():  # the router is exported here, on first use (`auto` may note a fallback)
            _notes(pipe)
    if on_ray:
        try:
            report = _segment_on_ray(pipe, files, names, out_dir, cluster_options, quiet=quiet,
                                     connect_timeout=connect_timeout, modality=modality, overwrite=overwrite,
                                     on_error=on_error, overlays=overlays, rois=rois, channel=channel, page=page,
                                     blocks=blocks)
        except OutputConflict as err:
            raise click.UsageError(str(err)) from None
        _summary(report, out, pipe=pipe, review_n=review_n, min_quality=min_quality)
        return
    bar = tqdm(total=len(files), unit="img", disable=quiet, desc="segment")
    try:
        report = pipe.segment_files(files, out, names=names, modality=modality, overwrite=overwrite,
                                    on_error=on_error, workers=workers, overlays=overlays, rois=rois,
                                    channel=channel, page=page, progress=lambda _p: bar.update(1), blocks=blocks)
    except OutputConflict as err:
        raise click.UsageError(str(err)) from None
    finally:
        bar.close()
    _summary(report, out, pipe=pipe, review_n=review_n, min_quality=min_quality)


def _review(report, out, *, pipe, review_n: int, min_quality: float | None) -> None:
    """The images to check first (lowest predicted quality) and, with ``min_quality``, review.csv."""
    from triageseg import bundle
    from triageseg.pipeline.local.records import REVIEW_CSV, ROUTING_CSV, _read_routing, review_rows, write_review
    from triageseg.postprocess.quality import load_quality

    # the whole output folder (a resumed run's earlier images too), else this run's rows
    rows = list(report.rows) if is_uri(str(out)) else list(_read_routing(Path(out) / ROUTING_CSV).values())
    unscored = sorted({r["used_model"] for r in rows if not str(r.get("quality", "")).strip()})
    missing = [m for m in unscored if m in pipe.available
               and load_quality(bundle.segmenter_dir(pipe.path, m)) is None]
    if missing:
        click.echo(f"note: no quality estimate for images of {', '.join(missing)}: no quality.json in the bundle "
                   "(trained before quality estimates); their quality is left empty", err=True)
    worst = review_rows(rows, n=review_n) if review_n else []
    if worst:
        click.echo(f"review first ({len(worst)} lowest predicted quality = mean F1, no ground truth):")
        width = max(len(r["output"]) for r in worst)
        for r in worst:
            click.echo(f"  {r['quality']:>6}  {r['output']:<{width}}  {r['used_model']}  ({r['decision']})")
    if min_quality is not None:
        below = review_rows(rows, below=min_quality)
        if is_uri(str(out)):
            import tempfile

            from triageseg.pipeline.cluster import storage

            with tempfile.TemporaryDirectory(prefix="triageseg-review-") as tmp:
                storage.upload(write_review(Path(tmp) / REVIEW_CSV, below), storage.join(str(out), REVIEW_CSV))
            target = storage.join(str(out), REVIEW_CSV)
        else:
            target = write_review(Path(out) / REVIEW_CSV, below)
        click.echo(f"{len(below)} image(s) below quality {min_quality:g} listed in {target}")


def _summary(report, out, *, pipe=None, review_n: int = 0, min_quality: float | None = None) -> None:
    """The closing lines of `segment`, local or on Ray; exit code 1 when any input failed."""
    for target, problem in report.incomplete:
        click.echo(f"note: {target} was incomplete ({problem}); segmented its input again", err=True)
    per_model = report.per_model()
    rate = f" ({len(report.written) / report.seconds:.2f} images/s)" if report.written and report.seconds > 0 else ""
    click.echo(
        f"segmented {len(report.written)} image(s), skipped {len(report.skipped)} already done, "
        f"{len(report.failures)} failed, in {report.seconds:.1f} s{rate} -> {out}"
    )
    if per_model:
        click.echo("models used: " + ", ".join(f"{k}: {v}" for k, v in per_model.items()))
    if getattr(report, "remade", None):
        click.echo(f"made {len(report.remade)} missing output(s) from the label files of skipped images")
    if getattr(report, "rebuilt", 0):
        click.echo(f"note: rebuilt {report.rebuilt} routing.csv row(s) from their label files", err=True)
    _unknown_summary(report)
    if pipe is not None:
        _review(report, out, pipe=pipe, review_n=review_n, min_quality=min_quality)
    for path, problem in report.failures:
        click.echo(f"failed: {path}: {problem}", err=True)
    if report.failures:
        listed = f"{out}/failures.csv" if is_uri(str(out)) else Path(out) / "failures.csv"
        click.echo(f"failures listed in {listed}", err=True)
        raise SystemExit(1)


def _backend_notes():
    """Print a backend fallback (segmenters.backends.BackendNote) as one `note:` line, not a Python warning."""
    import contextlib
    import warnings

    @contextlib.contextmanager
    def catch():
        from triageseg.segmenters.backends import BackendNote

        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", BackendNote)
            yield
        for w in seen:
            if issubclass(w.category, BackendNote):
                click.echo(f"note: {w.message}", err=True)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    return catch()


def _notes(pipe) -> None:
    """Load the router up front and print what it cannot do (no OOD statistics: no unknown-modality check)."""
    for note in pipe.load_router():
        click.echo(f"note: {note}", err=True)


def _unknown_summary(report) -> None:
    """The unknown-modality lines of the summary: how many, and which were skipped."""
    unknown = getattr(report, "unknown", [])
    if not unknown:
        return
    skipped = set(map(str, getattr(report, "unknown_skipped", [])))
    segmented = len(unknown) - len(skipped)
    click.echo(f"{len(unknown)} unknown-modality image(s) (unlike every trained modality; decision 'unknown "
               f"modality' in routing.csv): {segmented} segmented by the fallback, {len(skipped)} skipped")
    for path, decision in unknown:
        click.echo(f"  {'skipped' if str(path) in skipped else 'check'}: {path}: {decision}")


segment.resumes_by_rerun = True  # the interrupt message names the command to run again


@cli.command("route")
@click.argument("inputs", nargs=-1, required=True)
@_common_options
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None, help="Also write the table as CSV.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="On a bad input: stop, or record it and go on.")
def route(inputs, bundle_path, recursive, device, channel, page, csv_out, on_error):
    """Triage only: print the modality, confidence and the model that would run for each INPUT."""
    import csv
    import io

    from triageseg.datasets.atomic import write_text_atomic
    from triageseg.datasets.io import read_image
    from triageseg.pipeline import Pipeline

    files, _ = expand_inputs(inputs, recursive=recursive)
    pipe = Pipeline.from_bundle(bundle_path, device=device)
    _notes(pipe)
    rows, failures = [], []
    for path in files:
        try:
            pred = pipe.route([read_image(path, channel=channel, page=page)])[0]
        except DataError as err:
            if on_error == "fail":
                raise
            failures.append((path, str(err)))
            continue
        used, decision = pipe.choose(pred)
        score = "" if pred.ood_score is None else f"{pred.ood_score:.4g}"
        verdict = "unknown" if decision.startswith("unknown modality") else ("" if pred.ood_score is None else "known")
        rows.append({"file": str(path), "modality": pred.modality, "confidence": f"{pred.confidence:.4f}",
                     "ood_score": score, "verdict": verdict, "used_model": used, "decision": decision})
    width = max([len(r["file"]) for r in rows] + [4])
    if pipe.ood_threshold is not None:
        click.echo(f"OOD threshold {pipe.ood_threshold:.4g}: a higher score is an unknown modality")
    click.echo(f"{'file':<{width}}  {'modality':<14} {'conf':>6} {'ood':>9} {'verdict':<8} model")
    for r in rows:
        click.echo(f"{r['file']:<{width}}  {r['modality']:<14} {r['confidence']:>6} {r['ood_score']:>9} "
                   f"{r['verdict']:<8} {r['used_model'] or '(skip)'}")
    if csv_out:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(csv_out, buf.getvalue())
    for path, problem in failures:
        click.echo(f"failed: {problem}", err=True)
    if failures:
        raise SystemExit(1)


def _cluster_options(device, workers, quiet, address, actors, cpus_per_actor, gpus_per_actor, scratch=None):
    """The Ray options of `segment`, checked before anything is loaded."""
    from triageseg.pipeline.cluster.distributed import ClusterOptions, parse_actors

    if workers:
        raise click.UsageError("--workers is for local runs; on Ray, size the pools with --actors")
    if device not in ("auto", "cpu", "cuda") or (device == "cuda" and gpus_per_actor <= 0):
        raise click.UsageError("on Ray the device follows --gpus-per-actor (> 0: cuda, else cpu); "
                               f"--device {device} cannot be honoured")
    try:
        parse_actors(actors)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--actors") from None
    return ClusterOptions(address=address, actors=actors, cpus_per_actor=cpus_per_actor,
                          gpus_per_actor=gpus_per_actor, progress=not quiet, scratch=scratch)


def _segment_on_ray(pipe, files, names, out_dir, cluster_options, *, quiet, connect_timeout, **options):
    """The Ray half of `segment`: connect (or start a local Ray for the run) and run the passes."""
    from triageseg.pipeline.cluster.distributed import segment_files_ray
    from triageseg.ray_cluster import ray_connection

    log = lambda message: click.echo(message, err=True)  # noqa: E731
    with ray_connection(cluster_options.address, quiet=quiet, log=log, connect_timeout=connect_timeout):
        return segment_files_ray(pipe, files, out_dir, names=names, cluster_options=cluster_options, log=log,
                                 **options)
