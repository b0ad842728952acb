"""Tuning: search spaces, the trainable, and real Ray Tune sweeps on tiny synthetic data.

The sweeps train a 0.5M-parameter Unet (timm ``test_resnet`` encoder, 16-channel
decoder) on 64x64 images for 2-4 epochs of one step, so a trial takes seconds; they run
locally on a 2-CPU Ray shared by the module, against a real ``ray start --head``
cluster, through a killed-and-resumed sweep, and with trials that crash on purpose.
No test leaves a Ray process behind (checked at the end of the module).
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from triageseg.datasets.errors import DataError
from triageseg.tuning import space as spaces
from triageseg.ray_cluster import check_storage, resolve_storage
from triageseg.tuning.sweep import make_scheduler, make_searcher
from triageseg.tuning.trainable import build_train_config, export_model, parse_inject_failures

VENV_BIN = Path(sys.executable).parent
# Environment for Ray in these tests: no usage stats, no uv runtime env, quiet snapshots,
# and no token authentication for the local Rays (which would create ~/.ray/auth_token).
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "HF_HUB_OFFLINE": "1",
}
MODALITY = "fluorescence"


# --------------------------------------------------------------------------- fixtures


def _raylet_pids() -> set[int]:
    if shutil.which("pgrep"):
        out = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"raylet" in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind():
    """Fails the module if any raylet started by its tests is still running at the end."""
    before = _raylet_pids()
    yield
    deadline = time.monotonic() + 20
    while (left := _raylet_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left behind: raylet pids {sorted(left)}"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Six 64x64 fluorescence images: 4 train, 1 val, 1 test."""
    from triageseg.datasets.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("tune") / "data", n=6, size=64, modalities=(MODALITY,), seed=0)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A base TrainConfig (tiny model, one step per epoch) and a search space pinned to it."""
    from triageseg.segmenters.train import TrainConfig

    folder = tmp_path_factory.mktemp("tune_cfg")
    base = TrainConfig(
        encoder="tu-test_resnet", decoder_channels=(16, 16, 16, 16, 16), epochs=2, steps_per_epoch=1,
        batch_size=2, crop_size=64, tile_size=64, overlap=16, max_val_images=1,
    )
    base.to_json(folder / "base.json")
    # "1e-3" without a dot is a string to PyYAML: the space loader must coerce it.
    (folder / "space.yaml").write_text(
        "crop_size: 64\n"
        "batch_size: 2\n"
        "epochs: 2\n"
        "lr: {type: loguniform, low: 1e-3, high: 1e-2}\n"
        "boundary_width: {type: randint, low: 1, high: 2}\n"
    )
    return folder


@pytest.fixture(scope="module")
def local_ray():
    """One 2-CPU local Ray for the module's in-process sweeps (the CLI reuses it).

    Its session folder (and those of the Rays the module's subprocesses start) goes to a
    temp dir of ours, removed at the end; short, for Ray's socket paths.
    """
    import ray

    temp_root = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        mp.setenv("RAY_TMPDIR", temp_root)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp_root, ignore_errors=True)


def _tune_args(data, files, out, *extra) -> list[str]:
    return ["tune", "--data", str(data), "--modality", MODALITY, "--space", str(files / "space.yaml"),
            "--base-config", str(files / "base.json"), "--out", str(out), "--quiet", *map(str, extra)]


def _invoke(args):
    from triageseg.cli.main import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _rows(out: Path) -> list[dict]:
    with open(out / MODALITY / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _result_lines(exp: Path, trial_id: str) -> list[dict]:
    path = exp / f"trial_{trial_id}" / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _child_env(**extra) -> dict[str, str]:
    return {**os.environ, **RAY_ENV, **extra}


def _kill_group(pgid: int) -> None:
    """SIGTERM then SIGKILL every process of a process group this test started."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


# --------------------------------------------------------------------------- search spaces


@pytest.mark.parametrize("modality", ["fluorescence", "brightfield", "he", "some_new_modality"])
def test_default_spaces_are_valid_and_cover_every_tunable(modality):
    space = spaces.resolve_space(modality)
    assert sorted(space) == sorted(spaces.TUNABLE)
    assert spaces.validate_space(space) == space


def test_stained_modalities_get_wider_augmentation():
    fluo = spaces.resolve_space("fluorescence")["aug_strength"]
    for stained in ("brightfield", "he", "ihc"):
        spec = spaces.resolve_space(stained)["aug_strength"]
        assert spec["high"] > fluo["high"] and spec["high"] - spec["low"] >= fluo["high"] - fluo["low"] - 1e-9
    assert spaces.resolve_space("he")["boundary_weight"]["high"] > spaces.resolve_space("fluorescence")[
        "boundary_weight"]["high"]


def test_unknown_parameter_is_refused_listing_the_valid_ones(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"learning_rate": {"type": "uniform", "low": 0, "high": 1}}))
    with pytest.raises(DataError, match="unknown hyperparameter 'learning_rate'; valid: lr, weight_decay") as err:
        spaces.load_space_file(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="valid: lr, weight_decay, boundary_weight"):
        spaces.validate_space({"modalities_typo": 1})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "gaussian", "low": 0, "high": 1},
         "unknown type 'gaussian'; valid: loguniform, uniform, randint, choice"),
        ({"type": "uniform", "low": 1.0}, r"missing high \(a uniform spec has: low, high\)"),
        ({"type": "uniform", "low": 1.0, "high": 1.0}, r"low \(1.0\) must be < high \(1.0\)"),
        ({"type": "loguniform", "low": 0.0, "high": 1.0}, "loguniform needs low > 0"),
        ({"type": "randint", "low": 1.5, "high": 3}, "must be an integer"),
        ({"type": "choice", "values": []}, "non-empty list"),
        ({"type": "uniform", "low": "abc", "high": 1}, "must be a number"),
        ({"type": "uniform", "low": 0, "high": 1, "step": 0.1}, "unexpected step"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        spaces.validate_space({"dice_weight": spec})


def test_yaml_overrides_apply_per_modality_and_coerce_numbers(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "lr: {type: loguniform, low: 1e-4, high: 1e-2}\n"
        "epochs: 3\n"
        "modalities:\n"
        "  he:\n"
        "    aug_strength: {type: uniform, low: 0.5, high: 1.0}\n"
    )
    overrides = spaces.load_space_file(path)
    he = spaces.resolve_space("he", overrides=overrides)
    fluo = spaces.resolve_space("fluorescence", overrides=overrides)
    assert he["lr"] == fluo["lr"] == {"type": "loguniform", "low": 1e-4, "high": 1e-2}
    assert he["epochs"] == fluo["epochs"] == 3
    assert he["aug_strength"] == {"type": "uniform", "low": 0.5, "high": 1.0}
    assert fluo["aug_strength"] == spaces.MODALITY_SPACES["fluorescence"]["aug_strength"]
    # Values pinned by the caller (--epochs) win over the file.
    assert spaces.resolve_space("he", overrides=overrides, fixed={"epochs": 7})["epochs"] == 7
    assert spaces.sampled_names(he) == [k for k in he if k != "epochs"]


def test_space_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(DataError, match="not valid YAML"):
        spaces.load_space_file(bad)
    other = tmp_path / "space.toml"
    other.write_text("")
    with pytest.raises(DataError, match=r"unknown space file type '.toml'; valid: .json, .yaml, .yml"):
        spaces.load_space_file(other)
    with pytest.raises(DataError, match="not found"):
        spaces.load_space_file(tmp_path / "missing.json")


def test_to_tune_samples_stay_inside_the_space():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = spaces.resolve_space("he", fixed={"epochs": 5})
    tuned = spaces.to_tune(space)
    assert tuned["epochs"] == 5
    assert isinstance(tuned["lr"], Float) and isinstance(tuned["boundary_width"], Integer)
    assert isinstance(tuned["boundary_mode"], Categorical)
    rng = np.random.default_rng(0)
    widths = {int(tuned["boundary_width"].sample(random_state=rng)) for _ in range(200)}
    # randint in a space file includes both ends (tune.randint excludes the upper one).
    assert widths == set(range(space["boundary_width"]["low"], space["boundary_width"]["high"] + 1))
    lrs = [tuned["lr"].sample(random_state=rng) for _ in range(200)]
    assert space["lr"]["low"] <= min(lrs) and max(lrs) <= space["lr"]["high"]


def test_corner_values_touch_every_choice_and_bound():
    space = spaces.resolve_space("fluorescence")
    rows = spaces.corner_values(space)
    for name, spec in space.items():
        seen = {row[name] for row in rows}
        if spec["type"] == "choice":
            assert seen == set(spec["values"])
        else:
            assert {spec["low"], spec["high"]} <= seen


# --------------------------------------------------------------------------- trainable helpers


def test_build_train_config_coerces_sampled_types_and_refuses_unknown_fields():
    from triageseg.segmenters.train import TrainConfig

    base = TrainConfig(modality="he")
    cfg = build_train_config(base, {"lr": np.float64(0.002), "boundary_width": np.int64(3), "crop_size": 128.0,
                                    "boundary_mode": "all"})
    assert (cfg.lr, cfg.boundary_width, cfg.crop_size, cfg.boundary_mode) == (0.002, 3, 128, "all")
    assert type(cfg.boundary_width) is int and type(cfg.lr) is float and type(cfg.crop_size) is int
    json.dumps(cfg.to_dict())
    with pytest.raises(ValueError, match="not TrainConfig fields: learning_rate; valid: "):
        build_train_config(base, {"learning_rate": 1.0})
    with pytest.raises(ValueError, match="crop_size: expected an integer"):
        build_train_config(base, {"crop_size": 100.5})
    for row in spaces.corner_values(spaces.resolve_space("he")):
        build_train_config(base, row)  # every default bound and choice is a valid TrainConfig


def test_parse_inject_failures():
    assert parse_inject_failures(None) == {}
    assert parse_inject_failures("0:1, 2:5,3") == {0: 1, 2: 5, 3: 1}
    with pytest.raises(ValueError, match="TRIAGESEG_TUNE_INJECT_FAILURES='x:1'"):
        parse_inject_failures("x:1")


def test_export_model_copies_only_the_model_files(tmp_path):
    ckpt = tmp_path / "checkpoint_000003"
    (ckpt / "checkpoint").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "postprocess.json", "history.csv", "history.json",
                 "curves.png", "quality.json"):
        (ckpt / name).write_text(name)
    (ckpt / "checkpoint" / "last.pt").write_text("optimizer state")
    dest = tmp_path / "bundle" / "segmenters" / "he"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old model")
    names = export_model(ckpt, dest)
    assert names == sorted(p.name for p in dest.iterdir())
    assert names == ["config.json", "curves.png", "history.csv", "history.json", "model.safetensors",
                     "postprocess.json", "quality.json"]
    assert not list(dest.parent.glob(".*")), "no temporary folders left"
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(DataError, match="no model.safetensors in the trial checkpoint"):
        export_model(ckpt, tmp_path / "other")


