"""Shared fixtures. Data fixtures build real ImageFolder trees and real webdataset shards.

Session-scoped fixtures are shared by many tests: treat them as read-only (copy before changing).
"""

from __future__ import annotations

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
