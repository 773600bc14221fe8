"""Shared fixtures. Data fixtures build real ImageFolder trees and real webdataset shards.

Session-scoped fixtures are shared by many tests: treat them as read-only (copy before changing).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch.compile's kernel cache, one per CPU instruction set: kernels cached under the native ISA crashed when the
# suite ran again with ATEN_CPU_CAPABILITY=avx2 (imitating another CPU) on the same machine
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_dho_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}_{os.getuid()}"))

from helpers_data import ODD_BAD_FILES, ODD_EXTRA_FILES, make_image_folder  # noqa: E402,F401


@pytest.fixture
def image_folder(tmp_path):
    """A clean ImageFolder tree: 3 classes x 8 small JPEGs (tmp, free to modify)."""
    return make_image_folder(tmp_path / "images", num_classes=3, per_class=8)


@pytest.fixture(scope="session")
def odd_image_folder(tmp_path_factory):
    """ImageFolder tree with odd inputs (see make_image_folder(odd=True)); read-only."""
    return make_image_folder(tmp_path_factory.mktemp("odd") / "images", num_classes=3, per_class=4, odd=True)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset: 3 classes x 8 JPEGs in 5 shards of 5 (the last has 4); read-only."""
    from dho import data

    root = tmp_path_factory.mktemp("tiny")
    src = make_image_folder(root / "images", num_classes=3, per_class=8)
    return data.prepare(src, root / "dataset", shard_size=5)


@pytest.fixture
def small_disk(tmp_path):
    """disk(size, read_only=False, full=False) -> a folder on a tmpfs of that size mounted for this test (root only:
    the tests that need one are skipped elsewhere); `full` fills it up (a file takes every free byte)."""
    import subprocess

    mounted = []

    def disk(size: str, read_only: bool = False, full: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode:
            pytest.skip("mounting a tmpfs is not permitted here (the test needs root)")
        mounted.append(where)
        if full:
            with open(where / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        return where

    yield disk
    for where in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)  # lazy: a failed torch writer may hold a file
