"""Inference cost (dho.inference_bench): counts checked against hand computations, not just that it ran."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn
from helpers_student import make_trained_run

from dho.errors import ConfigError
from dho.evaluate import load_run
from dho.inference_bench import (
    SingleHeadStudent,
    architecture_name,
    bench_inference,
    format_table,
    write_inference_cost,
)
from fixtures_models import TINY_CLIP_NAME, tiny_clip_config, tiny_teacher_ckpt  # noqa: F401

FAST = dict(batch_sizes=(1, 4), device="cpu", warmup=1, iters=2, min_seconds=0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dataset, tiny_clip_config, tiny_teacher_ckpt) -> Path:  # noqa: F811
    """A finished resnet-tiny run whose config.json names a tiny-clip teacher cache."""
    from dho.precompute import precompute

    root = tmp_path_factory.mktemp("bench")
    cache = precompute(tiny_dataset.root, root / "cache.zarr", model=str(tiny_clip_config), pretrained=str(tiny_teacher_ckpt),
                       views=1, device="cpu", workers=0)
    run_dir = make_trained_run(root / "run", tiny_dataset, steps=2)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "labeled_cache": str(cache.path)}))
    return run_dir


@pytest.fixture(scope="module")
def result(run) -> dict:
    return bench_inference(run, **FAST)


def _hooked_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of the convolutions and linear layers from their output shapes (forward hooks, not the flop counter)."""
    total = 0

    def hook(layer, inputs, out):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            k = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * out.numel() * k
        else:
            total += 2 * out.numel() * layer.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    with torch.inference_mode():
        module(x)
    for h in handles:
        h.remove()
    return total


