"""dho.students: builders, heads (Eq. 10), language-aware init from the student's own text
encoder, local checkpoints, and the self-describing model file."""

from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from dho.errors import ConfigError
from dho.students import CosineHead, DualHeadStudent, NormalizedLinearHead, build_student, load_student, save_student

TINY_CLIP = Path(__file__).parent / "assets" / "tiny-clip.json"
CLASSNAMES = ["cat", "american_bulldog", "tiny red car"]  # "_": prompts read it as a space, as the reference
TEMPLATES = ["a photo of a {}.", "itap of a {}."]


@pytest.fixture(scope="module")
def tiny_clip_ckpt(tmp_path_factory):
    """A random-init tiny open_clip model saved as a local checkpoint (stands in for real weights)."""
    open_clip.add_model_config(TINY_CLIP)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP.stem)
    path = tmp_path_factory.mktemp("tiny_clip") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("name,dim,size", [("resnet-tiny", 128, 32), ("resnet18", 512, 224), ("mobilenet_v2", 1280, 224)])
def test_torchvision_students_shapes_and_init(name, dim, size):
    torch.manual_seed(0)
    s = build_student(name, num_classes=7)
    assert isinstance(s, DualHeadStudent)
    out = s.eval()(torch.randn(2, 3, 64, 64))
    assert out["ce_logits"].shape == (2, 7) and out["kd_logits"].shape == (2, 7) and out["z"].shape == (2, dim)
    torch.testing.assert_close(s.features(torch.ones(1, 3, 64, 64)), s(torch.ones(1, 3, 64, 64))["z"])
    assert s.preprocess.to_dict() == {"image_size": size, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                            "std": [0.229, 0.224, 0.225], "resize_mode": "shortest"}
    # CNN students: two independent linear heads, Kaiming-uniform weights, zero biases
    assert type(s.kd_head) is torch.nn.Linear
    assert not torch.equal(s.ce_head.weight, s.kd_head.weight)
    assert s.ce_head.bias.abs().sum() == 0 and s.kd_head.bias.abs().sum() == 0
    bound = 1.0 / dim**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in = D
    assert s.ce_head.weight.abs().max() <= bound
    assert s.build_args["name"] == name and s.build_args["num_classes"] == 7


def test_resnet50_feature_dim():
    s = build_student("resnet50", num_classes=3)
    assert s.eval()(torch.randn(1, 3, 64, 64))["z"].shape == (1, 2048)


def test_unknown_student_and_bad_args():
    with pytest.raises(ConfigError, match="unknown student"):
        build_student("resnet-9000", num_classes=3)
    with pytest.raises(ConfigError, match="neither a file nor a torchvision weights name"):
        build_student("resnet18", num_classes=3, pretrained="NOT_A_TAG")


def test_local_checkpoint_dino_style(tmp_path):
    torch.manual_seed(1)
    source = build_student("resnet-tiny", num_classes=4)
    state = {f"module.backbone.{k}": v for k, v in source.backbone.state_dict().items()}
    state["module.backbone.fc.weight"] = torch.zeros(10, 128)  # a classifier: ignored
    state["module.head.mlp.0.weight"] = torch.zeros(3, 3)  # DINO projection head: reported, ignored
    torch.save({"teacher": state, "epoch": 100}, tmp_path / "dino.pth")
    with pytest.warns(UserWarning, match="ignored 1 keys"):
        s = build_student("resnet-tiny", num_classes=4, pretrained=str(tmp_path / "dino.pth"))
    for k, v in source.backbone.state_dict().items():
        torch.testing.assert_close(s.backbone.state_dict()[k], v)

    partial = {k: v for k, v in source.backbone.state_dict().items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match="lacks .* backbone weights"):
        build_student("resnet-tiny", num_classes=4, pretrained=str(tmp_path / "partial.pt"))


def _text_embeddings(ckpt: Path, normalized: bool = True) -> torch.Tensor:
    """Independent reference: the tiny CLIP's own text encoder, one prompt at a time; per class the
    re-normalised mean of normalised embeddings (Eq. 1), or the plain mean of raw ones (reference code)."""
    model = open_clip.create_model(TINY_CLIP.stem, pretrained=str(ckpt)).eval()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP.stem)
    rows = []
    with torch.no_grad():
        for c in CLASSNAMES:
            embs = [model.encode_text(tokenizer([t.format(c.replace("_", " "))]))[0] for t in TEMPLATES]  # the reference's fill
            if normalized:
                rows.append(F.normalize(torch.stack([F.normalize(e, dim=-1) for e in embs]).mean(0), dim=-1))
            else:
                rows.append(torch.stack(embs).mean(0))
    return torch.stack(rows)  # (C, D)


