"""PromptSRC as ce_head (Khattak et al. 2023; paper §D.2, Table 13's PromptSRC rows): `dho distill --promptsrc-tokens N
--promptsrc-depth D --freeze-backbone` on the tiny CLIP. Its losses and GPA weights against restatements of its
equations, both prompted towers against plain-torch restatements, only the prompts (and kd_head) train through the
real loop, both towers bit-identical, model.pt = the GPA aggregate, resume bit-identical, and every reader (load_student,
evaluate, load_run, export) takes the model without the text tower."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from dho import evaluate as ev
from dho import losses
from dho.distill import DistillConfig, distill
from dho.errors import ConfigError
from dho.students import (PROMPTSRC_INIT_STD, CosineHead, PromptSrcHead, VptTower, build_student, load_student,
                          promptsrc_templates)
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from test_coop_prompts import _text_block_restated
from test_distill import _cfg, _metrics, world  # noqa: F401  the 4-class world with its tiny-clip caches
from test_frozen_adaptation import _block_restated

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated", "ignore:No pretrained weights")
CLASSES = ["cat", "dog", "race_car"]
PSRC = dict(promptsrc_tokens=4, promptsrc_depth=2)  # the tiny towers have 2 blocks (PromptSRC's DG config: 4, 3)


def _tiny(**kw):
    return build_student(str(TINY_CLIP_CONFIG), len(CLASSES), classnames=CLASSES, **{**PSRC, **kw})


# ------------------------------------------------------------------------------------------- losses and GPA


def _unit(x):
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


def _softmax(x):
    e = (x - x.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def test_scl_losses_equal_a_restatement_of_promptsrcs_equations():
    """L_SCL-text / -image: mean over elements of |n(f_p) - n(f)|; L_SCL-logits: sum_{b,c} p log(p / q) / (B C), p the
    frozen zero-shot softmax, q the prompted; L_SCL = 25 L_text + 10 L_image + L_logits (its DG weights)."""
    g = torch.Generator().manual_seed(0)
    text, frozen_text = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    image, frozen_image = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    logits, frozen_logits = 3 * torch.randn(4, 3, generator=g), 3 * torch.randn(4, 3, generator=g)
    l1 = lambda a, b: sum(abs(float(v)) for v in (_unit(a) - _unit(b)).flatten()) / a.numel()  # noqa: E731
    p, q = _softmax(frozen_logits.double()), _softmax(logits.double())
    kl = sum(float(p[b, c] * math.log(p[b, c] / q[b, c])) for b in range(4) for c in range(3)) / 12
    assert float(losses.scl_feature_loss(text, frozen_text)) == pytest.approx(l1(text, frozen_text), rel=1e-6)
    assert float(losses.scl_feature_loss(image, frozen_image)) == pytest.approx(l1(image, frozen_image), rel=1e-6)
    assert float(losses.scl_logit_loss(logits, frozen_logits)) == pytest.approx(kl, rel=1e-5)
    assert float(losses.scl_logit_loss(logits, logits)) == pytest.approx(0.0, abs=1e-7)
    reg = losses.promptsrc_regularizer(text, frozen_text, image, frozen_image, logits, frozen_logits)
    expected = 25 * l1(text, frozen_text) + 10 * l1(image, frozen_image) + kl
    assert float(reg["scl"]) == pytest.approx(expected, rel=1e-5)
    assert (losses.PROMPTSRC_TEXT_WEIGHT, losses.PROMPTSRC_IMAGE_WEIGHT) == (25.0, 10.0)


def test_gpa_weights_equal_a_restatement_of_the_gaussian():
    """PromptSRC's GPA weights over its 20 epochs: N(6, 10^2) density at e = 1..20, normalised; another run length
    evaluates the Gaussian at the same places of the schedule (e * 20 / epochs)."""
    for epochs in (20, 3, 40):
        dens = [math.exp(-((e * 20 / epochs - 6) ** 2) / (2 * 10**2)) for e in range(1, epochs + 1)]
        expected = [d / sum(dens) for d in dens]
        got = losses.gpa_weights(epochs)
        assert got == pytest.approx(expected, rel=1e-12) and sum(got) == pytest.approx(1.0)
    w = losses.gpa_weights(20)
    assert max(range(20), key=w.__getitem__) == 5 and w[5] / w[19] == pytest.approx(math.exp((14**2 - 0) / 200))


# ------------------------------------------------------------------------------------------- the prompted towers


def _vision_restated(images, tower, prompts):
    """PromptSRC's (IVLP) image tower: patches + class token + positions, the block-0 prompts appended after the
    patches, ln_pre over all; block i < D reads its own prompts in place of the last N tokens; cls -> ln_post, proj."""
    depth, n, width = prompts.shape
    p, b = tower.conv1.kernel_size[0], images.shape[0]
    patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
    x = patches @ tower.conv1.weight.reshape(width, -1).T  # (B, P, W)
    x = torch.cat([tower.class_embedding.expand(b, 1, width), x], dim=1) + tower.positional_embedding
    x = torch.cat([x, prompts[0].expand(b, n, width)], dim=1)
    x = F.layer_norm(x, (width,), tower.ln_pre.weight, tower.ln_pre.bias, tower.ln_pre.eps)
    for i, block in enumerate(tower.transformer.resblocks):
        if 0 < i < depth:
            x = torch.cat([x[:, :-n], prompts[i].expand(b, n, width)], dim=1)
        x = _block_restated(x, block)
    cls = F.layer_norm(x[:, 0], (width,), tower.ln_post.weight, tower.ln_post.bias, tower.ln_post.eps)
    return cls @ tower.proj


def _text_restated(head, context, deep):
    """PromptSRC's text tower: [SOS][ctx][class tokens . EOS] + positions; block i (1 <= i < D) reads deep[i - 1] in
    place of the N tokens after SOS; ln_final, the EOT token, the projection, L2-normalised -> (C, D)."""
    tokens = head.tokens
    c, length = tokens.shape
    n = context.shape[0]
    x = head.token_embedding.weight[tokens].clone()
    x[:, 1:1 + n] = context
    x = x + head.positional_embedding
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i, block in enumerate(head.transformer.resblocks):
        if 0 < i <= deep.shape[0]:
            x = torch.cat([x[:, :1], deep[i - 1].expand(c, n, -1), x[:, 1 + n:]], dim=1)
        x = _text_block_restated(x, block, mask)
    x = F.layer_norm(x, (x.shape[-1],), head.ln_final.weight, head.ln_final.bias, head.ln_final.eps)
    return F.normalize(x[torch.arange(c), tokens.argmax(-1)] @ head.text_projection, dim=-1)


def test_prompted_towers_and_logits_equal_plain_torch_restatements():
    torch.manual_seed(0)
    student = _tiny().eval()
    head, tower = student.ce_head, student.backbone
    assert isinstance(head, PromptSrcHead) and isinstance(tower, VptTower) and tower.placement == "ivlp"
    assert head.deep.shape == (1, 4, 64) and tower.prompts.shape == (2, 4, 64)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for prm in (head.context, head.deep, tower.prompts):
            prm.normal_()  # far from the init: every prompt matters
        t = _text_restated(head, head.context, head.deep)
        torch.testing.assert_close(F.normalize(head.class_weights(), dim=-1), t, rtol=1e-5, atol=1e-6)
        z = student.features(x)
        torch.testing.assert_close(z, _vision_restated(x, tower.tower, tower.prompts), rtol=1e-4, atol=1e-5)
        scale = student.build_args["promptsrc_logit_scale"]
        torch.testing.assert_close(student(x)["ce_logits"], scale * F.normalize(z, dim=-1) @ t.T, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(_text_restated(head, head.context, torch.zeros_like(head.deep)), t)  # deep prompts act
        assert torch.equal(tower.zero_shot(x), tower.tower(x)) and not torch.allclose(tower.zero_shot(x), z)
        frozen = tower.zero_shot(x)
        torch.testing.assert_close(head.frozen_logits(frozen), scale * F.normalize(frozen, dim=-1) @ head.frozen_text.T)


def test_promptsrc_init_frozen_text_and_what_trains():
    import open_clip

    torch.manual_seed(0)
    student = _tiny()
    head = student.ce_head
    tok = open_clip.get_tokenizer("tiny-clip")
    assert torch.equal(head.tokens, tok(["a photo of a cat.", "a photo of a dog.", "a photo of a race car."]))
    words = tok(["a photo of a"])[0, 1:5]
    assert torch.equal(head.context.detach(), head.token_embedding.weight[words])  # "a photo of a" (its CTX_INIT)
    for prompts in (head.deep, student.backbone.prompts):  # N(0, 0.02^2)
        assert abs(float(prompts.detach().std()) - PROMPTSRC_INIT_STD) < 0.25 * PROMPTSRC_INIT_STD
    # the frozen text features: the frozen CLIP's encode_text over the 60 templates, averaged, L2-normalised
    assert len(promptsrc_templates()) == 60 and promptsrc_templates()[0] == "a bad photo of a {}."
    clip = open_clip.create_model("tiny-clip").eval()  # its text tower given the student's (frozen) text weights
    clip.load_state_dict({**clip.state_dict(), **{k: v for k, v in _text_state(head).items()}}, strict=True)
    with torch.no_grad():
        rows = [clip.encode_text(tok([t.replace("{}", c.replace("_", " ")) for t in promptsrc_templates()])).mean(0)
                for c in CLASSES]
    torch.testing.assert_close(head.frozen_text, F.normalize(torch.stack(rows), dim=-1), rtol=1e-5, atol=1e-6)
    student.freeze_backbone().train()
    trains = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trains == ["backbone.prompts", "ce_head.context", "ce_head.deep", "kd_head.weight", "kd_head.bias"]
    assert {k: student.build_args[k] for k in PSRC} == PSRC and "coop_context" not in student.build_args


def _text_state(head: PromptSrcHead) -> dict:
    """The text tower's weights as open_clip names them (token_embedding, positional_embedding, transformer, ...)."""
    keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    return {k: v for k, v in head.state_dict().items() if k.startswith(keep)}


