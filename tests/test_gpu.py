"""CUDA checks (run on a GPU machine; skipped where torch sees no CUDA device, as in CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dho import data
from dho.cache import TeacherCache
from dho.distill import DistillConfig, distill
from dho.precompute import precompute
from dho.students import load_student
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_world(tmp_path_factory, tiny_teacher_ckpt):
    root = tmp_path_factory.mktemp("gpu")
    full = data.prepare(make_image_folder(root / "images", num_classes=4, per_class=10), root / "full", shard_size=8)
    labeled, _ = data.split(full, root / "labeled", shots=2, seed=0, shard_size=4)
    return root, full, labeled


def test_precompute_on_cuda_matches_cpu(gpu_world, tiny_teacher_ckpt):
    root, full, _ = gpu_world
    common = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, workers=0, batch_size=16, precision="fp32")
    precompute(full.root, root / "cpu.zarr", device="cpu", **common)
    precompute(full.root, root / "cuda.zarr", device="cuda", **common)
    cpu, cuda = TeacherCache.open(root / "cpu.zarr", dataset=full), TeacherCache.open(root / "cuda.zarr", dataset=full)
    for v in range(2):
        np.testing.assert_array_equal(cpu.view_params(v, 0, full.num_samples), cuda.view_params(v, 0, full.num_samples))
        np.testing.assert_allclose(cpu.probs(v, 0, full.num_samples), cuda.probs(v, 0, full.num_samples), atol=2e-3)


def test_precompute_bf16_rows_are_distributions(gpu_world, tiny_teacher_ckpt):
    root, full, _ = gpu_world
    precompute(full.root, root / "bf16.zarr", model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=1,
               device="cuda", precision="bf16", workers=2, batch_size=16)
    p = TeacherCache.open(root / "bf16.zarr").probs(0, 0, full.num_samples)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-3)


def test_distill_on_cuda_with_bf16(gpu_world, tiny_teacher_ckpt, tmp_path, capsys):
    root, full, labeled = gpu_world
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cuda", workers=0)
    precompute(full.root, tmp_path / "full.zarr", **teacher)
    precompute(labeled.root, tmp_path / "labeled.zarr", **teacher)
    cfg = DistillConfig(labeled=str(labeled.root), labeled_cache=str(tmp_path / "labeled.zarr"), unlabeled=str(full.root),
                        unlabeled_cache=str(tmp_path / "full.zarr"), student=str(TINY_CLIP_CONFIG), out=str(tmp_path / "run"),
                        epochs=6, batch_size=8, lr=3e-3, device="cuda", precision="bf16", workers=2, log_every=1)
    distill(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # the peak CUDA memory of each log interval: in every step record and on every step line
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(0 < m["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30 for m in steps)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == len(steps) and all(f"| peak memory {m['peak_memory_gib']:.2f} GiB |" in line for m, line in zip(steps, lines))
    student, meta = load_student(tmp_path / "run" / "model.pt")  # loads on CPU
    assert next(student.parameters()).device.type == "cpu" and meta["alpha"] == 0.5


def test_fp16_teacher_with_cast_weights_and_compile_on_cuda(tiny_teacher_ckpt):
    """The fp16 image tower (cast weights, no autocast) and its compiled version agree with fp32 on CUDA."""
    from dho.teacher import load_teacher

    names = ["red", "green", "blue"]
    fp32 = load_teacher(str(TINY_CLIP_CONFIG), str(tiny_teacher_ckpt), "cuda", "fp32", classnames=names, verbose=False)
    fp16 = load_teacher(str(TINY_CLIP_CONFIG), str(tiny_teacher_ckpt), "cuda", "fp16", classnames=names, verbose=False,
                        compile=True)
    assert next(fp16.model.visual.parameters()).dtype == torch.float16
    x = torch.randn(8, 3, 32, 32, device="cuda")
    p32 = torch.softmax(fp32.logits(fp32.encode_images(x)) / 2.0, -1)
    p16 = torch.softmax(fp16.logits(fp16.encode_images(x)) / 2.0, -1)
    assert float((p16 - p32).abs().max()) < 0.02  # fp16 moved the demo teacher's probabilities by 4e-3 on CPU


def test_distill_on_cuda_compiled_channels_last_matches_eager(gpu_world, tiny_teacher_ckpt, tmp_path):
    """--compile with fused AdamW and channels_last (a CNN student) trains like eager on CUDA (fp32)."""
    root, full, labeled = gpu_world
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cuda", workers=0)
    precompute(full.root, tmp_path / "full.zarr", **teacher)
    precompute(labeled.root, tmp_path / "labeled.zarr", **teacher)
    runs = {}
    for mode in ("eager", "compiled"):
        cfg = DistillConfig(labeled=str(labeled.root), labeled_cache=str(tmp_path / "labeled.zarr"), unlabeled=str(full.root),
                            unlabeled_cache=str(tmp_path / "full.zarr"), student="resnet-tiny", out=str(tmp_path / mode),
                            epochs=1, max_steps=4, batch_size=8, lr=3e-3, device="cuda", precision="fp32", workers=0,
                            log_every=1, compile=mode == "compiled")
        distill(cfg)
        runs[mode] = [json.loads(line)["loss"] for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
    np.testing.assert_allclose(runs["compiled"], runs["eager"], rtol=1e-3, atol=1e-4)
