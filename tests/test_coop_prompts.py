"""CoOp as ce_head (paper §D.2, Table 13's CoOp rows): `dho distill --coop-context N --freeze-backbone` on the tiny CLIP.
The class weights against a plain-torch restatement of CoOp's text path, only the context (and kd_head) trains through
the real loop, both towers bit-identical, resume bit-identical, and model.pt holds a fixed cosine head that every
reader (load_student, evaluate, load_run, export) takes without the text tower."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from dho import evaluate as ev
from dho.distill import DistillConfig, distill
from dho.errors import ConfigError
from dho.students import COOP_INIT_STD, CoopHead, CosineHead, build_student, coop_prompts, load_student
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from test_distill import _cfg, _metrics, world  # noqa: F401  the 4-class world with its tiny-clip caches

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated", "ignore:No pretrained weights")
CLASSES = ["cat", "dog", "race_car"]


def _tiny(n_ctx=4, **kw):
    return build_student(str(TINY_CLIP_CONFIG), len(CLASSES), classnames=CLASSES, coop_context=n_ctx, **kw)


def _text_block_restated(x: torch.Tensor, block, mask: torch.Tensor) -> torch.Tensor:
    """open_clip's pre-norm residual block in plain torch with CLIP's causal mask (-inf above the diagonal)."""
    attn = block.attn
    heads, width = attn.num_heads, x.shape[-1]
    h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q, k, v = (h @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)  # (C, L, W) each
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731  (C, H, L, W/H)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads) + mask  # (C, H, L, L)
    a = torch.softmax(scores, dim=-1) @ split(v)
    x = x + a.transpose(1, 2).reshape(x.shape) @ attn.out_proj.weight.T + attn.out_proj.bias
    h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    h = F.gelu(h @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias)
    return x + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def _coop_restated(head: CoopHead, context: torch.Tensor) -> torch.Tensor:
    """CoOp's text features (Zhou et al. 2022): the prompt [SOS][ctx_1..ctx_N][class tokens][.][EOS] as embeddings (the
    N placeholder tokens' embeddings overwritten by the context), + positions, the causal transformer, ln_final, the
    EOT token (the largest id), the projection, L2-normalised -> (C, D)."""
    tokens = head.tokens  # (C, L)
    c, length = tokens.shape
    x = head.token_embedding.weight[tokens].clone()  # (C, L, W)
    x[:, 1:1 + context.shape[0]] = context
    x = x + head.positional_embedding
    mask = torch.full((length, length), float("-inf")).triu(1)
    for block in head.transformer.resblocks:
        x = _text_block_restated(x, block, mask)
    x = F.layer_norm(x, (x.shape[-1],), head.ln_final.weight, head.ln_final.bias, head.ln_final.eps)
    x = x[torch.arange(c), tokens.argmax(-1)] @ head.text_projection  # (C, D)
    return F.normalize(x, dim=-1)


def test_coop_class_weights_and_logits_equal_a_plain_torch_restatement():
    torch.manual_seed(0)
    student = _tiny().eval()
    head = student.ce_head
    assert isinstance(head, CoopHead) and head.context.shape == (4, 64)
    import open_clip

    tok = open_clip.get_tokenizer("tiny-clip")
    x_token = int(tok(["X"])[0, 1])  # the placeholder word's id, SOS before it
    assert coop_prompts(["race_car"], 2) == ["X X race car."]
    assert torch.equal(head.tokens, tok(coop_prompts(CLASSES, 4)))
    assert (head.tokens[:, 1:5] == x_token).all() and (head.tokens[:, 0] == tok(["X"])[0, 0]).all()
    with torch.no_grad():
        head.context.normal_()  # a context far from the init, so the restatement's overwrite matters
        expected = _coop_restated(head, head.context)
        got = F.normalize(head.class_weights(), dim=-1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        images = torch.randn(2, 3, 32, 32)
        z = student.features(images)
        logit_scale = float(open_clip.create_model("tiny-clip").logit_scale.exp())  # CLIP's exp(logit_scale)
        assert student.build_args["coop_logit_scale"] == pytest.approx(logit_scale)
        torch.testing.assert_close(student(images)["ce_logits"], logit_scale * F.normalize(z, dim=-1) @ expected.T,
                                   rtol=1e-5, atol=1e-5)
        # the placeholder embeddings are not what the text tower reads: another context, other weights
        assert not torch.allclose(_coop_restated(head, torch.zeros(4, 64)), expected)


def test_coop_eval_mode_computes_the_class_weights_once_per_context_value():
    """In-loop validation calls the head batch by batch in eval mode: the text tower runs once per context value, and
    a context changed in place (an optimiser step, a resume's load_state_dict) gives the new class weights."""
    torch.manual_seed(0)
    head = _tiny().ce_head.eval()
    calls = []
    head.transformer.register_forward_hook(lambda *_: calls.append(1))
    z = torch.randn(5, 32)
    with torch.no_grad():
        first = head(z)
        assert torch.equal(head(z), first) and len(calls) == 1
        head.context.add_(0.5)
        second = head(z)
        assert len(calls) == 2 and not torch.allclose(second, first)
        assert torch.equal(second, F.normalize(z, dim=-1) @ F.normalize(head.class_weights(), dim=-1).t() / head.zeta)
    head.train()
    head(z).sum().backward()  # training: every call through the tower, gradients reach the context only
    assert len(calls) == 4 and head.context.grad is not None and head.context.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in head.named_parameters() if n != "context")


