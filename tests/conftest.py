"""Shared fixtures. Data fixtures build real ImageFolder trees and real webdataset shards.

Session-scoped fixtures are shared by many tests: treat them as read-only (copy before changing).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