def test_promptsrc_refusals(world, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="resnet-tiny' is a CNN student without them"):
        build_student("resnet-tiny", 4, **PSRC)
    with pytest.raises(ConfigError, match=re.escape("--promptsrc-depth must be 1 to 2")):
        _tiny(promptsrc_depth=3)
    with pytest.raises(ConfigError, match="drop --coop-context"):
        _tiny(coop_context=4)
    with pytest.raises(ConfigError, match="names PromptSRC's ce_head"):
        _tiny(text_init_heads="ce")
    tiny = dict(student=str(TINY_CLIP_CONFIG))
    with pytest.raises(ConfigError, match="add --freeze-backbone"):
        _cfg(world, tmp_path, **tiny, **PSRC)
    with pytest.raises(ConfigError, match="needs both --promptsrc-tokens N and --promptsrc-depth D"):
        _cfg(world, tmp_path, **tiny, freeze_backbone=True, promptsrc_tokens=4)
    with pytest.raises(ConfigError, match="use --method dho or ce"):
        _cfg(world, tmp_path, **tiny, freeze_backbone=True, method="ce+kd", **PSRC)
    with pytest.raises(ConfigError, match="drop --vpt-tokens, --ema"):
        _cfg(world, tmp_path, **tiny, freeze_backbone=True, vpt_tokens=2, vpt_depth=1, ema=0.99, **PSRC)
    from typer.testing import CliRunner

    from dho.cli import app

    help_text = re.sub(r"\s+", " ", CliRunner().invoke(app, ["distill", "--help"]).output)
    for flag in ("--promptsrc-tokens", "--promptsrc-depth"):
        assert re.search(re.escape(flag) + r" .*?\[default: 0\]", help_text), flag


