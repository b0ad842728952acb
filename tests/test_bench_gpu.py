"""benchmarks/bench_gpu.py: its arguments, a clean stop without CUDA, and its CPU dry run end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_arguments(bench, tmp_path):
    args = bench.parse_args([])
    assert args.budget == 450 and not args.dry_run and args.results is None and args.bundle is None
    args = bench.parse_args(["--dry-run", "--budget", "60", "--results", str(tmp_path / "r.md"), "--skip-tests"])
    assert args.dry_run and args.budget == 60 and args.skip_tests and args.results == tmp_path / "r.md"
    with pytest.raises(SystemExit):
        bench.parse_args(["--budget", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--bundle", str(tmp_path)])  # not a bundle
    assert bench.GPU_SIZES.batches == (8, 16, 32, 64) and bench.GPU_SIZES.tile == 512
    assert (bench.GPU_SIZES.whole, bench.GPU_SIZES.large) == (4096, 16000)


def test_without_cuda_it_stops_cleanly(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--results", str(tmp_path / "r.md")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_dry_run_on_cpu_writes_a_section(bench, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    assert bench.main(["--dry-run", "--results", str(results), "--work", str(tmp_path)]) == 0
    text = results.read_text()
    assert text.startswith("# Results\n") and "## GPU figures (" in text and "(dry run)" in text
    assert "batch 2, AMP:" in text and "batch 4, AMP:" in text and "img/s" in text
    assert "192x192 in memory:" in text and "320x320 block-wise:" in text and "s/MP" in text
    assert not list(tmp_path.glob("bench-gpu-*")), "scratch folder left behind"
