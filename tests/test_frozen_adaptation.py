"""Frozen-backbone adaptation (paper §D.2, Table 13): `--freeze-backbone` (linear evaluation with and without DHO's
dual heads) and VPT-deep (`--vpt-tokens N --vpt-depth D`) on open_clip ViT students. Frozen weights stay bit-identical
through the real `dho distill` loop, only heads and prompts train, resume is bit-identical, the VPT forward against a
plain-torch restatement on the tiny ViT, and every reader (load_student, evaluate, load_run, export) takes the prompts."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from dho import evaluate as ev
from dho.distill import DistillConfig, distill
from dho.errors import ConfigError
from dho.students import CosineHead, VptTower, build_student, load_student, vpt_init_bound
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from test_distill import _cfg, _metrics, _state, world  # noqa: F401  the 4-class world with its tiny-clip caches

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated", "ignore:No pretrained weights")
VPT = dict(vpt_tokens=3, vpt_depth=2)


# ------------------------------------------------------------------------------------------- VPT forward


def _block_restated(x: torch.Tensor, block) -> torch.Tensor:
    """open_clip's pre-norm residual block in plain torch: x + attn(ln_1 x), then + c_proj(gelu(c_fc(ln_2 x)))."""
    attn = block.attn
    heads, width = attn.num_heads, x.shape[-1]
    h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q, k, v = (h @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)  # (B, L, W) each
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731  (B, H, L, W/H)
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads), dim=-1) @ split(v)
    x = x + a.transpose(1, 2).reshape(x.shape) @ attn.out_proj.weight.T + attn.out_proj.bias
    h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    h = F.gelu(h @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias)
    return x + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def _vpt_restated(images: torch.Tensor, tower, prompts: torch.Tensor) -> torch.Tensor:
    """VPT-deep (Jia et al. 2022, Eq. 3-4) on a CLIP ViT: patches + class token + positions, ln_pre; block i < D reads
    [cls, P_i, patches] (the prompts block i - 1 output dropped); the class token through ln_post and proj."""
    depth, n, width = prompts.shape
    p = tower.conv1.kernel_size[0]
    b = images.shape[0]
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, 3, g, g, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)  # (B, g*g, 3*p*p), row-major grid
    x = patches @ tower.conv1.weight.reshape(width, -1).T  # (B, P, W): the patch conv (no bias)
    x = torch.cat([tower.class_embedding.expand(b, 1, width), x], dim=1) + tower.positional_embedding
    x = F.layer_norm(x, (width,), tower.ln_pre.weight, tower.ln_pre.bias, tower.ln_pre.eps)
    for i, block in enumerate(tower.transformer.resblocks):
        if i < depth:
            keep = x[:, 1:] if i == 0 else x[:, 1 + n:]
            x = torch.cat([x[:, :1], prompts[i].expand(b, n, width), keep], dim=1)
        x = _block_restated(x, block)
    cls = F.layer_norm(x[:, 0], (width,), tower.ln_post.weight, tower.ln_post.bias, tower.ln_post.eps)
    return cls @ tower.proj


def _tiny_vit(**kw):
    return build_student(str(TINY_CLIP_CONFIG), 3, classnames=["cat", "dog", "car"], **kw)


@pytest.mark.parametrize("depth", [1, 2])
def test_vpt_forward_equals_a_plain_torch_restatement(depth):
    torch.manual_seed(0)
    student = _tiny_vit(vpt_tokens=3, vpt_depth=depth).eval()
    tower = student.backbone.tower
    assert isinstance(student.backbone, VptTower) and student.backbone.prompts.shape == (depth, 3, 64)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = student(x)["z"]  # (2, 32)
        expected = _vpt_restated(x, tower, student.backbone.prompts)
        plain = tower(x)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(z, plain, atol=1e-3)  # the prompts do reach the class token


def test_vpt_init_is_vpts_uniform_bound_and_zero_tokens_is_the_plain_tower():
    # VPT's code: val = sqrt(6 / (3 * prod(patch_size) + prompt_dim)); ViT-B/16: sqrt(6 / (3 * 256 + 768)) = 0.0625
    assert vpt_init_bound((16, 16), 768) == pytest.approx(0.0625)
    torch.manual_seed(0)
    student = _tiny_vit(vpt_tokens=50, vpt_depth=2)
    bound = math.sqrt(6 / (3 * 8 * 8 + 64))  # the tiny ViT: patch 8, width 64
    prompts = student.backbone.prompts.detach()
    assert float(prompts.abs().max()) <= bound and float(prompts.abs().max()) > 0.95 * bound
    assert abs(float(prompts.std()) - bound / math.sqrt(3)) < 0.05 * bound  # U(-a, a) has std a / sqrt(3)
    torch.manual_seed(0)
    plain = _tiny_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for depth in (1, 2):
            assert torch.equal(VptTower(plain.backbone, 0, depth)(x), plain.backbone(x))
    assert "vpt_tokens" not in plain.build_args  # files without prompts are as before the option