# --------------------------------------------------------------------------- sweep helpers


def test_local_storage_is_refused_on_a_multi_node_cluster(tmp_path):
    messages = []
    with pytest.raises(ValueError, match=r"has 3 nodes; .*NFS.*s3://BUCKET"):
        check_storage(str(tmp_path), address="10.0.0.1:6379", n_nodes=3, log=messages.append)
    check_storage(str(tmp_path), address="10.0.0.1:6379", n_nodes=1, log=messages.append)
    assert len(messages) == 1 and messages[0].startswith("warning: --storage") and "s3://" in messages[0]
    check_storage("s3://bucket/tune", address="10.0.0.1:6379", n_nodes=3, log=messages.append)
    check_storage(str(tmp_path), address=None, n_nodes=1, log=messages.append)
    assert len(messages) == 1
    assert resolve_storage(None, tmp_path / "out") == str((tmp_path / "out" / "ray_results").resolve())
    assert resolve_storage("s3://b/p", "out") == "s3://b/p"
    assert resolve_storage("file:///data/x", "out") == "/data/x"


def test_trials_that_cannot_be_placed_are_refused_locally_and_warned_on_a_cluster(tiny_data):
    from triageseg.tuning.sweep import SweepConfig, check_resources

    cluster = {"nodes": 1, "CPU": 2.0, "GPU": 0.0}
    with pytest.raises(ValueError, match=r"--gpus-per-trial 0.5, but this machine has 0 GPUs"):
        check_resources(SweepConfig(data=tiny_data, gpus_per_trial=0.5), cluster)
    with pytest.raises(ValueError, match=r"--cpus-per-trial 4, but this machine has 2 CPUs"):
        check_resources(SweepConfig(data=tiny_data, cpus_per_trial=4), cluster)
    messages = []
    check_resources(SweepConfig(data=tiny_data, gpus_per_trial=0.5, address="auto"), cluster, log=messages.append)
    assert len(messages) == 1 and "trials wait until nodes with enough GPUs join" in messages[0]
    check_resources(SweepConfig(data=tiny_data, cpus_per_trial=2), cluster, log=messages.append)
    assert len(messages) == 1


