"""``triageseg export bioimageio`` and ``triageseg import bioimageio``: bioimage.io packages out and in."""

from __future__ import annotations

import click

from triageseg.cli.groups import CONTEXT, ErrorHandlingGroup, cli


@cli.group("export", cls=ErrorHandlingGroup, context_settings=CONTEXT)
def export_group() -> None:
    """Write models of a bundle in other tools' formats."""


@cli.group("import", cls=ErrorHandlingGroup, context_settings=CONTEXT)
def import_group() -> None:
    """Add models from other tools' formats to a bundle."""


@export_group.command("bioimageio")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "name", required=True,
              help="A specialist (modality), _generalist, or router (the modality classifier).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Package to write (.zip).")
@click.option("--overwrite", is_flag=True, help="Replace an existing package file.")
@click.option("--float16", is_flag=True, help="Store the weights in fp16 (half the size; computes in fp32).")
@click.option("--test/--no-test", "run_test", default=True, show_default=True,
              help="Validate with bioimageio.spec and run bioimageio.core's test of every weight format.")
def export_bioimageio(bundle_dir, name, out, overwrite, float16, run_test):
    """Export a model of BUNDLE_DIR as a bioimage.io package (format 0.5)."""
    from triageseg.export.common import core_test, validate_package

    if name == "router":
        from triageseg.export.router import export_router

        result = export_router(bundle_dir, out, overwrite=overwrite, float16=float16)
    else:
        from triageseg.export.specialist import export_segmenter

        result = export_segmenter(bundle_dir, name, out, overwrite=overwrite, float16=float16)
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.weights_dtype} weights, "
               f"{result.seconds:.1f} s)")
    if run_test:
        ok, text = validate_package(result.path)
        click.echo(f"bioimageio.spec validation: {'passed' if ok else 'FAILED'}")
        verdicts = {wf: core_test(result.path, wf) for wf in ("pytorch_state_dict", "torchscript")}
        for wf, (passed, _) in verdicts.items():
            click.echo(f"bioimageio.core test, {wf}: {'passed' if passed else 'FAILED'}")
        if not ok or not all(p for p, _ in verdicts.values()):
            bad = text if not ok else next(t for p, t in verdicts.values() if not p)
            raise click.ClickException("the package did not pass the zoo's checks:\n" + bad[-4000:])


@import_group.command("bioimageio")
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--as", "name", required=True, help="Name of the specialist in the bundle (usually a modality).")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Dataset whose val images tune the watershed for the imported model.")
@click.option("--trust", is_flag=True,
              help="Allow a foreign package's TorchScript (code) into the bundle; it runs whenever the bundle segments.")
@click.option("--overwrite", is_flag=True, help="Replace an existing specialist of that name.")
def import_bioimageio(package, bundle_dir, name, data, trust, overwrite):
    """Add the model of a bioimage.io PACKAGE to a bundle as a specialist."""
    from triageseg.export.importer import import_package

    result = import_package(package, bundle_dir, name, trust=trust, data=data, overwrite=overwrite, log=click.echo)
    tuned = f", watershed tuned (val mean F1 {result.tuned_score:.4f})" if result.tuned_score is not None else ""
    click.echo(f"added {result.run_dir} ({result.kind}, outputs {result.mapping}){tuned}")
