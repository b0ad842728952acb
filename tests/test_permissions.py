"""Bundles and datasets are shareable: every file and folder written follows the umask."""

from __future__ import annotations

import os
import stat

import imagecodecs
import numpy as np
import pytest
import torch

from triageseg import bundle


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_weights_configs_and_checkpoints_follow_the_umask(tmp_path, umask):
    from triageseg.router.model import RouterConfig, create_router, save_router
    from triageseg.segmenters.checkpoint import save_checkpoint
    from triageseg.segmenters.model import SegmenterConfig, create_segmenter, save_segmenter

    file_mode = 0o666 & ~umask
    bundle.save_weights(tmp_path / "w" / "model.safetensors", {"a": torch.zeros(3)})
    rcfg = RouterConfig(class_names=("a", "b"), image_size=32)
    save_router(bundle.router_dir(tmp_path / "b"), create_router(rcfg), rcfg)
    scfg = SegmenterConfig(decoder_channels=(8, 8, 8, 8, 8), tile_size=64, overlap=16, modality="he")
    save_segmenter(bundle.segmenter_dir(tmp_path / "b", "he"), create_segmenter(scfg), scfg, params=None)
    save_checkpoint(tmp_path / "ckpt", {"x": torch.ones(2)})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "postprocess.json", "last.pt"}
    assert {str(p.relative_to(tmp_path)): _mode(p) for p in files} == {
        str(p.relative_to(tmp_path)): file_mode for p in files
    }


def test_imported_dataset_folders_and_files_follow_the_umask(tmp_path, umask):
    from triageseg.datasets.importers import import_dsb2018

    src = tmp_path / "stage1_train"
    for key in ("a1", "a2"):
        (src / key / "images").mkdir(parents=True)
        (src / key / "masks").mkdir()
        imagecodecs.imwrite(src / key / "images" / f"{key}.png", np.full((8, 8, 3), 50, np.uint8))
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:5] = 255
        imagecodecs.imwrite(src / key / "masks" / "m0.png", mask)
    dst = import_dsb2018(src, tmp_path / "out")
    assert _mode(dst) == 0o777 & ~umask
    for path in dst.rglob("*"):
        assert _mode(path) == (0o777 if path.is_dir() else 0o666) & ~umask, path