def test_vpt_and_freeze_refusals(world, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="resnet-tiny' is a CNN student"):
        build_student("resnet-tiny", 4, vpt_tokens=2, vpt_depth=1)
    with pytest.raises(ConfigError, match=re.escape("--vpt-depth must be 1 to 2")):
        _tiny_vit(vpt_tokens=2, vpt_depth=3)
    with pytest.raises(ConfigError, match="VPT needs both --vpt-tokens N and --vpt-depth D"):
        _cfg(world, tmp_path, vpt_tokens=4)
    with pytest.raises(ConfigError, match="--vpt-tokens must be an integer >= 0"):
        _cfg(world, tmp_path, vpt_tokens=-1, vpt_depth=1)
    with pytest.raises(ConfigError, match="--log-grad-cosine compares the gradients of g"):
        _cfg(world, tmp_path, freeze_backbone=True, log_grad_cosine=2)
    _cfg(world, tmp_path, freeze_backbone=True, log_grad_cosine=2, student=str(TINY_CLIP_CONFIG), **VPT)  # prompts train
    from typer.testing import CliRunner

    from dho.cli import app

    help_text = re.sub(r"\s+", " ", CliRunner().invoke(app, ["distill", "--help"]).output)
    for flag, default in (("--freeze-backbone", "off"), ("--vpt-tokens", "0"), ("--vpt-depth", "0")):
        assert re.search(re.escape(flag) + r" .*?\[default: " + re.escape(default) + r"\]", help_text), flag


# ------------------------------------------------------------------------------------------- training


def _fresh(cfg: DistillConfig):
    """The student as the run builds it (seeded with the run's seed, its class names)."""
    classnames = load_student(cfg.out + "/model.pt")[1]["classnames"]
    torch.manual_seed(cfg.seed)
    return build_student(cfg.student, len(classnames), pretrained=cfg.student_pretrained, classnames=classnames,
                         vpt_tokens=cfg.vpt_tokens, vpt_depth=cfg.vpt_depth, coop_context=cfg.coop_context,
                         promptsrc_tokens=cfg.promptsrc_tokens, promptsrc_depth=cfg.promptsrc_depth,
                         init_heads_from_text=cfg.init_heads_from_text)


def test_linear_evaluation_keeps_the_cnn_backbone_and_its_batchnorm_statistics_bit_identical(world, tmp_path):  # noqa: F811
    """resnet-tiny, --freeze-backbone, dho and the single-head ce+kd: every backbone tensor (BatchNorm running
    statistics included: eval mode) is as built, the method's heads moved, the optimiser holds the heads only."""
    for method, trained in (("dho", ("ce_head", "kd_head")), ("ce+kd", ("ce_head",))):
        cfg = _cfg(world, tmp_path / method, method=method, epochs=1, freeze_backbone=True)
        distill(cfg)
        after, before = _state(tmp_path / method), _fresh(cfg).state_dict()
        backbone = [k for k in after if k.startswith("backbone.")]
        assert any("running_mean" in k for k in backbone)
        for k in backbone:
            assert torch.equal(after[k], before[k]), k
        for head in ("ce_head", "kd_head"):
            assert torch.equal(after[f"{head}.weight"], before[f"{head}.weight"]) != (head in trained), (method, head)
        ckpt = torch.load(tmp_path / method / "checkpoints" / "last.pt", weights_only=False)
        assert len(ckpt["optimizer"]["state"]) == 2 * len(trained)  # weight + bias of each trained head
        losses = [m["loss"] for m in _metrics(tmp_path / method) if "loss" in m]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.fixture(scope="module")
def vpt_run(world, tmp_path_factory, tiny_teacher_ckpt):  # noqa: F811
    run = tmp_path_factory.mktemp("vpt") / "run"
    cfg = _cfg(world, run, student=str(TINY_CLIP_CONFIG), student_pretrained=str(tiny_teacher_ckpt), epochs=1,
               freeze_backbone=True, lr=3e-2, log_grad_cosine=2, **VPT)
    distill(cfg)
    return run, cfg