def test_scheduler_and_searcher_factories():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = make_scheduler("asha", max_epochs=8)
    assert isinstance(asha, ASHAScheduler)
    # One past the last epoch: a trial is never stopped merely for reaching its end,
    # so it still tunes its watershed and reports the tuned F1.
    assert asha._max_t == 9
    assert isinstance(make_scheduler("fifo", max_epochs=8), FIFOScheduler)
    with pytest.raises(ValueError, match="unknown scheduler 'pbt'; valid: asha, fifo"):
        make_scheduler("pbt", max_epochs=8)
    with pytest.raises(ValueError, match="unknown search algorithm 'grid'; valid: random, optuna"):
        make_searcher("grid", seed=0)


def test_optuna_missing_gives_a_clear_message(tiny_data, tmp_path):
    try:
        import optuna  # noqa: F401

        pytest.skip("optuna is installed")
    except ImportError:
        pass
    result = _invoke(["tune", "--data", str(tiny_data), "--modality", MODALITY, "--search", "optuna",
                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "--search optuna needs Optuna, which is not installed: pip install 'triageseg[optuna]'" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_space_and_unknown_modality_before_starting_ray(tiny_data, tmp_path):
    space = tmp_path / "space.json"
    space.write_text('{"lr": 0.1, "momentum": 0.9}')
    result = _invoke(["tune", "--data", str(tiny_data), "--modality", MODALITY, "--space", str(space)])
    assert result.exit_code == 1 and "unknown hyperparameter 'momentum'; valid: lr" in result.output
    result = _invoke(["tune", "--data", str(tiny_data), "--modality", "he"])
    assert result.exit_code == 1 and "no images of modality 'he'; valid: fluorescence, all" in result.output
    result = _invoke(["tune", "--help"])
    assert result.exit_code == 0 and "--gpus-per-trial" in result.output and "--resume" in result.output


def test_cluster_example_is_a_valid_ray_up_config():
    import yaml

    path = Path(__file__).resolve().parents[1] / "tuning" / "cluster.example.yaml"
    config = yaml.safe_load(path.read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "file_mounts", "docker"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU types
    assert any("triageseg" in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])
    text = path.read_text()
    assert "s3://" in text and "NFS" in text
    # Ray's own schema and validator for `ray up` configs.
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))


