"""Shared pytest fixtures: one small synthetic dataset per test session."""

from __future__ import annotations

import os

import pytest

# Before torch is imported: idle OpenMP threads sleep instead of spinning, so torch does
# not slow down ~10x while Ray workers or data-loading threads share the two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A synthetic dataset in the DESIGN layout: 24 images of 96x96, seed 0, all modalities.

    Read-only for tests: copy it (``shutil.copytree``) before modifying anything.
    With the default weights it holds 14 fluorescence, 5 brightfield and 5 he images,
    each modality with at least one train, val and test image.
    """
    from triageseg.datasets.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth") / "data", n=24, size=96, seed=0)
