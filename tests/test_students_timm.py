"""dho.students with ``timm/NAME`` students: shapes, preprocessing from timm's data config, weights
(random, a local file, the Hugging Face cache, never a download), the model file round trip, and one
short real `distill` run. Tiny timm test architectures (``test_resnet``, ``test_vit``) at random init."""

from __future__ import annotations

import json
import time

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from timm.data import resolve_data_config

from dho import data
from dho.errors import ConfigError
from dho.students import build_student, list_students, load_student, save_student
from dho.timm_students import timm_preprocess
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder


def _timm_model(name: str, seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw)


def _assert_backbone_equals(student, model: torch.nn.Module) -> None:
    own = student.backbone.state_dict()
    for k, v in own.items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0)


# (name, D, image size, interpolation): test_vit has a fixed input size; MobileNetV3's pooled output
# (head_hidden_size 1024) is wider than its num_features (288)
@pytest.mark.parametrize("arch,dim,size,interpolation", [
    ("test_resnet", 96, 160, "bilinear"), ("test_vit", 64, 160, "bicubic"), ("mobilenetv3_small_050", 1024, 224, "bicubic"),
])
def test_timm_student_shapes_heads_and_preprocess(arch, dim, size, interpolation):
    torch.manual_seed(0)
    s = build_student(f"timm/{arch}", num_classes=3)
    x = torch.randn(2, 3, size, size)
    out = s.eval()(x)
    assert out["z"].shape == (2, dim) and out["ce_logits"].shape == (2, 3) and out["kd_logits"].shape == (2, 3)
    reference = _timm_model(arch, 0, num_classes=0).eval()
    assert s.feature_dim == dim == reference(x).shape[1]
    torch.testing.assert_close(s.ce_head(out["z"]), out["ce_logits"])
    torch.testing.assert_close(s.kd_head(out["z"]), out["kd_logits"])
    # two independent linear heads as for the torchvision CNNs: Kaiming-uniform weights, zero biases
    assert type(s.ce_head) is torch.nn.Linear and type(s.kd_head) is torch.nn.Linear
    assert not torch.equal(s.ce_head.weight, s.kd_head.weight)
    assert s.ce_head.bias.abs().sum() == 0 and s.kd_head.bias.abs().sum() == 0
    assert s.kd_head.weight.abs().max() <= 1.0 / dim**0.5
    cfg = resolve_data_config({}, model=reference)
    assert s.preprocess.to_dict() == {"image_size": cfg["input_size"][-1], "interpolation": cfg["interpolation"],
                            "mean": list(cfg["mean"]), "std": list(cfg["std"]), "resize_mode": "shortest",
                            "crop_pct": cfg["crop_pct"]}
    assert (s.preprocess.image_size, s.preprocess.interpolation) == (size, interpolation)
    assert s.build_args == {"name": f"timm/{arch}", "kind": "timm", "timm_name": arch, "num_classes": 3, "feature_dim": dim,
                            "align_kd_head": False, "zeta": 0.01, "pretrained": None, "init_heads_from_text": False}


def test_interpolation_override_and_timm_interpolations():
    assert build_student("timm/test_resnet", 2, interpolation="bicubic").preprocess.interpolation == "bicubic"
    lanczos = _timm_model("test_resnet", 0, num_classes=0, pretrained_cfg_overlay={"interpolation": "lanczos"})
    with pytest.warns(UserWarning, match="'lanczos' -> dho's closest, 'bicubic'"):
        assert timm_preprocess(lanczos, "timm/test_resnet").interpolation == "bicubic"
    nearest = _timm_model("test_resnet", 0, num_classes=0, pretrained_cfg_overlay={"interpolation": "nearest"})
    with pytest.raises(ConfigError, match="interpolation 'nearest'.*--interpolation"):
        timm_preprocess(nearest, "timm/test_resnet")
    assert timm_preprocess(nearest, "timm/test_resnet", "bilinear").interpolation == "bilinear"
    wide = _timm_model("test_resnet", 0, num_classes=0, pretrained_cfg_overlay={"input_size": (3, 160, 192)})
    with pytest.warns(UserWarning, match="non-square input size 160x192"):
        assert timm_preprocess(wide, "timm/test_resnet").image_size == 192
    fixed = _timm_model("test_vit", 0, num_classes=0, pretrained_cfg_overlay={"input_size": (3, 160, 192)})
    with pytest.raises(ConfigError, match="fixed non-square"):
        timm_preprocess(fixed, "timm/test_vit")


