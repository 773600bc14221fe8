"""Tiny open_clip teachers for tests: a registered JSON model config + random-init checkpoints.

Import the fixtures into a test module (`from fixtures_models import tiny_teacher_ckpt`). They
go through the same loading code as real weights: a checkpoint file, or an hf-hub-style
`local-dir:` folder (open_clip_config.json + open_clip_pytorch_model.bin). Read-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

TINY_CLIP_CONFIG = Path(__file__).parent / "assets" / "tiny-clip.json"
TINY_CLIP_NAME = TINY_CLIP_CONFIG.stem
# preprocessing written into the local-dir folder: deliberately not open_clip's defaults
LOCAL_DIR_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "squash"}


def _tiny_state_dict(seed: int) -> dict:
    if open_clip.get_model_config(TINY_CLIP_NAME) is None:
        open_clip.add_model_config(TINY_CLIP_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    return model.state_dict()


@pytest.fixture(scope="session")
def tiny_clip_config() -> Path:
    """Path of the tiny open_clip model config (embed 32, ViT 2x64 at 32 px / patch 8, text 2x64)."""
    return TINY_CLIP_CONFIG


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(tmp_path_factory) -> Path:
    """A random-init (seed 1) tiny-clip checkpoint file; carries no preprocessing config."""
    path = tmp_path_factory.mktemp("tiny_teacher") / "tiny-teacher.pt"
    torch.save(_tiny_state_dict(seed=1), path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_local_dir(tmp_path_factory, tiny_teacher_ckpt) -> Path:
    """open_clip hf-hub-style folder with the same weights as tiny_teacher_ckpt and LOCAL_DIR_PREPROCESS."""
    folder = tmp_path_factory.mktemp("tiny_teacher_dir") / "tiny-teacher-dir"
    folder.mkdir()
    config = {"model_cfg": json.loads(TINY_CLIP_CONFIG.read_text()), "preprocess_cfg": LOCAL_DIR_PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(torch.load(tiny_teacher_ckpt, weights_only=True), folder / "open_clip_pytorch_model.bin")
    return folder
