"""dho.teacher: loading by config file / checkpoint / local-dir / none, preprocessing, text classifier."""

from __future__ import annotations

import hashlib

import open_clip
import pytest
import torch
import torch.nn.functional as F
from fixtures_models import (  # noqa: F401
    LOCAL_DIR_PREPROCESS,
    TINY_CLIP_NAME,
    tiny_clip_config,
    tiny_teacher_ckpt,
    tiny_teacher_local_dir,
)

from dho.errors import ConfigError
from dho.teacher import load_teacher, resolve_precision
from dho.templates import TIP_ADAPTER_TEMPLATES, fill_templates, resolve_templates

CLASSNAMES = ["red square", "green thing", "blue sky"]
SPEC_TIP_ADAPTER = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
]


def _reference_classifier(ckpt, templates):
    """Zero-shot classifier computed with plain open_clip, independently of dho.teacher."""
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=str(ckpt)).eval()
    tok = open_clip.get_tokenizer(TINY_CLIP_NAME)
    rows = []
    with torch.no_grad():
        for c in CLASSNAMES:
            e = F.normalize(model.encode_text(tok([t.format(c) for t in templates])), dim=-1)  # (T, D)
            rows.append(F.normalize(e.mean(0), dim=-1))
    return model, torch.stack(rows)  # (C, D)