def test_vpt_run_trains_prompts_and_heads_only_and_records_them(vpt_run):
    run, cfg = vpt_run
    student, meta = load_student(run / "model.pt")
    assert {k: meta["build_args"][k] for k in VPT} == VPT and isinstance(student.backbone, VptTower)
    fresh = _fresh(cfg)
    after, before = student.state_dict(), fresh.state_dict()
    tower = [k for k in after if k.startswith("backbone.tower.")]
    assert len(tower) > 20
    for k in tower:
        assert torch.equal(after[k], before[k]), k
    assert torch.equal(before["backbone.prompts"], fresh.backbone.prompts)
    for k in ("backbone.prompts", "kd_head.weight", "ce_head.bias"):
        assert not torch.equal(after[k], before[k]), k
    diag = [m for m in _metrics(run) if "grad_cosine" in m]  # over the prompts, the only parameters of g that train
    assert diag and all(math.isfinite(m["grad_cosine"]) for m in diag)


def test_vpt_resume_is_bit_identical(world, vpt_run, tmp_path):  # noqa: F811
    run, cfg = vpt_run
    split = tmp_path / "split"
    distill(DistillConfig(**{**cfg.to_dict(), "out": str(split), "max_steps": 2}))
    with pytest.raises(ConfigError, match=re.escape("vpt_depth: 2 -> 1")):
        distill(DistillConfig(**{**cfg.to_dict(), "out": str(split), "vpt_depth": 1}), resume=True)
    with pytest.raises(ConfigError, match=re.escape("freeze_backbone: True -> False")):
        distill(DistillConfig(**{**cfg.to_dict(), "out": str(split), "freeze_backbone": False}), resume=True)
    distill(DistillConfig(**{**cfg.to_dict(), "out": str(split)}), resume=True)
    a, b = _state(run), _state(split)
    assert a.keys() == b.keys() and "backbone.prompts" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vpt_model_goes_through_evaluate_and_load_run(vpt_run, world):  # noqa: F811
    import dho

    run, _ = vpt_run
    result = ev.evaluate(run, world / "val", device="cpu", workers=0)
    student, meta = load_student(run / "model.pt")
    ce, kd, labels = ev.labeled_only(*ev.collect_logits(student, dho.data.Dataset.open(world / "val"), batch_size=8,
                                                         device="cpu", workers=0))
    expected = ev.topk_accuracy(ev.combine_heads(ce, kd, result["alpha"], result["beta"]), labels)[1]
    assert result["combined"]["top1"] == pytest.approx(expected) and result["num_samples"] == 8
    loaded = dho.load_run(run, device="cpu")
    assert isinstance(loaded.student.backbone, VptTower)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "hf"])
