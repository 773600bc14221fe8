"""`dho distill --grad-surgery pcgrad` (PCGrad, Yu et al. 2020, between the CE and KD terms, as the authors'
train_imgnet_pc_grad.py) and `dho distill --ema DECAY` (an EMA of the student's weights, timm ModelEmaV3's
update): each against a plain restatement on tiny tensors, then through the real loop on tiny caches, with
resume (and kill -9) bit-identical and the EMA weights in model.pt, evaluate, export and dho.load_run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dho import data
from dho.distill import DistillConfig, distill
from dho.distill.ema import StudentEma, ema_decay, ema_update_
from dho.distill.objective import OBJECTIVES
from dho.distill.surgery import TaskGrads, pcgrad
from dho.errors import ConfigError
from dho.names import SURGERY_METHODS
from dho.precompute import precompute
from dho.students import load_student
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder

DHO = Path(sys.executable).parent / "dho"


# ---------------------------------------------------------------------------------------------- PCGrad, restated


def _alg1(g_1: torch.Tensor, g_2: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """Yu et al. 2020, Alg. 1 for two tasks, element by element in float64, then the reference PCGrad's merge."""
    g = [g_1.double(), g_2.double()]
    pc = [g[0].clone(), g[1].clone()]
    for i, j in ((0, 1), (1, 0)):
        inner = sum(float(a) * float(b) for a, b in zip(pc[i], g[j]))
        if inner < 0:
            norm2 = sum(float(b) ** 2 for b in g[j])
            pc[i] = torch.tensor([float(a) - inner / norm2 * float(b) for a, b in zip(pc[i], g[j])], dtype=torch.float64)
    return torch.tensor([(a + b) / 2 if s else a + b for a, b, s in zip(pc[0].tolist(), pc[1].tolist(), shared.tolist())],
                        dtype=torch.float64)


def test_pcgrad_is_alg1_projection_and_keeps_gradients_that_agree():
    gen = torch.Generator().manual_seed(0)
    shared = torch.tensor([True] * 5 + [False] * 2)
    conflicts = 0
    for _ in range(20):
        g_1, g_2 = torch.randn(7, generator=gen), torch.randn(7, generator=gen)
        g_1[6], g_2[5] = 0.0, 0.0  # entry 5 only task 1 reaches, entry 6 only task 2
        merged = pcgrad(g_1, g_2, shared)
        assert torch.allclose(merged.double(), _alg1(g_1, g_2, shared), atol=1e-6)
        if float(g_1 @ g_2) < 0:
            conflicts += 1
            p_1 = g_1 - (g_1 @ g_2) / (g_2 @ g_2) * g_2
            assert abs(float(p_1 @ g_2)) < 1e-5  # projected onto the normal plane of the other gradient
        else:
            assert torch.equal(merged[:5], (g_1[:5] + g_2[:5]) / 2) and torch.equal(merged[5:], (g_1 + g_2)[5:])
    assert 3 < conflicts < 17  # both branches were exercised
    # by hand: opposite gradients cancel; g_1 = (1, 1), g_2 = (-1, 0): g_1' = (0, 1), g_2' = (-1, 0) + (1, 1) / 2
    both = torch.ones(2, dtype=torch.bool)
    assert torch.equal(pcgrad(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0]), both), torch.zeros(2))
    assert torch.equal(pcgrad(torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.0]), both), torch.tensor([-0.25, 0.75]))


def _two_terms(z, head_1, head_2):
    return head_1(z).pow(2).mean(), -0.5 * head_1(z).pow(2).mean() + 0.1 * head_2(z).sum()