# ------------------------------------------------------------------------------------------- training


def _fresh(cfg: DistillConfig):
    torch.manual_seed(cfg.seed)
    return build_student(cfg.student, 4, pretrained=cfg.student_pretrained, classnames=_classnames(cfg),
                         promptsrc_tokens=cfg.promptsrc_tokens, promptsrc_depth=cfg.promptsrc_depth)


def _classnames(cfg):
    return load_student(cfg.out + "/model.pt")[1]["classnames"]


def _checkpoint(path) -> dict:
    return torch.load(path, weights_only=False)


def _model(ckpt: dict) -> dict:
    return {k.removeprefix("student."): v for k, v in ckpt["model"].items()}


@pytest.fixture(scope="module")
def psrc_run(world, tmp_path_factory, tiny_teacher_ckpt):  # noqa: F811
    run = tmp_path_factory.mktemp("promptsrc") / "run"
    cfg = _cfg(world, run, student=str(TINY_CLIP_CONFIG), student_pretrained=str(tiny_teacher_ckpt), epochs=3,
               freeze_backbone=True, lr=3e-2, alpha=0.5, beta=1.0, keep_checkpoints=20, checkpoint_every=1000, **PSRC)
    distill(cfg)
    return run, cfg


TRAINED = ("backbone.prompts", "ce_head.context", "ce_head.deep", "kd_head.weight", "kd_head.bias")


