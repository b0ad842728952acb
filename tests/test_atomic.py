"""Atomic writes: all or nothing, usual permissions, no temp files left."""

from __future__ import annotations

import os
import stat

import pytest

from triageseg.datasets.atomic import atomic_path, write_json_atomic, write_text_atomic


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_permissions_follow_umask_and_suffix_kept(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "sub" / "b.json", {"x": 1})
        with atomic_path(tmp_path / "c.tif") as tmp:
            assert tmp.suffix == ".tif" and tmp.parent == tmp_path
            tmp.write_bytes(b"1")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "sub" / "b.json").stat().st_mode)
    assert mode == 0o644
    assert (tmp_path / "sub" / "b.json").read_text() == '{\n  "x": 1\n}\n'