def test_task_grads_sum_micro_batches_then_project_once_and_leave_unreached_parameters_alone():
    """Two micro-batches of a tiny two-task model: .grad is pcgrad of each term's gradient summed over both, flattened
    over all parameters (the trunk and head_1 shared, head_2 reached by the second term only); a parameter neither
    reaches keeps .grad None."""
    torch.manual_seed(0)
    trunk, head_1, head_2, unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(1, 1)
    params = [*trunk.parameters(), *head_1.parameters(), *head_2.parameters(), *unused.parameters()]
    x = torch.randn(2, 5, 3)
    tasks = TaskGrads(params)
    for xb in x:
        z = torch.tanh(trunk(xb))
        tasks.add(_two_terms(z, head_1, head_2))
    tasks.apply_()
    got = [p.grad for p in params]
    # restated: the summed gradient of each term, flattened, zero where a term does not reach
    flat = []
    for which in (0, 1):
        for p in params:
            p.grad = None
        for xb in x:
            z = torch.tanh(trunk(xb))
            _two_terms(z, head_1, head_2)[which].backward()
        flat.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]))
    n_shared = sum(p.numel() for p in (*trunk.parameters(), *head_1.parameters()))
    shared = torch.tensor([True] * n_shared + [False] * (sum(p.numel() for p in head_2.parameters()) + 2))
    expected = _alg1(flat[0], flat[1], shared).float()
    assert float(flat[0] @ flat[1]) < 0  # the terms conflict: a projection happened
    assert torch.allclose(torch.cat([g.reshape(-1) for g in got[:-2]]), expected[:-2], atol=1e-6)
    assert got[-2:] == [None, None]
    assert tasks.sums == [[None] * len(params)] * 2  # the next step starts from zero


def test_each_two_term_method_splits_its_loss_exactly_and_the_others_have_no_split():
    assert tuple(name for name, o in OBJECTIVES.items() if o.tasks is not None) == SURGERY_METHODS
    terms = {"ce": torch.tensor(1.3), "kd": torch.tensor(0.7), "feature_kd": torch.tensor(2.1)}
    for name in SURGERY_METHODS:
        a, b = OBJECTIVES[name].tasks(terms, 0.3)
        other = terms["feature_kd"] if OBJECTIVES[name].feature_kd else terms["kd"]
        assert float(a) == pytest.approx(0.3 * 1.3) and float(b) == pytest.approx(0.7 * float(other))


def test_options_refuse_what_makes_no_sense():
    base = dict(labeled="l", labeled_cache="c", student="resnet-tiny", out="o")
    for method in ("ce", "kd"):
        with pytest.raises(ConfigError, match=rf"--grad-surgery pcgrad projects two loss terms apart; --method {method} has one"):
            DistillConfig(**base, method=method, grad_surgery="pcgrad")
    with pytest.raises(ConfigError, match="--grad-surgery must be one of|--grad-surgery"):
        DistillConfig(**base, grad_surgery="mgda")
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match="--ema"):
            DistillConfig(**base, ema=bad)
    with pytest.raises(ConfigError, match="--ema-warmup warms up the EMA of --ema DECAY"):
        DistillConfig(**base, ema_warmup=True)
    assert DistillConfig(**base, method="ce+kd", grad_surgery="pcgrad", ema="0.999").ema == 0.999  # YAML's strings too


# ---------------------------------------------------------------------------------------------- EMA, restated