def test_checkpoint_file_defaults_identity_and_classifier(tiny_clip_config, tiny_teacher_ckpt, capsys):
    t = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "auto", classnames=CLASSNAMES)
    # a bare checkpoint carries no preprocessing: open_clip's defaults are used, printed and recorded
    assert t.preprocess.to_dict() == {
        "image_size": 32, "interpolation": "bicubic", "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD), "resize_mode": "shortest",
        "source": "open_clip defaults (the weights carry no preprocessing config)",
    }
    err = capsys.readouterr().err
    assert "carries no preprocessing config" in err and "resize_mode=shortest" in err
    assert t.precision == "fp32" and t.device.type == "cpu" and t.embed_dim == 32
    assert t.identity == {
        "model": "tiny-clip",
        "pretrained": tiny_teacher_ckpt.name,
        "weights_sha256": hashlib.sha256(tiny_teacher_ckpt.read_bytes()).hexdigest(),
        "model_config_sha256": t.identity["model_config_sha256"],
        "prompt_names": "underscores-to-spaces",
    }
    assert t.templates == SPEC_TIP_ADAPTER
    ref_model, ref_cls = _reference_classifier(tiny_teacher_ckpt, SPEC_TIP_ADAPTER)
    assert t.text_classifier.shape == (3, 32)
    torch.testing.assert_close(t.text_classifier, ref_cls, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(t.text_classifier.norm(dim=-1), torch.ones(3))
    # images: normalised embeddings and logits cos / zeta
    x = torch.randn(4, 3, 32, 32)
    emb = t.encode_images(x)
    with torch.no_grad():
        ref_emb = F.normalize(ref_model.encode_image(x), dim=-1)
    torch.testing.assert_close(emb, ref_emb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(t.logits(emb, zeta=0.01), emb @ ref_cls.T * 100.0, atol=1e-4, rtol=1e-5)


def test_class_names_with_underscores_are_prompted_with_spaces_as_the_reference_code(tiny_clip_config, tiny_teacher_ckpt):
    """CoOp's own class names keep '_' (OxfordPets american_bulldog, Caltech101 car_side, UCF101 Apply_Eye_Makeup); the
    DHO reference, Tip-Adapter and CoOp fill templates with classname.replace('_', ' '), restated here."""
    names = ["american_bulldog", "car_side", "Apply_Eye_Makeup", "plain"]
    templates = resolve_templates("coop:oxford_pets") + ["itap of a {}."]
    reference_prompts = [t.format(c.replace("_", " ")) for c in names for t in templates]  # class-major, as Eq. 1's mean
    assert fill_templates(templates, names) == reference_prompts
    assert reference_prompts[0] == "a photo of a american bulldog, a type of pet."
    t = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "fp32", classnames=names, templates=templates)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=str(tiny_teacher_ckpt)).eval()
    tok = open_clip.get_tokenizer(TINY_CLIP_NAME)
    with torch.no_grad():
        rows = [F.normalize(F.normalize(model.encode_text(tok([tp.format(c.replace("_", " ")) for tp in templates])), dim=-1).mean(0), dim=-1)
                for c in names]
        raw = F.normalize(F.normalize(model.encode_text(tok([tp.format(names[0]) for tp in templates])), dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(t.text_classifier, torch.stack(rows), atol=1e-6, rtol=1e-5)
    assert (t.text_classifier[0] - raw).abs().max() > 1e-3  # the raw name would be another row
    assert t.identity["prompt_names"] == "underscores-to-spaces"


def test_local_dir_preprocessing_and_same_weights(tiny_teacher_local_dir, tiny_teacher_ckpt, tiny_clip_config):
    t = load_teacher("ignored-model-name", f"local-dir:{tiny_teacher_local_dir}", "cpu", "fp32", classnames=CLASSNAMES)
    assert {k: t.preprocess.to_dict()[k] for k in LOCAL_DIR_PREPROCESS} == LOCAL_DIR_PREPROCESS  # bilinear, squash, 0.5/0.25
    assert t.preprocess.image_size == 32
    assert "open_clip_config.json" in t.preprocess.source
    assert t.identity["model"] == t.identity["pretrained"] == f"local-dir:{tiny_teacher_local_dir.name}"
    from_file = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "fp32", classnames=CLASSNAMES)
    torch.testing.assert_close(t.text_classifier, from_file.text_classifier)
    assert t.identity["model_config_sha256"] == from_file.identity["model_config_sha256"]


def test_overrides_and_seeded_random_init(tiny_clip_config):
    a = load_teacher(str(tiny_clip_config), "none", "cpu", "fp32", image_size=48, mean=(0.1, 0.2, 0.3),
                     interpolation="bilinear", resize_mode="squash", verbose=False)
    assert a.preprocess.image_size == 48 and a.model.visual.image_size == (48, 48)
    assert a.preprocess.mean == pytest.approx([0.1, 0.2, 0.3])
    assert a.preprocess.std == pytest.approx(list(open_clip.OPENAI_DATASET_STD))
    assert a.preprocess.source.endswith("overridden: image_size, interpolation, mean, resize_mode")
    assert a.encode_images(torch.randn(2, 3, 48, 48)).shape == (2, 32)
    # `none` is a seeded random init: every process builds the same teacher, same fingerprint
    b = load_teacher(str(tiny_clip_config), "none", "cpu", "fp32", verbose=False)
    c = load_teacher(str(tiny_clip_config), "none", "cpu", "fp32", verbose=False)
    assert b.identity == c.identity and b.identity["pretrained"] == "none"
    for (k, v), (_, w) in zip(b.model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(v, w), k


def test_templates_builtin_file_and_errors(tmp_path):
    assert resolve_templates("tip-adapter") == SPEC_TIP_ADAPTER == TIP_ADAPTER_TEMPLATES
    openai = resolve_templates("openai")
    assert len(openai) == 80 and openai[0] == "a bad photo of a {}."
    assert openai == [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert resolve_templates("simple") == ["a photo of a {}."]
    f = tmp_path / "templates.txt"
    f.write_text("a photo of a {}.\n\n  a sketch of the {}.  \n")
    assert resolve_templates(str(f)) == ["a photo of a {}.", "a sketch of the {}."]
    f.write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(ConfigError, match="no placeholder here.*has no '\\{\\}'"):
        resolve_templates(str(f))
    with pytest.raises(ConfigError, match="neither a built-in template set"):
        resolve_templates("imagenet-fancy")


def test_load_errors_are_specific(tiny_clip_config, tmp_path):
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-Nope'"):
        load_teacher("ViT-Nope", "none", "cpu")
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        load_teacher(str(tiny_clip_config), str(tmp_path / "missing.pt"), "cpu")
    # DFN was trained with QuickGELU: the plain model name would be silently wrong
    with pytest.raises(ConfigError, match="use --model ViT-H-14-378-quickgelu"):
        load_teacher("ViT-H-14-378", "dfn5b", "cpu")
    with pytest.raises(ConfigError, match="not a tag of tiny-clip"):
        load_teacher(str(tiny_clip_config), "laion2b", "cpu")
    with pytest.raises(ConfigError, match="local-dir.*open_clip_config.json not found"):
        load_teacher("x", f"local-dir:{tmp_path}", "cpu")
    bad = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="could not build teacher tiny-clip.*matches the model"):
        load_teacher(str(tiny_clip_config), str(bad), "cpu", verbose=False)
    with pytest.raises(ConfigError, match="--precision"):
        load_teacher(str(tiny_clip_config), "none", "cpu", "fp8")


def test_unnormalised_classifier_is_the_template_mean_as_the_reference_dfn_branch(tiny_clip_config, tiny_teacher_ckpt):
    """text_classifier_norm="mean": w_c = mean_t normalise(f_T(t_c)), not re-normalised; logits 100 * f_X . w_c."""
    t = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "auto", classnames=CLASSNAMES,
                     templates="tip-adapter", text_classifier_norm="mean")
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=str(tiny_teacher_ckpt)).eval()
    tok = open_clip.get_tokenizer(TINY_CLIP_NAME)
    with torch.no_grad():
        mean = torch.stack([F.normalize(model.encode_text(tok([tp.format(c) for tp in SPEC_TIP_ADAPTER])), dim=-1).mean(0)
                            for c in CLASSNAMES])  # (C, D)
    torch.testing.assert_close(t.text_classifier, mean, atol=1e-6, rtol=1e-5)
    assert (t.text_classifier.norm(dim=-1) < 1 - 1e-3).all() and t.text_classifier_norm == "mean"
    emb = t.encode_images(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(t.logits(emb, zeta=0.01), 100.0 * emb @ mean.T, atol=1e-4, rtol=1e-5)
    with pytest.raises(ConfigError, match="--text-classifier-norm must be one of renormalize, mean"):
        load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "auto", classnames=CLASSNAMES,
                     text_classifier_norm="unit")