# --------------------------------------------------------------------------- real sweeps


def test_local_sweep_writes_best_config_trials_plot_and_bundle(local_ray, tiny_data, tiny_files, tmp_path):
    from triageseg.segmenters.train import TrainConfig

    out, bundle = tmp_path / "out", tmp_path / "bundle"
    start = time.perf_counter()
    result = _invoke(_tune_args(tiny_data, tiny_files, out, "--num-samples", 3, "--bundle", bundle, "--seed", 3))
    wall = time.perf_counter() - start
    assert result.exit_code == 0, result.output

    rows = _rows(out)
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    assert {r["status"] for r in rows} <= {"completed", "pruned"}
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed, rows
    for r in rows:
        assert 1e-3 <= float(r["lr"]) <= 1e-2 and r["crop_size"] == "64" and r["boundary_width"] in ("1", "2")
        assert r["num_failures"] == "0" and r["error"] == ""
    for r in completed:
        assert r["epochs_done"] == "2" and 0.0 <= float(r["tuned_f1"]) <= 1.0
        # best_f1 is the best of every report: the epochs' default-watershed F1s and the tuned one.
        assert float(r["best_f1"]) == max(float(r["tuned_f1"]), float(r["best_epoch_f1"]))
        assert r["final_f1"] == r["tuned_f1"]
    best = min(completed, key=lambda r: (-float(r["tuned_f1"]), r["trial_id"]))

    # best_config.json: the base config with the best trial's parameters, loadable as a TrainConfig.
    cfg = TrainConfig.from_json(out / MODALITY / "best_config.json")
    base = TrainConfig.from_json(tiny_files / "base.json")
    assert cfg.modality == MODALITY and cfg.encoder == base.encoder and cfg.epochs == 2
    assert cfg.lr == float(best["lr"]) and cfg.boundary_width == int(best["boundary_width"])
    assert cfg.aug_strength == float(best["aug_strength"]) and cfg.boundary_mode == best["boundary_mode"]
    assert (out / MODALITY / "f1_per_trial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / MODALITY / "sweep.json").read_text())
    assert summary["result"]["best_trial_id"] == best["trial_id"] and summary["result"]["n_trials"] == 3
    assert f"{MODALITY}" in result.output and best["trial_id"] in result.output

    # The bundle holds the best trial's finished model and its tuned watershed parameters.
    run = bundle / "segmenters" / MODALITY
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "curves.png", "history.csv", "history.json", "model.safetensors", "postprocess.json",
        "quality.json"]
    history = json.loads((run / "history.json").read_text())
    assert history["final"]["val_mean_f1_tuned"] == float(best["tuned_f1"])
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == cfg.lr
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["segmenters"] == [MODALITY] and manifest["tuning"][MODALITY]["trial_id"] == best["trial_id"]
    # No trial left a copy of its run folder in the experiment (the checkpoints hold it).
    exp = out / "ray_results" / f"sweep_{MODALITY}"
    assert not list(exp.glob("trial_*/run"))
    # ... and every trial removed its scratch run folder from its Ray working directory.
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    work_dirs = list(session.glob(f"artifacts/*/sweep_{MODALITY}/working_dirs/trial_*"))
    assert {p.name for p in work_dirs} >= {f"trial_{r['trial_id']}" for r in completed}
    assert not [p for d in work_dirs for p in d.glob("triageseg-run-*")]

    # The same command again does not overwrite the finished sweep.
    again = _invoke(_tune_args(tiny_data, tiny_files, out, "--num-samples", 3))
    assert again.exit_code == 1 and "a sweep already exists" in again.output and "--resume" in again.output

    # best_config.json trains a model through `triageseg train segmenter --config`.
    trained = _invoke(["train", "segmenter", "--data", str(tiny_data),
                       "--out", str(tmp_path / "retrained"),
                       "--config", str(out / MODALITY / "best_config.json"), "--epochs", "1", "--device", "cpu",
                       "--quiet"])
    assert trained.exit_code == 0, trained.output
    retrained = tmp_path / "retrained" / "segmenters" / MODALITY
    assert (retrained / "model.safetensors").is_file()
    assert json.loads((retrained / "config.json").read_text())["train"]["lr"] == cfg.lr
    print(f"\nlocal sweep: 3 trials in {wall:.1f} s; best {best['trial_id']} tuned F1 {best['tuned_f1']}")