def _tiny_vit_flops(cfg: dict) -> int:
    """Hand count of open_clip's ViT image tower of `cfg` for one image (no class-token pooling tricks)."""
    v = cfg["vision_cfg"]
    width, layers, patches = v["width"], v["layers"], (v["image_size"] // v["patch_size"]) ** 2
    tokens = patches + 1  # + class token
    patch_embed = 2 * patches * width * 3 * v["patch_size"] ** 2
    per_layer = (2 * tokens * width * 3 * width  # q, k, v projections
                 + 2 * 2 * tokens * tokens * width  # q k^T and attn v over all heads
                 + 2 * tokens * width * width  # out projection
                 + 2 * 2 * tokens * width * 4 * width)  # MLP, ratio 4
    return patch_embed + layers * per_layer + 2 * width * cfg["embed_dim"]  # + projection of the class token


def test_student_params_and_the_single_head_difference_is_kd_head(run, result):
    student, _ = load_run(run, "cpu")
    dho, sho = result["models"]["student"], result["models"]["single_head"]
    assert dho["params"] == sum(p.numel() for p in student.parameters())
    backbone, ce_head = (sum(p.numel() for p in m.parameters()) for m in (student.backbone, student.ce_head))
    assert sho["params"] == backbone + ce_head
    assert dho["params"] - sho["params"] == sum(p.numel() for p in student.kd_head.parameters())
    assert dho["params_m"] == dho["params"] / 1e6
    assert dho["input_size"] == sho["input_size"] == student.preprocess.image_size == 32


def test_flops_match_a_hand_count_and_dho_adds_one_head(run, result):
    student, _ = load_run(run, "cpu")
    dho, sho = result["models"]["student"], result["models"]["single_head"]
    x = torch.zeros(1, 3, 32, 32)
    assert sho["flops"] == _hooked_flops(SingleHeadStudent(student), x)
    d, c = student.feature_dim, student.num_classes
    assert dho["flops"] - sho["flops"] == 2 * d * c  # kd_head; softmax and Eq. 11 are not matmuls
    for m in (dho, sho):
        assert m["gflops"] == m["flops"] / 1e9 and m["gmacs"] == m["gflops"] / 2


def test_teacher_params_and_flops_are_the_open_clip_tower_and_classifier(result, tiny_clip_config):  # noqa: F811
    cfg = json.loads(Path(tiny_clip_config).read_text())
    with torch.random.fork_rng(devices=[]):
        tower = open_clip.create_model(TINY_CLIP_NAME, pretrained=None).visual
    t = result["models"]["teacher"]
    assert t["params"] == sum(p.numel() for p in tower.parameters())
    assert t["input_size"] == cfg["vision_cfg"]["image_size"]
    # attention included: the counter misses nn.MultiheadAttention's fast path unless it is switched off
    assert t["flops"] == _tiny_vit_flops(cfg) + 2 * cfg["embed_dim"] * result["num_classes"]
    assert result["teacher"]["model"] == TINY_CLIP_NAME and result["teacher"]["architecture_matches_cache"] is True


def test_ratios_are_the_quotients_of_the_reported_numbers(result):
    m, r = result["models"], result["ratios"]
    dho, sho, t = m["student"], m["single_head"], m["teacher"]
    assert r["teacher_over_student"]["params"] == pytest.approx(t["params"] / dho["params"], rel=1e-12)
    assert r["teacher_over_student"]["gflops"] == pytest.approx(t["gflops"] / dho["gflops"], rel=1e-12)
    assert r["dho_over_sho_pct"]["params"] == pytest.approx(100 * (dho["params"] / sho["params"] - 1), rel=1e-9)
    assert r["dho_over_sho_pct"]["gflops"] == pytest.approx(100 * (dho["gflops"] / sho["gflops"] - 1), rel=1e-9)
    for b in ("1", "4"):
        assert all(mm["images_per_s"][b] > 0 for mm in m.values())
        assert r["teacher_over_student"]["speedup"][b] == pytest.approx(dho["images_per_s"][b] / t["images_per_s"][b], rel=1e-12)
        assert r["dho_over_sho_pct"]["images_per_s"][b] == pytest.approx(
            100 * (dho["images_per_s"][b] / sho["images_per_s"][b] - 1), rel=1e-9)
    assert result["batch_sizes"] == [1, 4] and result["device"] == "cpu" and result["torch"] == torch.__version__


def test_json_written_atomically_and_table_shows_the_headline(run, result):
    path = write_inference_cost(run, result)
    assert path == run / "inference_cost.json"
    assert json.loads(path.read_text()) == result
    assert not [p.name for p in run.iterdir() if p.name.startswith(".inference_cost.json")]  # no temporary left
    table = format_table(result)
    assert "DHO over SHO: params +" in table and "teacher / student: params" in table
    assert f"{result['models']['teacher']['params_m']:.3f}" in table and "img/s @4" in table


def test_without_teacher_in_bf16_counts_the_same_flops(run, result):
    r = bench_inference(run, batch_sizes=(2,), device="cpu", precision="bf16", teacher=False,
                        warmup=0, iters=1, min_seconds=0.0)
    assert set(r["models"]) == {"student", "single_head"} and "teacher_over_student" not in r["ratios"] and r["teacher"] is None
    assert r["models"]["student"]["flops"] == result["models"]["student"]["flops"]
    assert r["models"]["student"]["images_per_s"]["2"] > 0
    assert "teacher" not in format_table(r)


def test_teacher_model_override_by_config_file(run, result, tiny_clip_config):  # noqa: F811
    r = bench_inference(run, batch_sizes=(1,), device="cpu", teacher_model=str(tiny_clip_config), warmup=0, iters=1, min_seconds=0.0)
    assert r["models"]["teacher"]["params"] == result["models"]["teacher"]["params"]
    assert r["models"]["teacher"]["flops"] == result["models"]["teacher"]["flops"]


def test_tip_adapter_cache_is_measured_as_its_base_teacher():
    assert architecture_name("tip-adapter-f(ViT-B-16)") == "ViT-B-16"
    assert architecture_name("ViT-H-14-378-quickgelu") == "ViT-H-14-378-quickgelu"


@pytest.mark.parametrize("kwargs, words", [
    (dict(batch_sizes=(0, 4)), "--batch-sizes"),
    (dict(batch_sizes=(1.5,)), "--batch-sizes"),
    (dict(batch_sizes=()), "--batch-sizes"),
    (dict(batch_sizes="1,4"), "--batch-sizes"),
    (dict(precision="fp8"), "--precision"),
    (dict(precision="fp16"), "CUDA"),
    (dict(iters=0), "--iters"),
    (dict(teacher_model="local-dir:somewhere"), "--teacher-model"),
    (dict(teacher_model="no-such-clip"), "--teacher-model"),
])
def test_bad_options_are_one_line_config_errors(run, kwargs, words):
    with pytest.raises(ConfigError) as e:
        bench_inference(run, **{**FAST, **kwargs})
    assert "\n" not in str(e.value) and words in str(e.value)


def test_a_run_without_a_readable_cache_names_its_config_file(tmp_path, run):
    import shutil

    other = tmp_path / "run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("inference_cost.json"))
    (other / "config.json").write_text(json.dumps({"labeled_cache": str(tmp_path / "gone.zarr")}))
    with pytest.raises(ConfigError) as e:
        bench_inference(other, **FAST)
    assert "\n" not in str(e.value) and str(other / "config.json") in str(e.value) and "teacher_model=" in str(e.value)


def test_a_cache_teacher_unknown_to_this_process_asks_for_teacher_model(run, monkeypatch):
    # a fresh `dho` process has not registered the cache's config-file stem with open_clip
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, TINY_CLIP_NAME)
    with pytest.raises(ConfigError) as e:
        bench_inference(run, **FAST)
    message = str(e.value)
    assert "\n" not in message and repr(TINY_CLIP_NAME) in message and "--teacher-model NAME_OR_CONFIG_JSON" in message
