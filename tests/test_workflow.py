"""train all -> evaluate --bundle -> demo, end to end on tiny budgets."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from triageseg import bundle as B

TINY = dict(scale=1.0, total_steps=24, steps_per_epoch=5, batch_size=2, crop_size=64, router_epochs=2,
            router_seconds=4.0, decoder_channels=(16, 16, 16, 16, 16))
TRAIN_DIAMETER = 20.0


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    from triageseg.workflow import Budget, train_bundle

    out = tmp_path_factory.mktemp("wf") / "bundle"
    # train_diameter: the fixture's own training median is 17.28 px; every segmenter must work at the given one.
    summary = train_bundle(synth_data, out, budget=Budget(**TINY), device="cpu", progress=False, log=lambda _m: None,
                           train_diameter=TRAIN_DIAMETER)
    return out, summary


def test_train_bundle_writes_every_model(trained):
    out, summary = trained
    manifest = B.read_manifest(out)
    assert manifest["segmenters"] == ["_generalist", "brightfield", "fluorescence", "he"]
    assert manifest["has_router"] and manifest["has_generalist"]
    assert manifest["provenance"]["seed"] == 0 and len(manifest["provenance"]["ids_sha256"]) == 64
    assert set(summary["val_mean_f1"]) == {"base", "_generalist", "brightfield", "fluorescence", "he"}
    # same total budget: base + generalist = base + all specialists = total_steps
    steps = summary["steps"]
    assert steps["base"] + steps["_generalist"] == 24 and steps["base"] == 18
    assert steps["fluorescence"] + steps["brightfield"] + steps["he"] == steps["_generalist"]
    spec = [steps[m] for m in ("brightfield", "fluorescence", "he")]
    assert max(spec) - min(spec) <= 1  # the default split is equal, whatever the modality counts
    assert not (out / "_work").exists()  # the shared base is removed once everything continued from it
    assert summary["quality"]["n_points"] == summary["quality"]["n_images"] * 4  # one fit across the bundle
    assert B.read_json(B.segmenter_dir(out, "he") / "quality.json")["fit"]["scope"].startswith("bundle")
    cfg = json.loads((B.segmenter_dir(out, "he") / "config.json").read_text())
    assert cfg["train"]["init_from"].endswith("base")
    gen = json.loads((B.segmenter_dir(out, "_generalist") / "config.json").read_text())["train"]
    # both systems fine-tune from the base the same way
    assert cfg["train"]["freeze_bn"] and gen["freeze_bn"] and gen["init_from"].endswith("base")
    assert cfg["train"]["lr"] == gen["lr"] and cfg["train"]["warmup_epochs"] == gen["warmup_epochs"]
    for name in manifest["segmenters"]:  # train_diameter replaces the training images' median (17.28 px)
        assert json.loads((B.segmenter_dir(out, name) / "config.json").read_text())["diameter"] == TRAIN_DIAMETER


def test_budget_split_equal_or_by_images():
    from triageseg.workflow import Budget

    counts = {"brightfield": 14, "fluorescence": 42, "he": 14}
    base, rest, per = Budget().split(counts)
    assert (base, rest) == (360, 120) and per == {"brightfield": 40, "fluorescence": 40, "he": 40}
    base, rest, per = Budget(specialist_split="images").split(counts)
    assert per == {"brightfield": 24, "fluorescence": 72, "he": 24}
    _, rest, per = Budget(scale=0.5, specialist_split="equal").split({"a": 1, "b": 5, "c": 9})
    assert rest == 60 and sorted(per.values()) == [20, 20, 20]
    _, rest, per = Budget(total_steps=41, base_fraction=0.0).split({"a": 1, "b": 1, "c": 1})
    assert sum(per.values()) == rest == 41 and sorted(per.values()) == [13, 14, 14]
    with pytest.raises(ValueError, match="specialist_split"):
        Budget(specialist_split="sqrt").split(counts)


def test_evaluate_bundle_scores_routed_and_generalist(trained, synth_data, tmp_path):
    from triageseg.datasets.layout import Dataset
    from triageseg.workflow import evaluate_bundle, evaluate_line, format_comparison, scores_to_dict

    out, _ = trained
    scores = evaluate_bundle(out, synth_data, split="test", device="cpu", out_dir=tmp_path / "pred", progress=False)
    test = Dataset(synth_data).select(split="test")
    assert scores.routed.overall.n_images == len(test) == scores.generalist.overall.n_images
    assert sum(scores.used_models.values()) == len(test)
    assert sum(sum(row.values()) for row in scores.confusion.values()) == len(test)
    assert 0.0 <= scores.router_accuracy <= 1.0
    assert set(scores.routing) == {s.id for s in test}
    assert {r["used_model"] for r in scores.routing.values()} == set(scores.used_models)
    assert sorted(p.stem for p in (tmp_path / "pred").glob("*.tif")) == sorted(s.id for s in test)
    table = format_comparison(scores)
    assert "routed" in table and "generalist" in table and "overall" in table and "router accuracy" in table
    json.dumps(scores_to_dict(scores))
    # the demo's evaluate line: where the seconds went and which backend ran (tests pin auto to torch)
    assert set(scores.stages) == {"load", "segment", "score"} and all(v >= 0 for v in scores.stages.values())
    assert sum(scores.stages.values()) <= scores.seconds + 0.05
    assert scores.backend.startswith("torch fp32 on cpu, ") and scores.backend.endswith(" threads")
    line = evaluate_line(scores, 1.25)
    assert f"{len(test)} images" in line and "torch fp32" in line and "segment" in line and "report 1.2 s" in line


def test_evaluate_cli_with_bundle(trained, synth_data, tmp_path):
    from triageseg.cli.main import cli

    out, _ = trained
    res = CliRunner().invoke(cli, ["evaluate", "--bundle", str(out), "--data", str(synth_data), "--split", "test",
                                   "--device", "cpu", "--json", str(tmp_path / "s.json"), "--report",
                                   str(tmp_path / "report.html"), "--worst", "2"])
    assert res.exit_code == 0, res.output
    assert "router accuracy" in res.output and f"wrote {tmp_path / 'report.html'}" in res.output
    page = (tmp_path / "report.html").read_text()  # predictions went to a temporary folder, outlined from there
    assert 'id="confusion"' in page and page.count('src="data:image/png;base64,') == 2 + 2 and "on black" not in page
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["routed"]["overall"]["n_images"] == saved["generalist"]["overall"]["n_images"] > 0


def test_train_all_refuses_unknown_modality(synth_data, tmp_path):
    from triageseg.cli.main import cli

    res = CliRunner().invoke(cli, ["train", "all", "--data", str(synth_data), "--out", str(tmp_path / "b"),
                                   "--modalities", "phase", "--quiet"])
    assert res.exit_code == 1 and "phase" in res.output and "fluorescence" in res.output


def test_train_all_refuses_an_unknown_specialist_split(synth_data, tmp_path):
    from triageseg.cli.main import cli

    res = CliRunner().invoke(cli, ["train", "all", "--data", str(synth_data), "--out", str(tmp_path / "b"),
                                   "--specialist-split", "sqrt", "--quiet"])
    assert res.exit_code == 2 and "equal" in res.output and "images" in res.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", [["train", "all"], ["demo"]])
def test_train_diameter_option_refuses_nonsense(synth_data, tmp_path, command):
    from triageseg.cli.main import cli

    args = ["--data", str(synth_data)] if command[0] == "train" else []
    res = CliRunner().invoke(cli, [*command, *args, "--out", str(tmp_path / "b"), "--train-diameter", "nan", "--quiet"])
    assert res.exit_code == 2 and "--train-diameter" in res.output and "number of pixels" in res.output
    assert not (tmp_path / "b").exists()