def test_resume_without_a_sweep_is_refused(local_ray, tiny_data, tiny_files, tmp_path):
    result = _invoke(_tune_args(tiny_data, tiny_files, tmp_path / "out", "--resume", "--name", "nothing"))
    assert result.exit_code == 1
    assert f"--resume: no sweep to resume at {tmp_path / 'out' / 'ray_results' / 'nothing_'}{MODALITY}" in result.output


# Slow: the default suite must stay under 10 minutes on 2 cores (retries of crashing trials: 15 s).
@pytest.mark.slow
def test_crashing_trials_are_retried_and_reported_not_fatal(local_ray, tiny_data, tiny_files, tmp_path,
                                                            monkeypatch):
    # Trial 0 raises once after its first epoch (retried from that checkpoint);
    # trial 1 raises every time and exhausts its one retry.
    monkeypatch.setenv("TRIAGESEG_TUNE_INJECT_FAILURES", "0:1,1:5")
    out = tmp_path / "out"
    result = _invoke(_tune_args(tiny_data, tiny_files, out, "--num-samples", 2, "--scheduler", "fifo",
                                "--max-failures", 1))
    assert result.exit_code == 0, result.output
    rows = {r["trial_id"].rsplit("_", 1)[-1]: r for r in _rows(out)}
    assert rows["00000"]["status"] == "completed" and rows["00000"]["num_failures"] == "1"
    assert rows["00000"]["error"] == "" and rows["00000"]["epochs_done"] == "2"
    assert rows["00001"]["status"] == "error" and rows["00001"]["num_failures"] == "2"
    assert "InjectedFailure: injected failure 2/5 of trial 1" in rows["00001"]["error"]
    assert rows["00001"]["tuned_f1"] == ""
    assert "1 errored" in result.output
    # The retry continued from the checkpoint of epoch 1 instead of starting over.
    lines = _result_lines(out / "ray_results" / f"sweep_{MODALITY}", rows["00000"]["trial_id"])
    epoch2 = [d for d in lines if d.get("epoch") == 2]
    assert epoch2 and epoch2[-1]["iterations_since_restore"] == 1 and epoch2[-1]["training_iteration"] == 2
    cfg = json.loads((out / MODALITY / "best_config.json").read_text())
    assert cfg["lr"] == float(rows["00000"]["lr"])