def test_auto_precision_is_fp16_on_cuda_as_the_reference_and_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"


def test_compiled_image_tower_matches_eager(tiny_clip_config, tiny_teacher_ckpt):
    """--compile: the image tower through torch.compile gives the eager embeddings within float tolerance,
    at two batch sizes; the text classifier is the eager one."""
    eager = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "fp32", classnames=CLASSNAMES, verbose=False)
    compiled = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "fp32", classnames=CLASSNAMES,
                            verbose=False, compile=True)
    assert eager.image_encoder is None and compiled.image_encoder is not None
    torch.testing.assert_close(compiled.text_classifier, eager.text_classifier)
    gen = torch.Generator().manual_seed(0)
    for n in (4, 7):
        x = torch.randn(n, 3, 32, 32, generator=gen)
        torch.testing.assert_close(compiled.encode_images(x), eager.encode_images(x), rtol=1e-4, atol=1e-5)
    assert compiled.identity == eager.identity  # an execution detail: the cache's teacher identity is unchanged
    assert compiled.image_encoder.failed is None  # it compiled: no fallback


def test_a_failing_compile_falls_back_to_eager_with_one_line(tiny_clip_config, tiny_teacher_ckpt, monkeypatch, capsys):
    """The default compiles on CUDA only; a compiler that fails (here: every compiled call raises) is said
    in one line, once, and the teacher runs eagerly with the eager numbers."""
    auto = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "fp32", verbose=False, compile=None)
    assert auto.image_encoder is None  # auto: off on CPU

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor: no C++ compiler found\nmore details")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "fp32", verbose=False)
    fallback = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "fp32", verbose=True, compile=True)
    capsys.readouterr()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        assert torch.equal(fallback.encode_images(x), eager.encode_images(x))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["teacher: torch.compile failed (RuntimeError: inductor: no C++ compiler found); running the image "
                   "tower eagerly (same numbers up to float rounding; --no-compile skips compiling)"]


def test_low_precision_casts_the_image_tower_and_stays_close_to_fp32(tiny_clip_config, tiny_teacher_ckpt):
    """bf16: the image tower's weights are bf16 as open_clip casts them (no autocast), the text tower stays fp32; zero-shot probabilities
    within 0.05 of fp32 on random images (bf16 keeps 8 mantissa bits; at 1/zeta = 100 logit scale that is the
    order of the demo teacher's measured 6e-2) and the autocast variant is as close."""
    fp32 = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "fp32", classnames=CLASSNAMES, verbose=False)
    cast = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "bf16", classnames=CLASSNAMES, verbose=False)
    auto = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", "bf16", classnames=CLASSNAMES, verbose=False,
                        cast_weights=False)
    assert cast.image_dtype == torch.bfloat16 and cast.model.visual.conv1.weight.dtype == torch.bfloat16
    assert next(cast.model.transformer.parameters()).dtype == torch.float32 and auto.image_dtype is None
    assert cast.identity == fp32.identity  # the weights' fingerprint is of the checkpoint, before any cast
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probs = {name: torch.softmax(t.logits(t.encode_images(x)) / 2.0, -1) for name, t in
             (("fp32", fp32), ("cast", cast), ("autocast", auto))}
    assert probs["cast"].dtype == torch.float32
    for name in ("cast", "autocast"):
        assert float((probs[name] - probs["fp32"]).abs().max()) < 0.05, name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_image_tower_is_open_clips_precision_build_tensor_by_tensor(tiny_clip_config, tiny_teacher_ckpt, precision):
    """The reference code loads its teacher with open_clip.create_model(..., precision='fp16'): conv, linear and
    attention weights in fp16, LayerNorms and the class/positional embeddings fp32 (14 of the tiny tower's 32
    tensors), LayerNorms computing in fp32. dho's cast image tower is that, tensor by tensor and in its output."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    t = load_teacher(str(tiny_clip_config), str(tiny_teacher_ckpt), "cpu", precision, classnames=CLASSNAMES, verbose=False)
    ref = open_clip.create_model(TINY_CLIP_NAME, pretrained=str(tiny_teacher_ckpt), precision=precision).eval()
    mine, theirs = t.model.visual.state_dict(), ref.visual.state_dict()
    assert mine.keys() == theirs.keys() and len(theirs) == 32
    assert sum(v.dtype == torch.float32 for v in theirs.values()) == 14
    for name, v in theirs.items():
        assert mine[name].dtype == v.dtype, name
        assert torch.equal(mine[name], v), name
    assert [type(m).__name__ for m in t.model.visual.modules()] == [type(m).__name__ for m in ref.visual.modules()]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = F.normalize(ref.encode_image(x.to(dtype)).float(), dim=-1)
    assert torch.equal(t.encode_images(x), expected)
