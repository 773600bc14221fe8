"""Non-linear heads of paper §E.2 (`--ce-head mlp`, `--kd-head mlp`): the head against a plain-torch restatement,
training through the real `dho distill` loop, resume, the config refusals, export round trips, evaluate's alpha/beta
search (Table 15), analyze's head spectra and bench-inference's FLOPs."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from dho import evaluate as ev
from dho.analyze import head_spectra
from dho.distill import DistillConfig, distill
from dho.errors import ConfigError
from dho.students import MLPHead, build_student, load_student
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from test_distill import _cfg, _metrics, _state, world  # noqa: F401  the 4-class world with its tiny-clip caches

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated")
MLP = dict(ce_head="mlp", kd_head="mlp", head_hidden=24, head_dropout=0.2)


def _mlp_restated(z: torch.Tensor, fc_w, fc_b, ln_w, ln_b, out_w, out_b, eps: float = 1e-5) -> torch.Tensor:
    """§E.2 in plain torch, at inference (dropout off): Linear -> LayerNorm -> GELU (erf) -> Linear."""
    h = z @ fc_w.T + fc_b  # (B, H)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps) * ln_w + ln_b
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ out_w.T + out_b  # (B, C)


def _params(head: MLPHead) -> list[torch.Tensor]:
    return [p.detach() for p in (head.fc.weight, head.fc.bias, head.norm.weight, head.norm.bias, head.out.weight, head.out.bias)]


def test_mlp_head_is_linear_layernorm_gelu_dropout_linear():
    torch.manual_seed(0)
    student = build_student("resnet-tiny", 5, **MLP).eval()
    with torch.no_grad():  # trained-looking parameters, not the init's zero biases and unit LayerNorm
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32)
    out = student(x)
    z = out["z"]  # (3, 128)
    assert isinstance(student.ce_head, MLPHead) and student.ce_head.fc.weight.shape == (24, 128)
    assert student.ce_head.out.weight.shape == (5, 24) and student.ce_head.drop.p == 0.2
    torch.testing.assert_close(out["ce_logits"], _mlp_restated(z, *_params(student.ce_head)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["kd_logits"], _mlp_restated(z, *_params(student.kd_head)), rtol=1e-5, atol=1e-5)
    # training mode: dropout on the hidden units (p = 0.2), so the logits move; eval mode is deterministic
    student.train()
    torch.manual_seed(1)
    assert not torch.allclose(student.ce_head(z), out["ce_logits"])
    # init as the linear heads: kaiming_uniform(a=sqrt(5)) bounds 1/sqrt(fan_in), zero biases, LayerNorm (1, 0)
    fresh = build_student("resnet-tiny", 5, **MLP)
    for layer, fan_in in ((fresh.kd_head.fc, 128), (fresh.kd_head.out, 24)):
        assert float(layer.weight.detach().abs().max()) <= 1 / math.sqrt(fan_in) and not layer.bias.any()
    assert torch.equal(fresh.kd_head.norm.weight, torch.ones(24)) and not fresh.kd_head.norm.bias.any()
    # linear heads stay nn.Linear with no head forms in the build args (model files as before)
    linear = build_student("resnet-tiny", 5)
    assert type(linear.ce_head) is torch.nn.Linear and "ce_head" not in linear.build_args


def test_vlm_mlp_kd_head_keeps_the_aligned_form_on_the_hidden_and_text_init_sets_linear_heads_only(tiny_teacher_ckpt):  # noqa: F811
    """tiny-clip student: the aligned kd_head's last layer is the reference head (W n(h) + b) / zeta; text init sets
    ce_head exactly as with two linear heads, and never the mlp head (the text embeddings are in z's space)."""
    names, kw = ["cat", "dog", "car"], dict(pretrained=str(tiny_teacher_ckpt), classnames=["cat", "dog", "car"])
    torch.manual_seed(0)
    linear = build_student(str(TINY_CLIP_CONFIG), 3, **kw)
    torch.manual_seed(0)
    student = build_student(str(TINY_CLIP_CONFIG), 3, kd_head="mlp", head_hidden=16, **kw).eval()
    assert torch.equal(student.ce_head.weight, linear.ce_head.weight)  # the text embeddings
    assert not torch.equal(student.kd_head.out.weight[:, :1], linear.kd_head.weight[:, :1])
    head = student.kd_head
    z = torch.randn(4, student.feature_dim)
    h = F.gelu(F.layer_norm(z @ head.fc.weight.T + head.fc.bias, (16,), head.norm.weight, head.norm.bias))  # (4, 16)
    expected = (F.normalize(h, dim=-1) @ head.out.weight.T + head.out.bias) / 0.01  # (4, 3)
    torch.testing.assert_close(head(z), expected.detach(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="--text-init-heads kd names an mlp head"):
        build_student(str(TINY_CLIP_CONFIG), 3, kd_head="mlp", text_init_heads="kd", **kw)
    assert len(names) == 3


def test_config_checks_the_head_options(world, tmp_path):
    with pytest.raises(ConfigError, match="--ce-head must be one of linear, mlp"):
        _cfg(world, tmp_path, ce_head="deep")
    with pytest.raises(ConfigError, match="give --ce-head mlp and/or --kd-head mlp"):
        _cfg(world, tmp_path, head_hidden=64)
    with pytest.raises(ConfigError, match=re.escape("--head-dropout must be in [0, 1)")):
        _cfg(world, tmp_path, kd_head="mlp", head_dropout=1.0)
    with pytest.raises(ConfigError, match="--head-hidden must be an integer >= 1"):
        _cfg(world, tmp_path, kd_head="mlp", head_hidden=0)
    from typer.testing import CliRunner

    from dho.cli import app

    help_text = re.sub(r"\s+", " ", CliRunner().invoke(app, ["distill", "--help"]).output)
    for flag, default in (("--ce-head", "linear"), ("--kd-head", "linear"), ("--head-hidden", "none"), ("--head-dropout", "0.1")):
        assert re.search(re.escape(flag) + r" .*?\[default: " + re.escape(default) + r"\]", help_text), flag


@pytest.fixture(scope="module")
def mlp_run(world, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("mlp") / "run"
    distill(_cfg(world, run, epochs=1, log_grad_cosine=2, **MLP))
    return run


def test_distill_trains_both_mlp_heads_and_records_them(mlp_run):
    student, meta = load_student(mlp_run / "model.pt")
    assert isinstance(student.ce_head, MLPHead) and isinstance(student.kd_head, MLPHead)
    assert {k: meta["build_args"][k] for k in MLP} == MLP
    config = json.loads((mlp_run / "config.json").read_text())
    assert {k: config[k] for k in MLP} == MLP
    torch.manual_seed(0)
    init = build_student("resnet-tiny", 4, **MLP)
    for name in ("ce_head", "kd_head"):
        for p, q in zip(getattr(student, name).parameters(), getattr(init, name).parameters()):
            assert not torch.equal(p, q), name  # every layer of both heads trained
    losses = [m["loss"] for m in _metrics(mlp_run) if "loss" in m]
    assert len(losses) == 40 // 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    diag = [m for m in _metrics(mlp_run) if "eig_ce" in m]
    assert diag and all("eig_kd" in m and "eig_ce_kd" not in m for m in diag)  # no cross term between hidden spaces


def test_resume_with_mlp_heads_is_bit_identical_and_refuses_changed_heads(world, mlp_run, tmp_path):  # noqa: F811
    split = tmp_path / "split"
    distill(_cfg(world, split, epochs=1, log_grad_cosine=2, max_steps=3, **MLP))
    for change, name in (({"kd_head": "linear"}, "kd_head: 'mlp' -> 'linear'"), ({"head_hidden": 32}, "head_hidden: 24 -> 32"),
                         ({"head_dropout": 0.0}, "head_dropout: 0.2 -> 0.0")):
        with pytest.raises(ConfigError, match=re.escape(name)):
            distill(_cfg(world, split, epochs=1, log_grad_cosine=2, **{**MLP, **change}), resume=True)
    distill(_cfg(world, split, epochs=1, log_grad_cosine=2, **MLP), resume=True)
    a, b = _state(mlp_run), _state(split)
    assert a.keys() == b.keys() and any(".norm." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "torchscript", "hf"])
def test_export_round_trip_rebuilds_the_mlp_heads(fmt, mlp_run, world, tmp_path):  # noqa: F811
    import dho
    from dho import data
    from dho.export import SUFFIXES, export, weights_path

    out = tmp_path / (f"model.{SUFFIXES[fmt]}" if fmt != "hf" else "hf")
    written = export(mlp_run, out, format=fmt)
    student, meta = load_student(mlp_run / "model.pt")
    pre = student.preprocess
    ds = data.Dataset.open(world / "val")
    samples = [s for i in range(len(ds.shards)) for s in data.iter_shard(ds, i)]
    uint8 = torch.stack([data.eval_view_uint8(s.image, pre.image_size, pre.interpolation, pre.resize_mode) for s in samples])
    x = data.normalize(uint8, pre.mean, pre.std)  # (N, 3, S, S)
    with torch.no_grad():
        logits = student(x)
    rebuilt = dho.load_export(written if fmt == "hf" else weights_path(written))  # the weights rebuilt from build args
    assert isinstance(rebuilt.student.kd_head, MLPHead) and rebuilt.student.kd_head.fc.out_features == 24
    with torch.no_grad():
        again = rebuilt.student.eval()(x)
    assert torch.equal(again["ce_logits"], logits["ce_logits"]) and torch.equal(again["kd_logits"], logits["kd_logits"])
    if fmt != "hf":  # the graph itself: uint8 images of the student's size in (its resize is then the identity)
        probs = dho.load_export(written).predict(uint8).probs
        torch.testing.assert_close(probs, ev.combine_heads(logits["ce_logits"], logits["kd_logits"], meta["alpha"], meta["beta"]),
                                   rtol=0, atol=1e-5)


def test_evaluate_search_on_scores_the_mlp_heads_table_15(mlp_run, world, tmp_path):  # noqa: F811
    """Table 15's head decomposition: `dho evaluate --search-on` gives ce_head, kd_head and the combination at the
    alpha/beta it picked; each equals top-1 of the mlp heads' own logits."""
    from dho import data

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes((mlp_run / "model.pt").read_bytes())
    result = ev.evaluate(run, world / "labeled", search_on=world / "val", device="cpu", workers=0)
    chosen = json.loads((run / "alpha_beta.json").read_text())
    assert (result["alpha"], result["beta"]) == (chosen["alpha"], chosen["beta"])
    student, _ = load_student(run / "model.pt")
    pre = student.preprocess
    ds = data.Dataset.open(world / "labeled")
    samples = [s for i in range(len(ds.shards)) for s in data.iter_shard(ds, i)]
    x = data.normalize(torch.stack([data.eval_view_uint8(s.image, pre.image_size, pre.interpolation, pre.resize_mode)
                                    for s in samples]), pre.mean, pre.std)
    labels = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        out = student(x)
    pct = lambda logits: 100.0 * float((logits.argmax(-1) == labels).float().mean())  # noqa: E731
    assert result["ce_head"]["top1"] == pytest.approx(pct(out["ce_logits"]))
    assert result["kd_head"]["top1"] == pytest.approx(pct(out["kd_logits"]))
    mix = chosen["alpha"] * out["ce_logits"].softmax(-1) + (1 - chosen["alpha"]) * (out["kd_logits"] / chosen["beta"]).softmax(-1)
    assert result["combined"]["top1"] == pytest.approx(pct(mix))


def test_analyze_head_spectra_of_mlp_heads_are_their_last_layers(mlp_run):
    student, _ = load_student(mlp_run / "model.pt")
    res = head_spectra(student)
    for name in ("ce_head", "kd_head"):
        w = getattr(student, name).out.weight.detach().double()  # (C, H)
        assert res[name] == pytest.approx(float(torch.linalg.eigvalsh(w @ w.T).max()), rel=1e-9)
        assert res[f"{name}_input"] == "h(z)"
    assert res["ce_kd"] is None


def test_bench_inference_counts_the_mlp_kd_head(world, mlp_run, tmp_path):  # noqa: F811
    from dho.inference_bench import bench_inference

    result = bench_inference(mlp_run, batch_sizes=(1,), device="cpu", teacher=False, warmup=1, iters=1, min_seconds=0.0)
    d, h, c = 128, 24, 4
    assert result["models"]["student"]["flops"] - result["models"]["single_head"]["flops"] == 2 * (d * h + h * c)
    params = result["models"]["student"]["params"] - result["models"]["single_head"]["params"]
    assert params == d * h + h + 2 * h + h * c + c  # fc, LayerNorm, out


def test_linear_default_config_is_unchanged(world, tmp_path):  # noqa: F811
    cfg = _cfg(world, tmp_path)
    assert (cfg.ce_head, cfg.kd_head, cfg.head_hidden, cfg.head_dropout) == ("linear", "linear", None, 0.1)
    assert isinstance(cfg, DistillConfig)