def test_ema_update_is_timm_model_ema_v3_on_parameters_and_batchnorm_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = StudentEma(model, decay=0.9, warmup=False)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {k: v.clone().double() for k, v in start.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model.train()
        model(torch.randn(8, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
        for k, w in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * w.double() if w.is_floating_point() else w.clone().double()
    got = ema.module.state_dict()
    for k in expected:
        assert torch.allclose(got[k].double(), expected[k], atol=1e-6), k
    assert int(got["1.num_batches_tracked"]) == 3 and ema.updates == 3  # the integer buffer is copied, not averaged
    assert not torch.allclose(got["1.running_mean"], model.state_dict()["1.running_mean"])  # the running stats averaged
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    # timm's warm-up: 1 - (1 + t)^(-2/3), capped at the decay
    assert [round(ema_decay(0.999, t, True), 6) for t in (1, 10, 10**6)] == [round(1 - 2 ** (-2 / 3), 6),
                                                                             round(1 - 11 ** (-2 / 3), 6), 0.999]
    assert ema_decay(0.999, 1, False) == 0.999
    state = {"w": torch.tensor([1.0, 2.0])}
    ema_update_(state, {"w": torch.tensor([3.0, 6.0])}, 0.75)
    assert torch.equal(state["w"], torch.tensor([1.5, 3.0]))


# ---------------------------------------------------------------------------------------------- the real loop


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher_ckpt):  # noqa: F811
    """A 4-class dataset (24 images), its 2-shot labeled split, a validation split and their caches."""
    root = tmp_path_factory.mktemp("surgery-ema")
    full = data.prepare(make_image_folder(root / "images", num_classes=4, per_class=6), root / "full", shard_size=6)
    labeled, _ = data.split(full, root / "labeled", shots=2, seed=0, val_per_class=1, val_out=root / "val", shard_size=4)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0,
                   batch_size=16, store_embeddings=True)  # embeddings: for ce+kd-feature
    precompute(full.root, root / "full.zarr", **teacher)
    precompute(labeled.root, root / "labeled.zarr", **teacher)
    return root


def _cfg(world: Path, out: Path, **kw) -> DistillConfig:
    base = dict(labeled=str(world / "labeled"), labeled_cache=str(world / "labeled.zarr"), unlabeled=str(world / "full"),
                unlabeled_cache=str(world / "full.zarr"), student="resnet-tiny", out=str(out), method="ce+kd", epochs=2,
                batch_size=8, lr=3e-3, workers=0, device="cpu", log_every=1, seed=0)
    return DistillConfig(**{**base, **kw})


def _losses(run: Path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _payload(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pcgrad_trains_ce_kd_apart_from_plain_sho_and_resumes_bit_identical(world, tmp_path):
    plain, surgery, split = tmp_path / "plain", tmp_path / "pcgrad", tmp_path / "split"
    distill(_cfg(world, plain))
    distill(_cfg(world, surgery, grad_surgery="pcgrad"))
    a, b = _losses(plain), _losses(surgery)
    assert len(a) == len(b) == 2 * (24 // 8) and a[0] == b[0]  # the same first step (same weights and batch) ...
    assert a[1:] != b[1:] and all(x == x and x < 1e3 for x in b)  # ... then another update, finite
    assert b[-1] < b[0]
    assert not _same(_payload(plain)["state_dict"], _payload(surgery)["state_dict"])
    distill(_cfg(world, split, grad_surgery="pcgrad", max_steps=4))
    distill(_cfg(world, split, grad_surgery="pcgrad"), resume=True)
    assert _same(_payload(split)["state_dict"], _payload(surgery)["state_dict"]) and _losses(split) == b
    with pytest.raises(ConfigError, match="grad_surgery"):  # the option cannot change on resume
        distill(_cfg(world, split, max_steps=6), resume=True)


@pytest.mark.parametrize("method", ["dho", "ce+kd-feature"])
def test_pcgrad_runs_with_the_other_two_term_methods(world, tmp_path, method):
    distill(_cfg(world, tmp_path / "plain", method=method, max_steps=2))
    distill(_cfg(world, tmp_path / "pcgrad", method=method, max_steps=2, grad_surgery="pcgrad"))
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "pcgrad")
    assert len(b) == 2 and a[0] == b[0] and a[1] != b[1] and b[1] == b[1]


def test_ema_run_keeps_the_trained_weights_as_without_it_and_reports_and_saves_the_ema(world, tmp_path):
    """--ema never feeds back: model.pt's raw_state_dict is the run without --ema bit for bit, and its validation
    of the raw weights is that run's; the EMA moves as ema_t = d ema_(t-1) + (1 - d) w_t between two checkpoints."""
    import json

    plain, ema = tmp_path / "plain", tmp_path / "ema"
    distill(_cfg(world, plain, val=str(world / "val")))
    distill(_cfg(world, ema, val=str(world / "val"), ema=0.8, checkpoint_every=1, keep_checkpoints=10))
    p, e = _payload(plain), _payload(ema)
    assert _same(e["raw_state_dict"], p["state_dict"]) and "raw_state_dict" not in p
    assert not _same(e["state_dict"], p["state_dict"])
    assert e["extra"]["ema"] == {"decay": 0.8, "warmup": False, "updates": 6}
    final = lambda run: next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in x)
    fp, fe = final(plain), final(ema)
    assert {k.replace("_raw", ""): v for k, v in fe.items() if "_raw_" in k} == {k: v for k, v in fp.items() if k.startswith("val_")}
    assert {"val_ce_head_top1", "val_kd_head_top1", "val_combined_top1"} <= set(fe)
    c4, c5 = (torch.load(ema / "checkpoints" / f"step-{s:09d}.pt", weights_only=True) for s in (4, 5))
    assert c4["ema"]["updates"] == 4 and c5["ema"]["updates"] == 5
    for k, v in c5["ema"]["state_dict"].items():
        w = c5["model"][f"student.{k}"]
        want = 0.8 * c4["ema"]["state_dict"][k].double() + 0.2 * w.double() if v.is_floating_point() else w
        assert torch.allclose(v.double(), want.double(), atol=1e-6), k
    student, meta = load_student(ema / "model.pt")
    assert meta["weights"] == "ema" and _same(student.state_dict(), e["state_dict"])
    raw, meta = load_student(ema / "model.pt", weights="raw")
    assert meta["weights"] == "raw" and _same(raw.state_dict(), p["state_dict"])
    with pytest.raises(ConfigError, match=r"holds no EMA weights \(its run trained without --ema\)"):
        load_student(plain / "model.pt", weights="ema")


def test_ema_resumes_bit_identical_and_export_evaluate_load_run_take_the_ema_unless_raw(world, tmp_path):
    import dho
    from dho.evaluate import evaluate
    from dho.export import export, weights_path
    from safetensors.torch import load_file

    full, split = tmp_path / "full", tmp_path / "split"
    distill(_cfg(world, full, ema=0.9, ema_warmup=True, method="dho"))
    distill(_cfg(world, split, ema=0.9, ema_warmup=True, method="dho", max_steps=4))
    assert torch.load(split / "checkpoints" / "last.pt", weights_only=False)["ema"]["updates"] == 4
    distill(_cfg(world, split, ema=0.9, ema_warmup=True, method="dho"), resume=True)
    a, b = _payload(full), _payload(split)
    assert _same(a["state_dict"], b["state_dict"]) and _same(a["raw_state_dict"], b["raw_state_dict"])

    for weights, key in ((None, "state_dict"), ("ema", "state_dict"), ("raw", "raw_state_dict")):
        out = export(full, tmp_path / f"m-{weights}.ts", weights=weights)
        assert _same(load_file(str(weights_path(out))), a[key]), weights
        assert _same(dho.load_run(full, "cpu", weights=weights).student.state_dict(), a[key])
    scores = {w: evaluate(full, world / "val", device="cpu", workers=0, weights=w)["combined"]["top1"] for w in ("ema", "raw")}
    assert scores["ema"] == evaluate(full, world / "val", device="cpu", workers=0)["combined"]["top1"]
    assert all(0 <= v <= 100 for v in scores.values())


def test_sigkill_then_resume_with_pcgrad_and_ema_gives_the_same_weights(world, tmp_path):
    args = ["--student", "resnet-tiny", "--method", "ce+kd", "--grad-surgery", "pcgrad", "--ema", "0.9", "--epochs", "3",
            "--checkpoint-every", "2", "--workers", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cli = lambda run: [str(DHO), "distill", "--labeled", str(world / "labeled"), "--labeled-cache", str(world / "labeled.zarr"),
                       "--unlabeled", str(world / "full"), "--unlabeled-cache", str(world / "full.zarr"), "--out", str(run),
                       "--batch-size", "8", "--lr", "3e-3", "--device", "cpu", "--seed", "0", *args]
    full, run = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli(full), check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.Popen(cli(run), env={**env, "DHO_TEST_STEP_SLEEP": "0.4"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.pt").exists(), "the run finished before it could be killed"
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step < 9
    resumed = subprocess.run([*cli(run), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stdout
    a, b = _payload(full), _payload(run)
    assert _same(a["state_dict"], b["state_dict"]) and _same(a["raw_state_dict"], b["raw_state_dict"])