def test_tiny_clip_reference_heads_are_linear_on_the_normalised_feature_with_raw_text_init(tiny_clip_ckpt):
    s = build_student(str(TINY_CLIP), 3, pretrained=str(tiny_clip_ckpt), classnames=CLASSNAMES, templates=TEMPLATES)
    assert s.build_args["vlm_heads"] == "reference" and isinstance(s.kd_head, NormalizedLinearHead)
    raw = _text_embeddings(tiny_clip_ckpt, normalized=False)  # (C, D), not unit rows
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-2)
    torch.testing.assert_close(s.ce_head.weight, raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.kd_head.weight, raw, atol=1e-5, rtol=1e-5)
    assert s.ce_head.bias.abs().sum() == 0 and s.kd_head.bias.abs().sum() == 0
    with torch.no_grad():  # the bias and the weight norms train: give them values that Eq. 10 would not have
        s.kd_head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        s.kd_head.weight.mul_(torch.tensor([[2.0], [0.5], [1.0]]))
    x = torch.randn(2, 3, 32, 32)
    out = s.eval()(x)
    linear = torch.nn.Linear(32, 3)
    linear.load_state_dict({"weight": s.kd_head.weight.detach(), "bias": s.kd_head.bias.detach()})
    with torch.no_grad():
        torch.testing.assert_close(out["kd_logits"], linear(F.normalize(out["z"], dim=-1)) / 0.01, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["ce_logits"], out["z"] @ raw.t(), atol=1e-4, rtol=1e-4)


def test_tiny_clip_language_aware_init_and_aligned_head(tiny_clip_ckpt):
    s = build_student(str(TINY_CLIP), 3, pretrained=str(tiny_clip_ckpt), classnames=CLASSNAMES, templates=TEMPLATES,
                      vlm_heads="eq10")
    text = _text_embeddings(tiny_clip_ckpt)
    torch.testing.assert_close(s.ce_head.weight, text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.kd_head.weight, text, atol=1e-5, rtol=1e-5)
    assert s.ce_head.bias.abs().sum() == 0
    assert isinstance(s.kd_head, CosineHead) and s.kd_head.zeta == 0.01

    reference = open_clip.create_model(TINY_CLIP.stem, pretrained=str(tiny_clip_ckpt)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = s.eval()(x)
    z = reference.encode_image(x)  # (B, D): the image tower's output after its projection
    torch.testing.assert_close(out["z"], z)
    # Eq. 10: (1 / zeta) * cos(z, w_c)
    cos = F.cosine_similarity(z[:, None, :], text[None, :, :], dim=-1)  # (B, C)
    torch.testing.assert_close(out["kd_logits"], cos / 0.01, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out["ce_logits"], z @ text.t(), atol=1e-5, rtol=1e-4)

    # the text encoder is dropped: only the image tower and the two heads remain
    assert {k.split(".")[0] for k in s.state_dict()} == {"backbone", "ce_head", "kd_head"}
    n_visual = sum(p.numel() for p in reference.visual.parameters())
    assert sum(p.numel() for p in s.parameters()) == n_visual + 2 * 3 * 32 + 3
    assert s.preprocess.image_size == 32 and s.preprocess.interpolation == "bicubic"
    assert s.preprocess.mean == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))