@pytest.mark.parametrize("name", ["timm/test_resnet", "timm/test_vit.r160_in1k"])
def test_save_load_round_trip_is_exact_and_offline(tmp_path, name):
    torch.manual_seed(3)
    s = build_student(name, num_classes=2).eval()
    with torch.no_grad():
        s.ce_head.bias.fill_(0.25)  # not the init, so the state_dict is what load restores
    path = save_student(tmp_path / "model.pt", s, ["cat", "dog"], alpha=0.3, beta=0.7)
    torch.manual_seed(99)  # a different random init before the weights are loaded
    loaded, meta = load_student(path)
    assert not loaded.training and meta["build_args"] == s.build_args and meta["preprocess"] == s.preprocess
    x = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        a, b = s(x), loaded(x)
    for k in ("z", "ce_logits", "kd_logits"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_checkpoint_file(tmp_path, fmt):
    source = _timm_model("test_resnet", 1)  # with its 1000-class classifier, as timm saves it: ignored
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    else:
        safetensors.torch.save_file(source.state_dict(), path)
    s = build_student("timm/test_resnet", num_classes=3, pretrained=str(path))
    _assert_backbone_equals(s, source)
    assert s.build_args["pretrained"] == str(path)
    # the model file rebuilds at random init and loads the saved weights: no need for the checkpoint
    loaded, _ = load_student(save_student(tmp_path / "model.pt", s, ["a", "b", "c"]))
    path.unlink()
    _assert_backbone_equals(loaded, source)


def test_checkpoint_of_another_architecture_names_the_file(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(_timm_model("test_vit", 0).state_dict(), path)
    with pytest.raises(ConfigError, match=r"student checkpoint .*vit\.pt does not fit timm model test_resnet") as err:
        build_student("timm/test_resnet", num_classes=2, pretrained=str(path))
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read student checkpoint .*junk.pt"):
        build_student("timm/test_resnet", num_classes=2, pretrained=str(tmp_path / "junk.pt"))
    with pytest.raises(ConfigError, match="checkpoint .*missing.safetensors not found"):
        build_student("timm/test_resnet", num_classes=2, pretrained=str(tmp_path / "missing.safetensors"))


def test_timm_weights_not_in_hf_cache_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    start = time.monotonic()
    for pretrained in ("timm", "r160_in1k", "timm/test_resnet.r160_in1k"):
        with pytest.raises(ConfigError, match=r"test_resnet.r160_in1k are not in the Hugging Face cache .*"
                                              r"`hf download timm/test_resnet.r160_in1k`") as err:
            build_student("timm/test_resnet", num_classes=2, pretrained=pretrained)
        assert "\n" not in str(err.value)
    assert time.monotonic() - start < 10


def test_timm_weights_from_hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache laid out as `hf download` leaves it: timm's own loader reads the cached file."""
    source = _timm_model("test_resnet", 2)
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(source.state_dict(), repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    s = build_student("timm/test_resnet.r160_in1k", num_classes=2, pretrained="timm")
    _assert_backbone_equals(s, source)
    assert s.build_args["timm_name"] == "test_resnet.r160_in1k"
    _assert_backbone_equals(build_student("timm/test_resnet", num_classes=2, pretrained="timm"), source)  # default tag


def test_unknown_names_and_tags():
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnt18'.*close matches: \['resnet18'"):
        build_student("timm/resnt18", num_classes=2)
    with pytest.raises(ConfigError, match="has no pretrained tag 'nope'.*'r160_in1k'"):
        build_student("timm/test_resnet.nope", num_classes=2)
    with pytest.raises(ConfigError, match="neither a file nor a timm pretrained tag"):
        build_student("timm/test_resnet", num_classes=2, pretrained="nope")
    with pytest.raises(ConfigError, match="names weights of test_vit"):
        build_student("timm/test_resnet", num_classes=2, pretrained="timm/test_vit.r160_in1k")
    with pytest.raises(ConfigError, match="registry name after 'timm/'"):
        build_student("timm/hf-hub:timm/resnet18.a1_in1k", num_classes=2)
    assert "timm/<timm model name>" in list_students()


def test_short_distill_with_timm_student(tmp_path, tiny_teacher_ckpt):  # noqa: F811
    """The real distill (Alg. 1) with a timm student: 2 steps, validation, a model file that reloads."""
    from dho.distill import DistillConfig, distill
    from dho.precompute import precompute

    src = make_image_folder(tmp_path / "images", num_classes=3, per_class=4)
    full = data.prepare(src, tmp_path / "full", shard_size=6)
    labeled, _ = data.split(full, tmp_path / "labeled", shots=2, seed=0, val_per_class=1, val_out=tmp_path / "val",
                            shard_size=4)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=1, device="cpu", workers=0,
                   batch_size=16)
    precompute(full.root, tmp_path / "full.zarr", **teacher)
    precompute(labeled.root, tmp_path / "labeled.zarr", **teacher)
    run = tmp_path / "run"
    distill(DistillConfig(
        labeled=str(labeled.root), labeled_cache=str(tmp_path / "labeled.zarr"), unlabeled=str(full.root),
        unlabeled_cache=str(tmp_path / "full.zarr"), student="timm/test_resnet", out=str(run), method="dho", epochs=1,
        batch_size=6, lr=3e-3, workers=0, device="cpu", log_every=1, seed=0, val=str(tmp_path / "val"),
    ))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]  # 12 unlabeled images, batch 6
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    assert 0.0 <= [m for m in metrics if m.get("final")][0]["val_combined_top1"] <= 100.0
    student, meta = load_student(run / "model.pt")
    assert meta["build_args"]["kind"] == "timm" and student.feature_dim == 96
    assert meta["preprocess"].image_size == 160 and meta["preprocess"].crop_pct == 0.95