def test_coop_init_and_what_trains():
    torch.manual_seed(0)
    student = _tiny(n_ctx=16)
    ctx = student.ce_head.context.detach()
    assert abs(float(ctx.std()) - COOP_INIT_STD) < 0.1 * COOP_INIT_STD and abs(float(ctx.mean())) < 0.005
    student.freeze_backbone().train()
    trains = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trains == ["ce_head.context", "kd_head.weight", "kd_head.bias"]
    assert not student.ce_head.transformer.training and student.ce_head.training  # the text tower stays in eval mode
    assert student.build_args["coop_context"] == 16
    # the other heads draw from the RNG as without CoOp: kd_head is the text-initialised head of a plain student
    torch.manual_seed(0)
    plain = build_student(str(TINY_CLIP_CONFIG), len(CLASSES), classnames=CLASSES)
    assert torch.equal(plain.kd_head.weight, student.kd_head.weight)


def test_coop_refusals(world, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="resnet-tiny' is a CNN student without one"):
        build_student("resnet-tiny", 4, coop_context=2)
    with pytest.raises(ConfigError, match=re.escape("--coop-context must be 1 to 74")):
        _tiny(n_ctx=75)
    with pytest.raises(ConfigError, match="names CoOp's ce_head"):
        _tiny(text_init_heads="ce")
    with pytest.raises(ConfigError, match="add --freeze-backbone"):
        _cfg(world, tmp_path, student=str(TINY_CLIP_CONFIG), coop_context=4)
    with pytest.raises(ConfigError, match="drop --ce-head mlp"):
        _cfg(world, tmp_path, student=str(TINY_CLIP_CONFIG), coop_context=4, freeze_backbone=True, ce_head="mlp")
    with pytest.raises(ConfigError, match="--coop-context must be an integer >= 0"):
        _cfg(world, tmp_path, coop_context=-1)
    from typer.testing import CliRunner

    from dho.cli import app

    help_text = re.sub(r"\s+", " ", CliRunner().invoke(app, ["distill", "--help"]).output)
    assert re.search(r"--coop-context .*?\[default: 0\]", help_text)


# ------------------------------------------------------------------------------------------- training


def _fresh(cfg: DistillConfig):
    classnames = load_student(cfg.out + "/model.pt")[1]["classnames"]
    torch.manual_seed(cfg.seed)
    return build_student(cfg.student, len(classnames), pretrained=cfg.student_pretrained, classnames=classnames,
                         coop_context=cfg.coop_context, init_heads_from_text=cfg.init_heads_from_text)


def _checkpoint(run) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


@pytest.fixture(scope="module")
def coop_run(world, tmp_path_factory, tiny_teacher_ckpt):  # noqa: F811
    run = tmp_path_factory.mktemp("coop") / "run"
    cfg = _cfg(world, run, student=str(TINY_CLIP_CONFIG), student_pretrained=str(tiny_teacher_ckpt), epochs=1,
               freeze_backbone=True, coop_context=4, lr=3e-2, alpha=0.5, beta=1.0)
    distill(cfg)
    return run, cfg