def test_vpt_export_round_trip(fmt, vpt_run, world, tmp_path):  # noqa: F811
    import dho
    from dho import data
    from dho.export import SUFFIXES, export, weights_path

    run, _ = vpt_run
    out = tmp_path / (f"model.{SUFFIXES[fmt]}" if fmt != "hf" else "hf")
    written = export(run, out, format=fmt)
    student, meta = load_student(run / "model.pt")
    pre = student.preprocess
    ds = data.Dataset.open(world / "val")
    samples = [s for i in range(len(ds.shards)) for s in data.iter_shard(ds, i)]
    uint8 = torch.stack([data.eval_view_uint8(s.image, pre.image_size, pre.interpolation, pre.resize_mode) for s in samples])
    x = data.normalize(uint8, pre.mean, pre.std)  # (N, 3, S, S)
    with torch.no_grad():
        logits = student(x)
        rebuilt = dho.load_export(written if fmt == "hf" else weights_path(written))  # weights rebuilt from build args
        assert isinstance(rebuilt.student.backbone, VptTower)
        again = rebuilt.student.eval()(x)
    assert torch.equal(again["ce_logits"], logits["ce_logits"]) and torch.equal(again["kd_logits"], logits["kd_logits"])
    if fmt != "hf":  # the graph itself carries the prompts
        probs = dho.load_export(written).predict(uint8).probs
        torch.testing.assert_close(probs, ev.combine_heads(logits["ce_logits"], logits["kd_logits"], meta["alpha"], meta["beta"]),
                                   rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- the recipe


def _recipe():
    import yaml

    from test_pipelines import ROOT

    path = ROOT / "pipelines" / "lowshot" / "frozen-clip-l14.yaml"
    return path, yaml.safe_load(path.read_text())


def test_recipe_rows_are_distill_configs_with_table_13s_numbers(tmp_path):
    """Each row of pipelines/lowshot/frozen-clip-l14.yaml, applied as `recipe.py config R distill KEY=VALUE ...` (its
    header's command), is a frozen-backbone DistillConfig; the labeled-only rows take the pool rows' number of steps."""
    import subprocess
    import sys

    from dho.distill.config import load_options_file
    from dho.distill.schedule import schedule_steps
    from test_pipelines import ROOT

    path, data = _recipe()
    rows, table = data["recipe"]["rows"], data["expected"]["table13"]
    assert set(rows) <= set(table) and all(len(v) == 5 for v in table.values())
    assert data["expected"]["top1"] == {"1pct": table["le-dho"][0], "16shot": table["vpt3-dho"][0]}
    pool = {"1pct": 1_281_167 - 13_000, "16shot": 1_281_167 - 16_000}
    labeled = {"1pct": 13_000, "16shot": 16_000}
    for name, row in rows.items():
        out = tmp_path / f"{name}.yaml"
        subprocess.run([sys.executable, str(ROOT / "pipelines" / "lowshot" / "recipe.py"), "config", str(path), "distill",
                        *[f"{k}={v}" for k, v in row["overrides"].items()], "--out", str(out)], check=True, cwd=ROOT)
        cfg = DistillConfig(labeled="L", labeled_cache="L.zarr", out="RUN", **load_options_file(out))
        assert cfg.freeze_backbone and cfg.method == ("ce" if name in ("le", "vpt3", "coop", "promptsrc") else "dho"), name
        assert (cfg.vpt_depth, cfg.vpt_tokens) == ((int(name[3]), 50) if name.startswith("vpt") else (0, 0)), name
        assert cfg.coop_context == (16 if name.startswith("coop") else 0), name
        assert (cfg.promptsrc_tokens, cfg.promptsrc_depth) == ((4, 3) if name.startswith("promptsrc") else (0, 0)), name
        size = labeled[row["split"]] if row["unlabeled"] == "labeled" else pool[row["split"]]
        steps = schedule_steps(size, cfg.batch_size, cfg.epochs, cfg.lr_schedule)[1]
        full = schedule_steps(pool[row["split"]], cfg.batch_size, 20, cfg.lr_schedule)[1]
        assert abs(steps - full) / full < 0.002, (name, steps, full)  # the same schedule length, to within one epoch


@pytest.mark.parametrize("row", ["le", "le-dho-l", "vpt3-dho", "coop", "coop-dho", "promptsrc", "promptsrc-dho"])
def test_recipe_row_families_train_on_the_tiny_models(row, world, tmp_path, tiny_teacher_ckpt):  # noqa: F811
    """SMOKE form of each row family: the row's overrides on the tiny ViT (depth 3 -> its 2 blocks), 2 steps; the
    tower stays as built, the run's model loads (a CoOp row's with its trained class weights)."""
    _, data = _recipe()
    spec = data["recipe"]["rows"][row]
    overrides = {k: v for k, v in spec["overrides"].items() if k != "epochs"}
    if "vpt_depth" in overrides:
        overrides.update(vpt_depth=2, vpt_tokens=4)
    if "promptsrc_depth" in overrides:  # the tiny towers' 2 blocks
        overrides.update(promptsrc_depth=2)
    unlabeled = {} if spec["unlabeled"] == "pool" else {"unlabeled": str(world / "labeled"), "unlabeled_cache": str(world / "labeled.zarr")}
    cfg = _cfg(world, tmp_path / row, student=str(TINY_CLIP_CONFIG), student_pretrained=str(tiny_teacher_ckpt), epochs=2,
               max_steps=2, freeze_backbone=True, alpha=0.5, beta=1.0, **{**unlabeled, **overrides})
    distill(cfg)
    student, meta = load_student(tmp_path / row / "model.pt")
    built = _fresh(cfg)
    fresh = built.state_dict()
    frozen = [k for k in student.state_dict() if k.startswith("backbone.") and k != "backbone.prompts"]
    assert frozen and all(torch.equal(student.state_dict()[k], fresh[k]) for k in frozen)
    if cfg.coop_context or cfg.promptsrc_tokens:  # model.pt: the class weights as a fixed cosine head, moved by training
        assert isinstance(student.ce_head, CosineHead)
        assert meta["build_args"].get("coop_context", 0) == cfg.coop_context
        assert meta["build_args"].get("promptsrc_tokens", 0) == cfg.promptsrc_tokens
        with torch.no_grad():
            initial = built.ce_head.class_weights()  # (C, D)
        assert student.ce_head.weight.shape == initial.shape and not torch.equal(student.ce_head.weight, initial)
    assert (meta["alpha"], meta["beta"]) == ((1.0, 1.0) if cfg.method == "ce" else (0.5, 1.0))
    steps = [m for m in _metrics(tmp_path / row) if "loss" in m]
    assert len(steps) == 2 and all(math.isfinite(m["loss"]) for m in steps)