# Slow: the default suite must stay under 10 minutes on 2 cores (a killed sweep resumed: 27 s).
@pytest.mark.slow
def test_killed_sweep_resumes_and_finishes(local_ray, tiny_data, tiny_files, tmp_path):
    out = tmp_path / "out"
    exp = out / "ray_results" / f"sweep_{MODALITY}"
    # 5 epochs of 20 steps: seconds of training left after the second checkpoint, so the
    # kill (within ~0.2 s of seeing it) lands mid-trial.
    args = _tune_args(tiny_data, tiny_files, out, "--num-samples", 2, "--scheduler", "fifo", "--epochs", 5,
                      "--steps-per-epoch", 20)
    # The interrupted run is a real `triageseg tune` process with its own local Ray;
    # experiment state is snapshotted at every step so the kill can land right after a checkpoint.
    # Its Ray session and the trials' scratch folders go to a temp dir of ours (short, for
    # Ray's socket paths), removed afterwards: a killed trial cannot clean up after itself.
    temp_dir = tempfile.mkdtemp(prefix="tt", dir="/tmp")
    proc = subprocess.Popen([str(VENV_BIN / "triageseg"), *args],
                            env=_child_env(TUNE_GLOBAL_CHECKPOINT_S="0", TMPDIR=temp_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        # A trial's latest result names its newest checkpoint in the experiment state a
        # moment before the checkpoint itself is registered there; once a result names
        # checkpoint_000001, checkpoint_000000 is registered and a resume must use it.
        while time.monotonic() < deadline and proc.poll() is None:
            states = list(exp.glob("experiment_state-*.json"))
            if any(re.search(r"checkpoint_00000[1-9]", p.read_text(errors="ignore")) for p in states):
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"sweep ended before it could be interrupted: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray die together, as on a lost machine
        proc.wait(timeout=30)
    finally:
        _kill_group(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MODALITY / "trials.csv").exists()

    result = _invoke([*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    rows = _rows(out)
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs_done"] == "5" for r in rows), rows
    # At least one trial continued from its checkpoint rather than from scratch.
    lines = {r["trial_id"]: _result_lines(exp, r["trial_id"]) for r in rows}
    restored = [d for ds in lines.values() for d in ds if d["iterations_since_restore"] < d["training_iteration"]]
    assert restored, {k: [(d.get("epoch"), d["training_iteration"], d["iterations_since_restore"]) for d in v]
                      for k, v in lines.items()}
    assert (out / MODALITY / "best_config.json").is_file()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Slow: the default suite must stay under 10 minutes on 2 cores (a sweep on a started cluster: 28 s;
# the local sweep and the cluster tests of test_distributed cover the parts).
@pytest.mark.slow
def test_sweep_against_a_started_ray_cluster(tiny_data, tiny_files, tmp_path):
    port = _free_port()
    # A short temp dir (Ray's socket paths must stay under ~107 characters) and a token
    # of our own, so the test neither reads nor writes ~/.ray/auth_token.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = _child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), TMPDIR=temp_dir)
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        started = head.communicate(timeout=120)[0].decode()
        assert head.returncode == 0, started
        out = tmp_path / "out"
        run = subprocess.run(
            [str(VENV_BIN / "triageseg"), *_tune_args(tiny_data, tiny_files, out, "--num-samples", 2,
                                                      "--address", f"127.0.0.1:{port}")],
            env=env, capture_output=True, text=True, timeout=400,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert "ray: 1 node(s), 2 CPUs, 0 GPUs at 127.0.0.1:" in run.stderr
        assert "warning: --storage" in run.stderr and "one node" in run.stderr
        rows = _rows(out)
        assert len(rows) == 2 and {r["status"] for r in rows} <= {"completed", "pruned"}
        assert any(r["status"] == "completed" for r in rows)
        assert (out / MODALITY / "best_config.json").is_file()
    finally:
        # Stop exactly the head this test started: `ray stop` would stop every Ray on the machine.
        _kill_group(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
