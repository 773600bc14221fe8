"""Builders of tiny finished run directories (RUN_DIR/model.pt + config.json) for evaluate/export tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from dho import data, losses
from dho.students import build_student, save_student


def reference_view(path: Path, preprocess) -> torch.Tensor:
    """The evaluation view computed straight from an image file by open_clip's own eval transform
    (independent of dho.data) -> (3, S, S) normalised."""
    from open_clip.transform import image_transform

    transform = image_transform(preprocess.image_size, is_train=False, mean=tuple(preprocess.mean),
                                std=tuple(preprocess.std), resize_mode=preprocess.resize_mode,
                                interpolation=preprocess.interpolation)
    with Image.open(path) as im:
        return transform(im.convert("RGB"))


def make_trained_run(run_dir: Path, ds: data.Dataset, steps: int = 20, seed: int = 0) -> Path:
    """A resnet-tiny DHO run trained briefly on `ds` against a deliberately wrong 'teacher' that
    puts 0.9 on class (y + 1) mod C, so ce_head learns the labels and kd_head the shifted classes."""
    torch.manual_seed(seed)
    student = build_student("resnet-tiny", ds.num_classes)
    pre = student.preprocess
    xs, ys = [], []
    for s in range(len(ds.shards)):
        for sample in data.iter_shard(ds, s):
            view = data.eval_view_uint8(sample.image, pre.image_size, pre.interpolation, pre.resize_mode)
            xs.append(data.normalize(view, pre.mean, pre.std))
            ys.append(sample.label)
    x, y = torch.stack(xs), torch.tensor(ys)  # (N, 3, S, S), (N,)
    c = ds.num_classes
    probs = torch.full((len(y), c), 0.1 / (c - 1))
    probs[torch.arange(len(y)), (y + 1) % c] = 0.9  # (N, C)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(steps):
        out = student.train()(x)
        loss = losses.dho_loss(out["ce_logits"], out["kd_logits"], y, probs, out["kd_logits"], probs, 0.5, 2.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_student(run_dir / "model.pt", student, ds.classnames, alpha=0.5, beta=0.5, extra={"method": "dho"})
    (run_dir / "config.json").write_text(json.dumps({"method": "dho", "student": "resnet-tiny", "alpha": 0.5, "beta": 0.5}))
    return run_dir
