"""``triageseg tune``: per-modality hyperparameter sweeps with Ray Tune."""

from __future__ import annotations

import click

from triageseg.cli.groups import CONTEXT, cli
from triageseg.ray_cluster import DEFAULT_CONNECT_TIMEOUT_S


@cli.command("tune", context_settings=CONTEXT)
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset folder (images/, labels/, modalities.csv, splits.csv); the same path on every node.")
@click.option("--modality", default="all", show_default=True,
              help="Modality to tune, or 'all' for every modality of the dataset in turn.")
@click.option("--num-samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Trials per modality.")
@click.option("--search", type=click.Choice(["random", "optuna"]), default="random", show_default=True,
              help="Search algorithm (optuna needs: pip install 'triageseg[optuna]').")
@click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default="asha", show_default=True,
              help="asha stops poor trials early on their per-epoch F1; fifo runs every trial to the end.")
@click.option("--cpus-per-trial", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="CPUs reserved per trial (also its torch threads).")
@click.option("--gpus-per-trial", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="GPUs per trial; fractions share a GPU (0.5 = two trials per GPU).")
@click.option("--max-concurrent", default=0, show_default=True, type=click.IntRange(min=0),
              help="Most trials at once (0 = as many as the resources allow).")
@click.option("--address", default=None,
              help="Join an existing Ray cluster: 'auto' (this machine is a node) or HOST:PORT. "
                   "Default: start a local Ray for this run.")
@click.option("--connect-timeout", default=DEFAULT_CONNECT_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the cluster at --address before giving up.")
@click.option("--storage", default=None,
              help="Where results and checkpoints go: a path or a URI (s3://BUCKET/prefix). "
                   "A cluster with several nodes needs shared storage (NFS path or s3://). "
                   "Default: OUT/ray_results.")
@click.option("--name", default="sweep", show_default=True,
              help="Experiment name; each modality's sweep is STORAGE/NAME_MODALITY.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted sweep (same --name/--storage/--out); errored trials are retried.")
@click.option("--max-failures", default=0, show_default=True, type=click.IntRange(min=0),
              help="Retries of a crashed trial, from its last checkpoint.")
@click.option("--space", "space_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON/YAML file overriding the search space (see triageseg.tuning.space).")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Pin the number of epochs (removes it from the search).")
@click.option("--steps-per-epoch", default=None, type=click.IntRange(min=1), help="Pin steps per epoch.")
@click.option("--base-config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TrainConfig JSON every trial starts from (encoder, steps, seed...); the searched "
                   "parameters replace its values.")
@click.option("--bundle", default=None, type=click.Path(file_okay=False),
              help="Copy each modality's best model (weights + tuned watershed) into this bundle.")
@click.option("--out", default="tune_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for OUT/MODALITY/{best_config.json, trials.csv, f1_per_trial.png, sweep.json}.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the search and of training.")
@click.option("--quiet", is_flag=True, help="No Ray Tune progress tables.")
def tune_command(data, modality, num_samples, search, scheduler, cpus_per_trial, gpus_per_trial,
                 max_concurrent, address, connect_timeout, storage, name, resume, max_failures, space_file,
                 epochs,
                 steps_per_epoch, base_config, bundle, out, seed, quiet) -> None:
    """Search training hyperparameters per modality with Ray Tune.

    Each trial trains a specialist with the same function as `triageseg train segmenter`,
    reports the validation mean F1 after every epoch, and at the end the F1 after tuning
    the watershed on its validation predictions. Per modality it writes
    OUT/MODALITY/best_config.json (for `triageseg train segmenter --config`), trials.csv,
    f1_per_trial.png and sweep.json. Cluster set-up: README.md, "Tuning on a GPU cluster".

    \b
    Examples:
      triageseg tune --data data/ --modality he --num-samples 16
      triageseg tune --data /nfs/data --modality all --address auto \\
          --gpus-per-trial 0.5 --storage s3://bucket/tune --bundle bundle/
      triageseg tune --data data/ --modality he --resume
    """
    from triageseg.tuning.sweep import SweepConfig, run_sweeps, summary_table

    cfg = SweepConfig(
        data=data, modality=modality, num_samples=num_samples, search=search, scheduler=scheduler,
        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
        address=address, connect_timeout=connect_timeout, storage=storage, name=name, resume=resume,
        max_failures=max_failures,
        space_file=space_file, epochs=epochs, steps_per_epoch=steps_per_epoch, base_config=base_config,
        out=out, bundle=bundle, seed=seed, verbose=0 if quiet else 1,
    )
    results = run_sweeps(cfg, log=lambda message: click.echo(message, err=True))
    click.echo(summary_table(results))
    for modality_name, result in results.items():
        click.echo(f"{modality_name}: {result.best_config_path}")