def test_promptsrc_run_trains_the_prompts_and_kd_head_only(psrc_run):
    run, cfg = psrc_run
    ckpt = _checkpoint(run / "checkpoints" / "last.pt")
    after, before = _model(ckpt), _fresh(cfg).state_dict()
    assert after.keys() == before.keys()
    frozen = [k for k in after if k not in TRAINED]
    assert sum(k.startswith("ce_head.transformer.") for k in frozen) > 10 and sum(k.startswith("backbone.tower.") for k in frozen) > 10
    assert "ce_head.frozen_text" in frozen
    for k in frozen:  # both towers, the frozen text features
        assert torch.equal(after[k], before[k]), k
    for k in TRAINED:
        assert not torch.equal(after[k], before[k]), k
    assert len(ckpt["optimizer"]["state"]) == len(TRAINED)
    steps = [m for m in _metrics(run) if "loss" in m]
    for m in steps:  # L = lambda (CE + L_SCL) + (1 - lambda) KD, L_SCL = 25 text + 10 image + logits
        scl = 25 * m["scl_text"] + 10 * m["scl_image"] + m["scl_logits"]
        assert m["scl"] == pytest.approx(scl, rel=1e-4, abs=1e-5)
        assert m["loss"] == pytest.approx(0.5 * (m["ce"] + m["scl"]) + 0.5 * m["kd"], rel=1e-4, abs=1e-5)
    assert steps[0]["scl_image"] > 0 and steps[-1]["ce"] < steps[0]["ce"]