def test_tiny_clip_ablation_flags(tiny_clip_ckpt):
    text = _text_embeddings(tiny_clip_ckpt)
    torch.manual_seed(0)
    plain = build_student(str(TINY_CLIP), 3, pretrained=str(tiny_clip_ckpt), classnames=CLASSNAMES,
                          templates=TEMPLATES, init_heads_from_text=False, align_kd_head=False)
    assert type(plain.kd_head) is torch.nn.Linear
    assert not torch.allclose(plain.ce_head.weight, text, atol=1e-3)
    init_only = build_student(f"clip:{TINY_CLIP}", 3, pretrained=str(tiny_clip_ckpt), classnames=CLASSNAMES,
                              templates=TEMPLATES, align_kd_head=False, vlm_heads="eq10")
    assert type(init_only.kd_head) is torch.nn.Linear
    torch.testing.assert_close(init_only.kd_head.weight, text, atol=1e-5, rtol=1e-5)
    assert init_only.kd_head.bias.abs().sum() == 0
    aligned_only = build_student(str(TINY_CLIP), 3, init_heads_from_text=False, zeta=0.05, vlm_heads="eq10")
    x = torch.randn(2, 3, 32, 32)
    out = aligned_only.eval()(x)
    w = aligned_only.kd_head.weight
    torch.testing.assert_close(out["kd_logits"], F.cosine_similarity(out["z"][:, None], w[None], dim=-1) / 0.05,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="needs 3 class names"):
        build_student(str(TINY_CLIP), 3)
    with pytest.raises(ConfigError, match="must contain"):
        build_student(str(TINY_CLIP), 3, classnames=CLASSNAMES, templates=["no placeholder"])
    with pytest.raises(ConfigError, match="--vlm-heads must be one of reference, eq10"):
        build_student(str(TINY_CLIP), 3, init_heads_from_text=False, vlm_heads="paper")
    # Table 5's per-head rows: only the named head starts from the text, the other as with the init off (same seed)
    for which in ("ce", "kd"):
        torch.manual_seed(0)
        one = build_student(str(TINY_CLIP), 3, pretrained=str(tiny_clip_ckpt), classnames=CLASSNAMES, templates=TEMPLATES,
                            align_kd_head=False, vlm_heads="eq10", text_init_heads=which)
        torch.manual_seed(0)
        none = build_student(str(TINY_CLIP), 3, pretrained=str(tiny_clip_ckpt), classnames=CLASSNAMES, templates=TEMPLATES,
                             align_kd_head=False, vlm_heads="eq10", init_heads_from_text=False)
        inited, other = (one.ce_head, one.kd_head) if which == "ce" else (one.kd_head, one.ce_head)
        torch.testing.assert_close(inited.weight, text, atol=1e-5, rtol=1e-5)
        assert torch.equal(other.weight, (none.kd_head if which == "ce" else none.ce_head).weight)
        assert one.build_args["text_init_heads"] == which
    with pytest.raises(ConfigError, match="--text-init-heads must be one of both, ce, kd"):
        build_student(str(TINY_CLIP), 3, classnames=CLASSNAMES, text_init_heads="both-heads")


def test_save_load_roundtrip_resnet(tmp_path):
    torch.manual_seed(0)
    s = build_student("resnet-tiny", num_classes=3)
    s.train()(torch.randn(4, 3, 32, 32))  # move BatchNorm running stats away from their init
    path = save_student(tmp_path / "run" / "model.pt", s, ["a", "b", "c"], alpha=0.4, beta=0.75, extra={"method": "dho"})
    assert not (tmp_path / "run" / "model.pt.tmp").exists()
    loaded, meta = load_student(path)
    assert meta["classnames"] == ["a", "b", "c"] and meta["alpha"] == 0.4 and meta["beta"] == 0.75
    assert meta["extra"] == {"method": "dho"} and meta["preprocess"] == s.preprocess
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    a, b = s.eval()(x), loaded(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_save_load_roundtrip_tiny_clip_without_config_file(tmp_path, tiny_clip_ckpt):
    config = tmp_path / "my-clip.json"
    shutil.copy(TINY_CLIP, config)
    for heads, head_type in (("reference", NormalizedLinearHead), ("eq10", CosineHead)):
        s = build_student(str(config), 3, pretrained=str(tiny_clip_ckpt), classnames=CLASSNAMES, vlm_heads=heads)
        save_student(tmp_path / f"model-{heads}.pt", s, CLASSNAMES)
        config.unlink(missing_ok=True)  # the model file alone is enough to rebuild (config stored in build_args)
        loaded, meta = load_student(tmp_path / f"model-{heads}.pt")
        assert isinstance(loaded.kd_head, head_type)
        x = torch.randn(2, 3, 32, 32)
        a, b = s.eval()(x), loaded(x)
        for k in a:
            torch.testing.assert_close(a[k], b[k])
        assert meta["alpha"] == 0.5 and meta["beta"] == 0.5
        shutil.copy(TINY_CLIP, config)
    # model files written before vlm_heads existed hold Eq. 10 heads
    payload = torch.load(tmp_path / "model-eq10.pt", weights_only=True)
    del payload["build_args"]["vlm_heads"]
    torch.save(payload, tmp_path / "model-old.pt")
    assert isinstance(load_student(tmp_path / "model-old.pt")[0].kd_head, CosineHead)


def test_load_student_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_student(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a dho student model file"):
        load_student(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read model file"):
        load_student(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="class names"):
        save_student(tmp_path / "m.pt", build_student("resnet-tiny", 3), ["a", "b"])


def test_quickgelu_mismatch_with_a_pretrained_tag_is_refused():
    """OpenAI CLIP weights need the -quickgelu config; the plain name would silently use GELU."""
    import pytest

    from dho.errors import ConfigError
    from dho.students import build_student

    with pytest.raises(ConfigError, match="ViT-B-16-quickgelu"):
        build_student("ViT-B-16", 10, pretrained="openai", init_heads_from_text=False)