def test_coop_run_trains_the_context_and_kd_head_only(coop_run):
    run, cfg = coop_run
    ckpt = _checkpoint(run)
    after = {k.removeprefix("student."): v for k, v in ckpt["model"].items()}
    fresh = _fresh(cfg)
    before = fresh.state_dict()
    assert after.keys() == before.keys()
    towers = [k for k in after if k.startswith("backbone.") or (k.startswith("ce_head.") and k != "ce_head.context")]
    assert sum(k.startswith("ce_head.transformer.") for k in towers) > 10 and sum(k.startswith("backbone.") for k in towers) > 10
    for k in towers:  # the image tower and the text tower (token embedding, positions, blocks, projection) as built
        assert torch.equal(after[k], before[k]), k
    for k in ("ce_head.context", "kd_head.weight", "kd_head.bias"):
        assert not torch.equal(after[k], before[k]), k
    assert len(ckpt["optimizer"]["state"]) == 3  # context, kd_head weight and bias
    # model.pt: ce_head is the fixed cosine head holding the class weights of the trained context
    student, meta = load_student(run / "model.pt")
    assert isinstance(student.ce_head, CosineHead) and meta["build_args"]["coop_context"] == 4
    assert not any(k.startswith("ce_head.") and k != "ce_head.weight" for k in student.state_dict())
    fresh.load_state_dict(after)
    with torch.no_grad():
        assert torch.equal(student.ce_head.weight, fresh.ce_head.class_weights())
    assert student.ce_head.zeta == fresh.ce_head.zeta and (meta["alpha"], meta["beta"]) == (0.5, 1.0)
    losses = [m["ce"] for m in _metrics(run) if "ce" in m]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_coop_resume_is_bit_identical(coop_run, tmp_path):
    run, cfg = coop_run
    split = tmp_path / "split"
    distill(DistillConfig(**{**cfg.to_dict(), "out": str(split), "max_steps": 2}))
    with pytest.raises(ConfigError, match=re.escape("coop_context: 4 -> 2")):
        distill(DistillConfig(**{**cfg.to_dict(), "out": str(split), "coop_context": 2}), resume=True)
    distill(DistillConfig(**{**cfg.to_dict(), "out": str(split)}), resume=True)
    a, b = _checkpoint(run)["model"], _checkpoint(split)["model"]
    assert a.keys() == b.keys() and "student.ce_head.context" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = load_student(run / "model.pt")[0].state_dict(), load_student(split / "model.pt")[0].state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_coop_model_goes_through_evaluate_and_load_run(coop_run, world):  # noqa: F811
    import dho

    run, _ = coop_run
    result = ev.evaluate(run, world / "val", device="cpu", workers=0)
    student, meta = load_student(run / "model.pt")
    ce, kd, labels = ev.labeled_only(*ev.collect_logits(student, dho.data.Dataset.open(world / "val"), batch_size=8,
                                                         device="cpu", workers=0))
    expected = ev.topk_accuracy(ev.combine_heads(ce, kd, result["alpha"], result["beta"]), labels)[1]
    assert result["combined"]["top1"] == pytest.approx(expected) and (result["alpha"], result["beta"]) == (0.5, 1.0)
    loaded = dho.load_run(run, device="cpu")
    assert isinstance(loaded.student.ce_head, CosineHead)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "hf"])
def test_coop_export_round_trip(fmt, coop_run, world, tmp_path):  # noqa: F811
    """Each export format gives the trained CoOp student's logits: the live CoopHead's (from the checkpoint) equal the
    fixed head's, exactly, and the exported graph's probabilities equal Eq. 11 of them."""
    import dho
    from dho import data
    from dho.export import SUFFIXES, export, weights_path

    run, cfg = coop_run
    out = tmp_path / (f"model.{SUFFIXES[fmt]}" if fmt != "hf" else "hf")
    written = export(run, out, format=fmt)
    student, meta = load_student(run / "model.pt")
    live = _fresh(cfg)
    live.load_state_dict({k.removeprefix("student."): v for k, v in _checkpoint(run)["model"].items()})
    pre = student.preprocess
    ds = data.Dataset.open(world / "val")
    samples = [s for i in range(len(ds.shards)) for s in data.iter_shard(ds, i)]
    uint8 = torch.stack([data.eval_view_uint8(s.image, pre.image_size, pre.interpolation, pre.resize_mode) for s in samples])
    x = data.normalize(uint8, pre.mean, pre.std)  # (N, 3, S, S)
    with torch.no_grad():
        logits = student(x)
        assert torch.equal(live.eval()(x)["ce_logits"], logits["ce_logits"])  # the text path = the fixed head
        rebuilt = dho.load_export(written if fmt == "hf" else weights_path(written))
        again = rebuilt.student.eval()(x)
    assert torch.equal(again["ce_logits"], logits["ce_logits"]) and torch.equal(again["kd_logits"], logits["kd_logits"])
    if fmt != "hf":
        probs = dho.load_export(written).predict(uint8).probs
        torch.testing.assert_close(probs, ev.combine_heads(logits["ce_logits"], logits["kd_logits"], meta["alpha"], meta["beta"]),
                                   rtol=0, atol=1e-5)