def test_model_file_holds_the_gpa_aggregate_of_the_epochs(psrc_run):
    """model.pt's trained parameters = sum_e w_e P_e over the three epoch-end checkpoints (w: gpa_weights(3)), its
    ce_head the fixed class weights of the aggregated text prompts."""
    run, cfg = psrc_run
    ends = sorted(run.glob("checkpoints/step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    per_epoch = [_model(_checkpoint(p)) for p in ends]
    assert len(per_epoch) == 3 and _checkpoint(ends[-1])["gpa"]["epochs_added"] == 3
    w = losses.gpa_weights(3)
    student, meta = load_student(run / "model.pt")
    state = student.state_dict()
    aggregate = {k: sum(wi * s[k].double() for wi, s in zip(w, per_epoch)) for k in TRAINED}
    for k in ("backbone.prompts", "kd_head.weight", "kd_head.bias"):
        torch.testing.assert_close(state[k].double(), aggregate[k], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(state[k], per_epoch[-1][k])  # not the last epoch's
    live = _fresh(cfg)
    live.load_state_dict({**per_epoch[-1], **{k: v.float() for k, v in aggregate.items()}})
    with torch.no_grad():
        torch.testing.assert_close(student.ce_head.weight, live.ce_head.class_weights(), rtol=1e-5, atol=1e-6)
    assert isinstance(student.ce_head, CosineHead) and isinstance(student.backbone, VptTower)
    assert student.backbone.placement == "ivlp" and (meta["alpha"], meta["beta"]) == (0.5, 1.0)
    assert not any(k.startswith("ce_head.") and k != "ce_head.weight" for k in state)  # no text tower in model.pt


def test_promptsrc_resume_is_bit_identical(psrc_run, tmp_path):
    run, cfg = psrc_run
    split = tmp_path / "split"
    distill(DistillConfig(**{**cfg.to_dict(), "out": str(split), "max_steps": 6}))  # inside epoch 2
    with pytest.raises(ConfigError, match=re.escape("promptsrc_depth: 2 -> 1")):
        distill(DistillConfig(**{**cfg.to_dict(), "out": str(split), "promptsrc_depth": 1}), resume=True)
    distill(DistillConfig(**{**cfg.to_dict(), "out": str(split)}), resume=True)
    a, b = _checkpoint(run / "checkpoints" / "last.pt"), _checkpoint(split / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["gpa"]["epochs_added"] == b["gpa"]["epochs_added"] == 3
    assert all(torch.equal(a["gpa"]["sums"][k], b["gpa"]["sums"][k]) for k in a["gpa"]["sums"])
    ma, mb = load_student(run / "model.pt")[0].state_dict(), load_student(split / "model.pt")[0].state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "hf"])
def test_promptsrc_model_goes_through_evaluate_load_run_and_export(fmt, psrc_run, world, tmp_path):  # noqa: F811
    import dho
    from dho import data
    from dho.export import SUFFIXES, export, weights_path

    run, _ = psrc_run
    student, meta = load_student(run / "model.pt")
    if fmt == "pt2":
        result = ev.evaluate(run, world / "val", device="cpu", workers=0)
        ce, kd, labels = ev.labeled_only(*ev.collect_logits(student, data.Dataset.open(world / "val"), batch_size=8,
                                                             device="cpu", workers=0))
        expected = ev.topk_accuracy(ev.combine_heads(ce, kd, result["alpha"], result["beta"]), labels)[1]
        assert result["combined"]["top1"] == pytest.approx(expected)
        assert isinstance(dho.load_run(run, device="cpu").student.backbone, VptTower)
    out = tmp_path / (f"model.{SUFFIXES[fmt]}" if fmt != "hf" else "hf")
    written = export(run, out, format=fmt)
    pre = student.preprocess
    ds = data.Dataset.open(world / "val")
    samples = [s for i in range(len(ds.shards)) for s in data.iter_shard(ds, i)]
    uint8 = torch.stack([data.eval_view_uint8(s.image, pre.image_size, pre.interpolation, pre.resize_mode) for s in samples])
    x = data.normalize(uint8, pre.mean, pre.std)
    with torch.no_grad():
        logits = student(x)
        again = dho.load_export(written if fmt == "hf" else weights_path(written)).student.eval()(x)
    assert torch.equal(again["ce_logits"], logits["ce_logits"]) and torch.equal(again["kd_logits"], logits["kd_logits"])
    if fmt != "hf":
        probs = dho.load_export(written).predict(uint8).probs
        torch.testing.assert_close(probs, ev.combine_heads(logits["ce_logits"], logits["kd_logits"], meta["alpha"], meta["beta"]),
                                   rtol=0, atol=1e-5)
