"""`dho distill` end to end on CPU: tiny students, caches made by the real precompute-teacher."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dho import data
from dho.distill import DistillConfig, distill, draws_per_sample, lr_lambda, reference_lr_lambda, schedule_steps, views_needed
from dho.errors import CacheError, ConfigError, DhoError
from dho.precompute import precompute
from dho.students import load_student
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder

DHO = Path(sys.executable).parent / "dho"
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_teacher_ckpt):
    """A 4-class dataset (40 images), its 2-shot labeled split and a validation split, with caches."""
    root = tmp_path_factory.mktemp("distill")
    src = make_image_folder(root / "images", num_classes=4, per_class=10)
    full = data.prepare(src, root / "full", shard_size=8)
    labeled, val = data.split(full, root / "labeled", shots=2, seed=0, val_per_class=2, val_out=root / "val", shard_size=4)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0, batch_size=16)
    precompute(full.root, root / "full.zarr", store_embeddings=True, **teacher)
    precompute(labeled.root, root / "labeled.zarr", store_embeddings=True, **teacher)
    precompute(labeled.root, root / "labeled-noemb.zarr", **teacher)
    return root


def _cfg(world: Path, out: Path, **kw) -> DistillConfig:
    base = dict(
        labeled=str(world / "labeled"), labeled_cache=str(world / "labeled.zarr"),
        unlabeled=str(world / "full"), unlabeled_cache=str(world / "full.zarr"),
        student="resnet-tiny", out=str(out), method="dho", epochs=4, batch_size=8, lr=3e-3,
        workers=0, device="cpu", log_every=1, seed=0,
    )
    base.update(kw)
    return DistillConfig(**base)


def _state(run: Path) -> dict:
    student, meta = load_student(run / "model.pt")
    return {k: v.clone() for k, v in student.state_dict().items()}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_schedule_warmup_then_cosine():
    assert lr_lambda(0, 4, 20) == pytest.approx(0.25) and lr_lambda(3, 4, 20) == pytest.approx(1.0)
    assert lr_lambda(4, 4, 20) == pytest.approx(1.0) and lr_lambda(12, 4, 20) == pytest.approx(0.5)
    assert lr_lambda(20, 4, 20) == pytest.approx(0.0) and lr_lambda(0, 0, 10) == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("warmup,total", [(20, 200), (50, 60), (0, 30), (5000, 158_560)])
def test_reference_schedule_is_torchs_chained_linear_and_cosine_at_every_step(warmup, total):
    """The authors' low-shot schedule: ChainedScheduler(LinearLR(0.01 -> 1 over W), CosineAnnealingLR(T_max =
    total - W)), stepped per iteration; the cosine starts at step 0 and, periodic, rises again after total - W."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=5e-5)
    chained = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup)]
    if warmup:
        chained.insert(0, torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warmup))
    scheduler = torch.optim.lr_scheduler.ChainedScheduler(chained)
    steps = range(total) if total < 1000 else [*range(0, 6000), *range(total - 6000, total)]
    done = 0
    for step in steps:
        while done < step:
            scheduler.step()
            done += 1
        torch_lr = opt.param_groups[0]["lr"]
        assert 5e-5 * reference_lr_lambda(step, warmup, total) == pytest.approx(torch_lr, rel=1e-6, abs=1e-13), step


def test_schedule_steps_and_view_reuse_arithmetic():
    # ImageNet 1% (the reference's 13,000 labeled): 1,281,167 - 13,000 unlabeled at 256: its 4,954 steps per epoch (ceil)
    assert schedule_steps(1_281_167 - 13_000, 256, 32, "reference") == (4954, 32 * 4954)
    assert schedule_steps(1_281_167 - 128_286, 256, 32, "reference") == (4504, 32 * 4504)  # 10%: 128,286 labeled
    assert schedule_steps(1_281_167, 256, 32, "warmup-cosine") == (5004, 32 * 5004)
    assert schedule_steps(5, 8, 3, "warmup-cosine") == (1, 3)  # at least one step per epoch
    # a labeled image of the 1% split is drawn ~3,200 times over the 32-epoch schedule
    assert draws_per_sample(32 * 5004, 256, 12_811) == pytest.approx(3199.8, abs=0.1)
    assert views_needed(32 * 5004, 256, 12_811, max_reuse=10) == 320
    assert views_needed(100, 10, 1000, max_reuse=4) == 1


def test_short_run_lowers_loss_and_writes_run_dir(world, tmp_path):
    run = tmp_path / "run"
    distill(_cfg(world, run, epochs=4, val=str(world / "val"), log_grad_cosine=4))
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert len(losses) == 4 * (40 // 8)  # an epoch is one pass over the unlabeled pool (labeled ⊂ full)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert {"ce", "kd", "kd_labeled", "kd_unlabeled", "lr", "samples_per_s"} <= set(_metrics(run)[0])
    cfg = DistillConfig.load(run / "config.json")
    assert cfg.method == "dho" and cfg.epochs == 4 and cfg.lambda_ == 0.5 and cfg.eta == 2.0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 20 and {"model", "optimizer", "scheduler", "rng", "consumers"} <= set(ckpt)
    student, meta = load_student(run / "model.pt")
    assert (meta["alpha"], meta["beta"]) == (0.5, 0.5) and meta["classnames"] == data.Dataset.open(world / "full").classnames
    final = [m for m in _metrics(run) if m.get("final")]
    assert final and 0.0 <= final[0]["val_combined_top1"] <= 100.0
    diag = [m for m in _metrics(run) if "grad_cosine" in m]
    assert len(diag) == 5 and all(-1.0 <= m["grad_cosine"] <= 1.0 and -1.0 <= m["grad_cosine_z"] <= 1.0 for m in diag)
    assert all({"pred_inner", "pred_inner_negative", "eig_ce", "eig_kd", "eig_ce_kd"} <= set(m) for m in diag)
    assert all(m["eig_ce"] > 0 and m["eig_kd"] > 0 and 0 <= m["pred_inner_negative"] <= 1 for m in diag)
    assert ckpt["grad_diagnostics"] == diag  # kept across a resume
    png = (run / "grad_cosine.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_step_lines_show_the_terms_and_the_data_wait_and_summary_csv_has_each_epoch(world, tmp_path, capsys):
    """A DHO step line names ce, kd and KD's labeled / unlabeled halves and the data wait; metrics.jsonl has the
    wait of each interval (no peak memory on CPU: the key is absent); RUN/summary.csv has one row per epoch with
    the lr of its last step, the mean of each term over its steps and the epoch's validation per head."""
    import csv

    run = tmp_path / "run"
    distill(_cfg(world, run, epochs=3, val=str(world / "val"), eval_every_epoch=True))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 15
    assert re.match(r"step 1/15 epoch 0\.20 loss \d+\.\d{4} ce \d+\.\d{4} kd \d+\.\d{4} \(labeled \d+\.\d{4} \+ unlabeled "
                    r"\d+\.\d{4}\) lr \S+ \| data wait \d+\.\d\d s \(\d+%\) \| \S+ samples/s \| ETA \d:\d\d:\d\d$", lines[0]), lines[0]
    steps = [m for m in _metrics(run) if "loss" in m]
    assert all(m["data_wait_s"] >= 0 and "peak_memory_gib" not in m for m in steps)
    assert all(f"loss {m['loss']:.4f} ce {m['ce']:.4f} kd {m['kd']:.4f} (labeled {m['kd_labeled']:.4f}" in line
               for m, line in zip(steps, lines))
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "step", "lr", "loss", "ce", "kd", "kd_labeled", "kd_unlabeled",
                             "val_ce_head_top1", "val_kd_head_top1", "val_combined_top1"]
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "5"), ("2", "10"), ("3", "15")]
    vals = [m for m in _metrics(run) if "val_combined_top1" in m and not m.get("final")]
    for epoch, row in enumerate(rows, 1):
        mine = [m for m in steps if 5 * (epoch - 1) < m["step"] <= 5 * epoch]
        assert float(row["lr"]) == mine[-1]["lr"]
        for term in ("loss", "ce", "kd", "kd_labeled", "kd_unlabeled"):
            assert float(row[term]) == pytest.approx(np.mean([m[term] for m in mine]), abs=2e-6), (epoch, term)
        assert {k: float(row[k]) for k in vals[0] if k.startswith("val_")} == {k: v for k, v in vals[epoch - 1].items()
                                                                               if k.startswith("val_")}


def test_summary_csv_of_a_run_stopped_and_resumed_mid_epoch_equals_an_uninterrupted_one(world, tmp_path):
    """--max-steps inside an epoch: a row for the part of the epoch run so far; the resume continues that epoch's
    sums from the checkpoint, so every row (the final validation in the last one) is the uninterrupted run's."""
    from dho.distill.metrics import read_summary

    full, split = tmp_path / "full", tmp_path / "split"
    distill(_cfg(world, full, epochs=3, val=str(world / "val")))
    distill(_cfg(world, split, epochs=3, val=str(world / "val"), max_steps=7))
    assert [(r["epoch"], r["step"]) for r in read_summary(split / "summary.csv")] == [(1, 5), (2, 7)]
    assert "val_combined_top1" in read_summary(split / "summary.csv")[-1]  # the final validation of that run
    distill(_cfg(world, split, epochs=3, val=str(world / "val")), resume=True)
    assert (split / "summary.csv").read_text() == (full / "summary.csv").read_text()
    rows = read_summary(full / "summary.csv")
    final = [m for m in _metrics(full) if m.get("final")][0]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "val_combined_top1" not in rows[0]  # --val alone: the end only
    assert rows[-1]["val_combined_top1"] == final["val_combined_top1"]


def test_resume_summary_keeps_rows_up_to_the_checkpoint_and_restores_what_the_file_lost(tmp_path):
    from dho.distill.metrics import read_summary, resume_summary, write_summary

    path = tmp_path / "summary.csv"
    write_summary(path, [{"epoch": 1, "step": 5, "lr": 0.1, "loss": 2.0, "val_combined_top1": 50.0},
                         {"epoch": 2, "step": 10, "lr": 0.05, "loss": 1.5}])
    assert path.read_text() == "epoch,step,lr,loss,val_combined_top1\n1,5,0.1,2.0,50.0\n2,10,0.05,1.5,\n"
    in_checkpoint = [{"epoch": 1, "step": 5, "lr": 0.1, "loss": 2.0}]
    # resumed at step 7: epoch 2's row (written after the checkpoint) comes again; epoch 1's keeps its validation
    assert resume_summary(path, in_checkpoint, 7) == [{"epoch": 1, "step": 5, "lr": 0.1, "loss": 2.0, "val_combined_top1": 50.0}]
    # killed between the epoch-end checkpoint and the file: the checkpoint's row is not lost
    path.unlink()
    assert resume_summary(path, in_checkpoint, 5) == in_checkpoint and read_summary(path) == []


def test_step_line_of_each_method_names_its_own_terms():
    from dho.distill.metrics import step_line

    line = step_line(4, 10, 5, {"loss": 1.0, "ce": 1.0}, 1e-3, 20.0, 3.0)
    assert line == "step 4/10 epoch 0.80 loss 1.0000 ce 1.0000 lr 0.001 | 20.0 samples/s | ETA 0:00:03"
    line = step_line(4, 10, 5, {"loss": 0.5, "ce": 0.6, "feature_kd": 0.4}, 1e-3, 20.0, 3.0, data_wait_s=0.5,
                     interval_s=2.0, peak_memory_gib=1.5)
    assert line == ("step 4/10 epoch 0.80 loss 0.5000 ce 0.6000 feature_kd 0.4000 lr 0.001 | data wait 0.50 s (25%) | "
                    "peak memory 1.50 GiB | 20.0 samples/s | ETA 0:00:03")


def test_grad_plot_draws_negative_eigenvalues_and_integer_steps():
    """W_CE W_KDᵀ is not symmetric: its dominant eigenvalue can be negative, so the panel is symmetric-log (a log
    axis would draw nothing of it); three logged steps give ticks 1, 2, 3, not 1.25 ... 2.75."""
    import matplotlib.pyplot as plt

    from dho.distill.diagnostics import grad_diagnostics_figure

    records = [{"step": s, "grad_cosine": 0.1 * s, "pred_inner": -0.01 * s, "grad_cosine_z": 0.2, "eig_ce": 1.5 * s,
                "eig_kd": 0.9 * s, "eig_ce_kd": -0.03 * s} for s in (1, 2, 3)]
    fig = grad_diagnostics_figure({"dho": records})
    fig.canvas.draw()
    eig = fig.axes[3]
    assert eig.get_yscale() == "symlog"
    cross = [line for line in eig.get_lines() if line.get_label() == "dho: W_CE W_KDᵀ"][0]
    assert cross.get_ydata().tolist() == pytest.approx([-0.03, -0.06, -0.09])
    low, high = eig.get_ylim()
    assert low < -0.09 and high > 4.5  # every point inside the axis
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1.0, 2.0, 3.0], ticks
    plt.close(fig)


@pytest.mark.parametrize("method", ["dho", "ce+kd"])
def test_grad_diagnostics_against_direct_computation(method):
    """Each logged quantity of Figs. 4/13 against a computation that does not share its code: per-sample
    feature gradients one sample at a time, eigenvalues of the C x C products."""
    import contextlib

    import torch.nn.functional as F

    from dho import losses
    from dho.distill import OBJECTIVES, Trainee, grad_diagnostics
    from dho.stream import Batch, Half
    from dho.students import build_student, head_weight

    torch.manual_seed(0)
    student = build_student("resnet-tiny", 5)
    b, c, eta = 4, 5, 2.0
    labels = torch.tensor([0, 1, 2, 3])
    batch = Batch(Half(labels, labels, image=torch.randn(b, 3, 32, 32), probs=torch.softmax(torch.randn(b, c), -1)),
                  Half(labels, labels, image=torch.randn(b, 3, 32, 32), probs=torch.softmax(torch.randn(b, c), -1)))
    student.eval()  # BatchNorm with running statistics: z does not depend on the rest of the batch
    got = grad_diagnostics(Trainee(student, None), batch, OBJECTIVES[method], eta, contextlib.nullcontext)

    kd_head = student.kd_head if method == "dho" else student.ce_head
    z = student.features(batch.l.image).detach()  # (B, D)
    cos, inner = [], []
    for n in range(b):
        zn = z[n:n + 1].clone().requires_grad_()
        ce_logits, kd_logits = student.ce_head(zn), kd_head(zn)
        g_ce, = torch.autograd.grad(F.cross_entropy(ce_logits, batch.l.label[n:n + 1]), zn)
        g_kd, = torch.autograd.grad(losses.kd_loss(kd_logits, batch.l.probs[n:n + 1], eta), zn)
        cos.append(float(F.cosine_similarity(g_ce, g_kd)))
        p_ce = torch.softmax(ce_logits.detach(), -1)[0]
        p_kd = torch.softmax(kd_logits.detach() / eta, -1)[0]
        inner.append(float((p_ce - F.one_hot(batch.l.label[n], c)) @ (p_kd - batch.l.probs[n])))
    assert got["grad_cosine_z"] == pytest.approx(np.mean(cos), abs=1e-5)
    assert got["pred_inner"] == pytest.approx(np.mean(inner), abs=1e-6)
    assert got["pred_inner_negative"] == pytest.approx(np.mean(np.array(inner) < 0))
    w_ce = head_weight(student.ce_head).double()
    assert got["eig_ce"] == pytest.approx(float(torch.linalg.eigvalsh(w_ce @ w_ce.T).max()), rel=1e-6)
    if method == "dho":
        w_kd = head_weight(student.kd_head).double()
        ev = torch.linalg.eigvals(w_ce @ w_kd.T)
        assert got["eig_ce_kd"] == pytest.approx(float(ev[ev.abs().argmax()].real), rel=1e-6)
        assert got["eig_kd"] == pytest.approx(float(torch.linalg.eigvalsh(w_kd @ w_kd.T).max()), rel=1e-6)
    else:
        assert "eig_kd" not in got
    assert -1.0 <= got["grad_cosine"] <= 1.0


def _fresh_student(name: str, run: Path):
    """The student exactly as `distill` builds it before step 0 (seed 0), to compare trained weights with."""
    from dho.cache import TeacherCache
    from dho.students import build_student

    cfg = DistillConfig.load(run / "config.json")
    torch.manual_seed(cfg.seed)
    classnames = data.Dataset.open(cfg.labeled).classnames
    return build_student(name, len(classnames), classnames=classnames, templates=TeacherCache.open(cfg.labeled_cache).attrs["templates"])


@pytest.mark.parametrize("method", ["ce", "kd", "ce+kd", "ce+kd-feature"])
def test_baselines_train_their_head_only(world, tmp_path, method):
    run = tmp_path / "run"
    distill(_cfg(world, run, method=method, epochs=1))
    student, meta = load_student(run / "model.pt")
    init = _fresh_student("resnet-tiny", run)
    trained, frozen = ("kd_head", "ce_head") if method == "kd" else ("ce_head", "kd_head")
    assert not torch.equal(getattr(student, trained).weight, getattr(init, trained).weight)
    assert torch.equal(getattr(student, frozen).weight, getattr(init, frozen).weight)
    assert meta["alpha"] == (0.0 if method == "kd" else 1.0)
    expected = {"ce": {"ce"}, "kd": {"kd"}, "ce+kd": {"ce", "kd"}, "ce+kd-feature": {"ce", "feature_kd"}}[method]
    assert expected <= set(_metrics(run)[0])
    # every method trains the same steps: an epoch is one pass over the unlabeled pool, even for ce
    assert len([m for m in _metrics(run) if "loss" in m]) == 40 // 8


def test_refusals_name_the_problem(world, tmp_path):
    with pytest.raises(CacheError, match="does not belong to dataset"):
        distill(_cfg(world, tmp_path / "a", labeled_cache=str(world / "full.zarr")))
    with pytest.raises(CacheError, match="store-embeddings"):
        distill(_cfg(world, tmp_path / "b", method="ce+kd-feature", labeled_cache=str(world / "labeled-noemb.zarr")))
    with pytest.raises(ConfigError, match="divisible"):
        distill(_cfg(world, tmp_path / "c", batch_size=6, workers=4))
    with pytest.raises(ConfigError, match="--unlabeled"):
        distill(_cfg(world, tmp_path / "d", unlabeled=None, unlabeled_cache=None))
    other = make_image_folder(tmp_path / "other", num_classes=3, per_class=4)
    other_ds = data.prepare(other, tmp_path / "other_ds", shard_size=4)
    with pytest.raises(CacheError, match="4 classes in the cache, 3 in the dataset"):
        distill(_cfg(world, tmp_path / "e", unlabeled=str(other_ds.root)))
    distill(_cfg(world, tmp_path / "f", epochs=1))
    with pytest.raises(ConfigError, match="--resume"):
        distill(_cfg(world, tmp_path / "f", epochs=1))


def test_a_v4_cache_of_class_names_with_underscores_never_mixes_with_a_v5_one(world, tmp_path):
    """class_0 ... were prompted as given before schema v5 and with spaces since: one run never trains on both."""
    import zarr

    old = tmp_path / "labeled-v4.zarr"
    shutil.copytree(world / "labeled.zarr", old)
    g = zarr.open_group(str(old), mode="r+")
    g.attrs.update({"schema_version": 4, "teacher": {k: v for k, v in g.attrs["teacher"].items() if k != "prompt_names"}})
    with pytest.raises(CacheError, match="labeled-v4.zarr was made by an older dho that put the class names with '_' into the prompts"):
        distill(_cfg(world, tmp_path / "run", labeled_cache=str(old)))
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_the_step(world, tmp_path):
    """Finiteness is checked a few steps late (no host sync per step) but before anything is saved:
    the error names the first bad step, and no checkpoint or model holds the broken weights."""
    run = tmp_path / "run"
    with pytest.raises(DhoError, match=r"at step \d+") as info:
        distill(_cfg(world, run, lr=1e12, epochs=3, checkpoint_every=1))
    bad_step = int(str(info.value).split("at step ")[1].split()[0])
    assert not (run / "model.pt").exists()
    ckpt_file = run / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_file, weights_only=False)  # saved every step until the bad one
    assert ckpt["step"] == bad_step - 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert all(np.isfinite(losses))


def _cli_args(world: Path, run: Path, *extra) -> list[str]:
    return [
        "--labeled", str(world / "labeled"), "--labeled-cache", str(world / "labeled.zarr"),
        "--unlabeled", str(world / "full"), "--unlabeled-cache", str(world / "full.zarr"),
        "--out", str(run), "--batch-size", "8", "--lr", "3e-3", "--device", "cpu", "--seed", "0", *extra,
    ]


def _env(**kw) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)


def test_sigkill_then_resume_gives_the_same_weights(world, tmp_path):
    args = ["--student", "resnet-tiny", "--epochs", "3", "--checkpoint-every", "4", "--workers", "2"]
    full = tmp_path / "full"
    subprocess.run([str(DHO), "distill", *_cli_args(world, full, *args)], check=True, env=_env(), capture_output=True, timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen([str(DHO), "distill", *_cli_args(world, run, *args)], env=_env(DHO_TEST_STEP_SLEEP="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.pt").exists(), "the run finished before it could be killed"
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step_at_kill < 15

    resumed = subprocess.run([str(DHO), "distill", *_cli_args(world, run, *args), "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step_at_kill}" in resumed.stdout
    a, b = _state(full), _state(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # summary.csv: every epoch once, each row the uninterrupted run's (its sums of an epoch went through the checkpoint)
    assert (run / "summary.csv").read_text() == (full / "summary.csv").read_text()
    assert [line.split(",")[0] for line in (run / "summary.csv").read_text().splitlines()] == ["epoch", "1", "2", "3"]


def test_a_second_distill_on_the_same_out_is_refused_until_the_first_is_gone(world, tmp_path):
    """RUN/.lock: a second `dho distill` on a running run's folder exits 2 naming the holder; after the first is
    killed -9 (its DataLoader workers may outlive it a moment: they never held the lock) a resume proceeds."""
    args = ["--student", "resnet-tiny", "--epochs", "3", "--checkpoint-every", "2", "--workers", "2"]
    run = tmp_path / "run"
    first = subprocess.Popen([str(DHO), "distill", *_cli_args(world, run, *args)], env=_env(DHO_TEST_STEP_SLEEP="3"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert (run / ".lock").read_text() == f"pid {first.pid} host {os.uname().nodename}\n"
    t0 = time.time()
    second = subprocess.run([str(DHO), "distill", *_cli_args(world, run, *args, "--resume")], env=_env(), capture_output=True,
                            text=True, timeout=120)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (run / "model.pt").exists(), f"the first run ended while the second started ({time.time() - t0:.0f} s)"
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (f"error: --out {run} is in use by another dho distill (pid {first.pid} on host "
                                     f"{os.uname().nodename}, see {run / '.lock'}); wait for it to end or choose another --out")
    resumed = subprocess.run([str(DHO), "distill", *_cli_args(world, run, *args, "--resume")], env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout and (run / "model.pt").is_file()


def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_resume_is_bit_identical(world, tmp_path, small_disk):
    """A disk with room for one checkpoint: the next one (written beside the old, then renamed) is refused before
    it starts, one line; last.pt stays the previous one, and once there is room the resume ends as an uninterrupted run."""
    args = ["--student", "resnet-tiny", "--epochs", "1", "--checkpoint-every", "2", "--workers", "0"]
    full = tmp_path / "full"
    subprocess.run([str(DHO), "distill", *_cli_args(world, full, *args)], check=True, env=_env(), capture_output=True, timeout=300)
    size = (full / "checkpoints" / "last.pt").stat().st_size
    run = small_disk(f"{int(1.5 * size) + (64 << 10)}") / "run"
    done = subprocess.run([str(DHO), "distill", *_cli_args(world, run, *args)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot write {run / 'checkpoints' / 'last.pt'}: no space left on the device"), done.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"] and not (run / "model.pt").exists()
    subprocess.run(["mount", "-o", "remount,size=16m", str(run.parent)], check=True)  # the user frees some space
    resumed = subprocess.run([str(DHO), "distill", "--resume", str(run)], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming at step 2" in resumed.stdout, resumed.stderr
    a, b = _state(full), _state(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_two_ranks_match_one_process(world, tmp_path):
    args = ["--student", str(TINY_CLIP_CONFIG), "--epochs", "1", "--lr", "1e-3"]
    single = tmp_path / "single"
    one = subprocess.run([str(DHO), "distill", *_cli_args(world, single, *args, "--workers", "2")], env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    ddp = tmp_path / "ddp"
    two = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29533", "-m", "dho.cli", "distill", *_cli_args(world, ddp, *args, "--workers", "1")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 rank(s)" in two.stdout
    a, b = _state(single), _state(ddp)
    for k in [k for k in a if k.endswith("attn.in_proj_bias")]:
        # The key bias gets no gradient in exact arithmetic (softmax is shift-invariant), so Adam
        # turns pure float noise into updates there; it cannot affect any output. Compare q and v.
        d = a[k].shape[0] // 3
        a[k], b[k] = torch.cat([a[k][:d], a[k][2 * d:]]), torch.cat([b[k][:d], b[k][2 * d:]])
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert worst[0][1] < 1e-4, worst
    assert not torch.equal(a["ce_head.weight"], _fresh_student(str(TINY_CLIP_CONFIG), single).ce_head.weight)
    # the logged loss is the mean over ranks: the loss of the whole global batch, as the one process logs it
    one_loss = [m["loss"] for m in _metrics(single) if "loss" in m]
    two_loss = [m["loss"] for m in _metrics(ddp) if "loss" in m]
    assert len(one_loss) == len(two_loss) and np.allclose(one_loss, two_loss, atol=1e-4), (one_loss, two_loss)


def _run_until_checkpoint(cmd: list[str], ckpt: Path, env: dict, start_new_session: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=start_new_session)
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.7)
    return proc


@pytest.mark.parametrize("target", ["process", "process group"])
def test_sigterm_checkpoints_exits_3_and_resume_alone_finishes_bit_identical(world, tmp_path, target):
    """Preemption: SIGTERM to the run (or to its whole process group, DataLoader workers included) saves a
    checkpoint at the current step and exits with status 3; `dho distill --resume RUN` alone finishes it."""
    args = ["--student", "resnet-tiny", "--epochs", "3", "--checkpoint-every", "4", "--workers", "2", "--log-every", "1"]
    full = tmp_path / "full"
    subprocess.run([str(DHO), "distill", *_cli_args(world, full, *args)], check=True, env=_env(), capture_output=True, timeout=300)

    run = tmp_path / "stopped"
    proc = _run_until_checkpoint([str(DHO), "distill", *_cli_args(world, run, *args)], run / "checkpoints" / "last.pt",
                                 _env(DHO_TEST_STEP_SLEEP="0.3"), start_new_session=True)
    if target == "process":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    step = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert f"stopped by SIGTERM at step {step}/15 with a checkpoint; continue with `dho distill --resume {run}`" in err
    assert 4 <= step < 15, step  # the step it stopped at (the first periodic checkpoint was at step 4)
    assert not (run / "model.pt").exists()

    resumed = subprocess.run([str(DHO), "distill", "--resume", str(run)], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stdout
    a, b = _state(full), _state(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [m["step"] for m in _metrics(run) if "loss" in m]
    assert steps == sorted(set(steps)) == list(range(1, 16)), steps  # no step logged twice after the resume
    assert (run / "summary.csv").read_text() == (full / "summary.csv").read_text()  # no epoch twice, none lost


def test_a_run_that_died_before_its_first_checkpoint_is_started_again(world, tmp_path):
    cfg = _cfg(world, tmp_path / "run", epochs=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.__dict__))  # what a run killed at step 0 leaves
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.9}\n')
    distill(cfg)  # the same command: no "already holds a run", no "no checkpoint"
    assert (tmp_path / "run" / "model.pt").is_file()
    assert [m["step"] for m in _metrics(tmp_path / "run") if "loss" in m] == list(range(1, 6))
    again = tmp_path / "again"
    again.mkdir()
    (again / "config.json").write_text(json.dumps(replace(cfg, out=str(again)).__dict__))
    distill(replace(cfg, out=str(again)), resume=True)  # --resume on it starts it too
    assert (again / "model.pt").is_file()
    with pytest.raises(ConfigError, match="holds a run stopped at step 5; pass --resume"):
        (again / "model.pt").unlink()
        distill(replace(cfg, out=str(again)))


def test_resume_refuses_what_changes_the_data_order_or_the_numerics(world, tmp_path):
    run = tmp_path / "run"
    distill(_cfg(world, run, epochs=1, max_steps=2))
    for change, name in (({"workers": 1}, "workers: 0 -> 1"), ({"device": "auto"}, "device: 'cpu' -> 'auto'"),
                         ({"precision": "fp32"}, "precision: 'auto' -> 'fp32'")):
        with pytest.raises(ConfigError, match=re.escape(name)):
            distill(_cfg(world, run, epochs=1, max_steps=2, **change), resume=True)
    distill(_cfg(world, run, epochs=1, log_every=2), resume=True)  # logging and max_steps may change


def test_sync_batchnorm_is_refused_on_cpu_under_torchrun(world, tmp_path, monkeypatch):
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)  # as torchrun sets them
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA devices"):
        distill(_cfg(world, tmp_path / "run", sync_bn=True))
    monkeypatch.setenv("WORLD_SIZE", "1")
    distill(_cfg(world, tmp_path / "one", epochs=1, max_steps=1, sync_bn=True))  # one process: nothing to synchronise


def test_distill_help_shows_the_config_defaults():
    """The `[default: X]` that `dho distill --help` prints for each option is DistillConfig's default (the CLI's
    show_default texts are made from its fields: no drift, no typed copy)."""
    import dataclasses
    import re

    import typer
    from typer.testing import CliRunner

    from dho.cli import app

    command = typer.main.get_command(app).commands["distill"]
    text = re.sub(r"\s", "", CliRunner().invoke(app, ["distill", "--help"]).output)
    fields = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    checked = 0
    for param in command.params:
        name = {"text_init": "init_heads_from_text", "compile_": "compile"}.get(param.name, param.name)
        if name not in fields or fields[name] is dataclasses.MISSING or "[required" in param.help:
            continue  # "[required with --unlabeled]": a default None that is not a choice
        default = fields[name]
        shown = "on" if default is True else "off" if default is False else "none" if default is None else str(default)
        assert param.show_default == shown, (name, param.show_default, default)
        assert param.help.find("[default:") < 0, name  # not typed in the help text
        assert f"[default:{shown}]" in text, name  # printed (tests/test_cli_help.py: beside its own option)
        checked += 1
    assert checked >= 42, checked


def test_the_torch_free_config_names_equal_their_homes_and_every_flag_is_an_option():
    """dho/distill/config.py writes out the method names, VLM head forms and temperatures (the config needs no torch):
    they equal the objectives' records, dho.students and dho.losses; each field's flag name is a `dho distill` option."""
    import dataclasses

    import typer

    from dho import losses, students
    from dho.cli import app
    from dho.distill import config, objective

    assert config.METHODS == tuple(objective.OBJECTIVES) and config.VLM_HEADS == students.VLM_HEADS
    assert config.TEXT_INIT_HEADS == students.TEXT_INIT_HEADS
    assert (config.ETA, config.ZETA) == (losses.ETA, losses.ZETA)
    flags = {o for p in typer.main.get_command(app).commands["distill"].params for o in p.opts}
    for f in dataclasses.fields(DistillConfig):
        assert "--" + config.flag_name(f.name) in flags, f.name
        assert config.field_name(config.flag_name(f.name)) == f.name == config.field_name(f.name)


def test_config_files_take_both_spellings_refuse_duplicates_and_suggest_unknown_keys(tmp_path):
    from dho.distill.config import merge

    required = {"labeled": "L", "labeled_cache": "L.zarr", "student": "resnet18", "out": "RUN"}
    file = tmp_path / "c.yaml"
    file.write_text("text_init: false\nlambda: 0.2\nbatch-size: 8\nalign_kd_head: false\nweight_decay: 0.05\n")
    cfg = merge(required, options_file=file)
    assert (cfg.init_heads_from_text, cfg.lambda_, cfg.batch_size, cfg.align_kd_head, cfg.weight_decay) == (False, 0.2, 8, False, 0.05)
    file.write_text("init_heads_from_text: false\nlambda_: 0.2\n")  # the names of RUN/config.json
    assert merge(required, options_file=file) == replace(cfg, batch_size=64, align_kd_head=True, weight_decay=0.01)
    for text, message in (
        ("text-init: false\ninit_heads_from_text: true\n", "'text-init' and 'init_heads_from_text' are one option; keep one"),
        ("lambda: 0.1\nlambda_: 0.2\n", "'lambda' and 'lambda_' are one option; keep one"),
        ("learning_rate: 0.1\n", "unknown option keys ['learning_rate'] (learning_rate: did you mean lr?); known: ["),
        ("epochz: 3\ntext_inti: true\n", "unknown option keys ['epochz', 'text_inti'] (epochz: did you mean epoch or epochs?; "
                                           "text_inti: did you mean text-init?); known: ["),
        ("batch-sise: 3\n", "unknown option keys ['batch-sise'] (batch-sise: did you mean batch-size?)"),
        ("colour: red\n", "unknown option keys ['colour']; known: ['accum-steps', 'align-kd-head', 'alpha',"),
    ):
        file.write_text(text)
        with pytest.raises(ConfigError) as e:
            merge(required, options_file=file)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_config_yaml_and_print_config_read_back_to_the_same_config(world, tmp_path, capsys):
    """RUN/config.yaml and `--print-config` (which writes nothing) hold the options keyed by their flags; fed back with
    --config they give the same run: the same config.json."""
    from dho.cli import app

    def options(run):
        return ["--labeled", str(world / "labeled"), "--labeled-cache", str(world / "labeled.zarr"),
                "--unlabeled", str(world / "full"), "--unlabeled-cache", str(world / "full.zarr"), "--student", "resnet-tiny",
                "--out", str(run), "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--lr", "3e-5",
                "--lambda", "0.25", "--no-text-init", "--workers", "0", "--device", "cpu"]

    run, again = tmp_path / "run", tmp_path / "again"
    app(["distill", *options(run), "--print-config"], standalone_mode=False)
    printed = capsys.readouterr().out
    assert not run.exists()
    assert "\nlambda: 0.25\n" in printed and "\ntext-init: false\n" in printed and "\nlr: 3.0e-05\n" in printed
    assert "\nlabeled-cache: " in printed and "_" not in "".join(line.split(":")[0] for line in printed.splitlines())
    app(["distill", *options(run)], standalone_mode=False)
    assert (run / "config.yaml").read_text() == printed
    (tmp_path / "printed.yaml").write_text(printed.replace(f"out: {run}\n", f"out: {again}\n"))
    app(["distill", "--config", str(tmp_path / "printed.yaml")], standalone_mode=False)
    stored, fed_back = (json.loads((r / "config.json").read_text()) for r in (run, again))
    assert fed_back == {**stored, "out": str(again)} and stored["init_heads_from_text"] is False and stored["lambda_"] == 0.25
    app(["distill", "--config", str(run / "config.yaml"), "--print-config"], standalone_mode=False)
    assert capsys.readouterr().out.endswith(printed.split("\n", 2)[2])  # the header's comment lines, then the same options


def test_method_help_lists_exactly_the_objectives():
    """`--method` choices come from one place, the records of dho/distill/objective.py; the CLI's help (written
    out so that `dho --help` needs no torch) must list exactly those."""
    import re

    import typer

    from dho.cli import app
    from dho.distill import METHODS

    command = typer.main.get_command(app).commands["distill"]
    help_text = next(p.help for p in command.params if p.name == "method")
    assert re.match(r"(\S+(?: \| \S+)*)\.", help_text).group(1).split(" | ") == list(METHODS)


def test_distill_never_imports_the_teacher(world, tmp_path):
    """Stage 2 trains from the cache alone: neither dho.teacher nor the teacher's weights are loaded."""
    cfg = _cfg(world, tmp_path / "run", epochs=1)
    script = (
        "import sys, json\n"
        "from dho.distill import DistillConfig, distill\n"
        f"distill(DistillConfig(**json.loads({json.dumps(json.dumps(cfg.__dict__))})))\n"
        "assert 'dho.teacher' not in sys.modules and 'dho.precompute' not in sys.modules, sorted(m for m in sys.modules if m.startswith('dho'))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_stream_replays_the_cached_views_as_uint8(world):
    """Each streamed image is the cached view's box replayed at the student's size, as uint8;
    normalised on the device it equals the float `replay_view` the evaluation path uses."""
    from dho.cache import TeacherCache
    from dho.stream import PairedStream, Part, PartData

    full = data.Dataset.open(world / "full")
    cache = TeacherCache.open(world / "full.zarr", dataset=full)
    stream = PairedStream([], [PartData.of(Part(world / "full", world / "full.zarr"), full, cache)], micro_l=0, micro_u=6,
                          seed=0, rank=0, world_size=1, num_workers=0, start_item=0, view_sampling="cycle",
                          image_size=24, interpolation="bicubic", eta=2.0)
    batch = next(iter(stream)).u
    assert batch.image.dtype == torch.uint8 and batch.image.shape == (6, 3, 24, 24)
    samples = {s.key: s for i in range(len(full.shards)) for s in data.iter_shard(full, i)}
    keys = [k for i in range(len(full.shards)) for k in full.shards[i].keys]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for row, index in enumerate(batch.index.tolist()):
        params = cache.view_params(0, index, index + 1)[0]  # pass 0 -> view 0
        expected = data.replay_view(samples[keys[index]].image, params, 24, "bicubic", mean, std)
        assert torch.equal(data.normalize(batch.image[row], mean, std), expected)
        probs = cache.probs(0, index, index + 1, eta=2.0)[0]
        assert np.allclose(batch.probs[row].numpy(), probs)


def test_exclude_labeled_pool_never_draws_a_labeled_sample_and_sets_the_epoch(world):
    """--unlabeled-pool exclude-labeled (the reference's loaders): the unlabeled half skips every labeled key."""
    from dho.stream import PairedStream, Part, PartData

    full, labeled = data.Dataset.open(world / "full"), data.Dataset.open(world / "labeled")
    part = Part(world / "full", world / "full.zarr", exclude=tuple(labeled.keys))
    stream = PairedStream([], [PartData.open(part)], micro_l=0, micro_u=4, seed=0, rank=0, world_size=1, num_workers=0, start_item=0,
                          view_sampling="cycle", image_size=24, interpolation="bilinear", eta=2.0)
    pool = len(full.keys) - len(labeled.keys)  # 40 - 8
    batches = iter(stream)
    drawn = [full.keys[i] for _ in range(2 * pool // 4) for i in next(batches).u.index.tolist()]  # two passes
    assert not set(drawn) & set(labeled.keys)
    assert sorted(drawn[:pool]) == sorted(set(full.keys) - set(labeled.keys)) == sorted(drawn[pool:])


def test_reference_options_are_recorded_and_lr_is_the_rate_each_step_used(world, tmp_path, capsys):
    run = tmp_path / "run"
    distill(_cfg(world, run, epochs=2, lr_schedule="reference", warmup_steps=3, unlabeled_pool="exclude-labeled",
                 interpolation="bicubic"))
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["lr_schedule"], cfg["unlabeled_pool"], cfg["vlm_heads"], cfg["interpolation"]) == (
        "reference", "exclude-labeled", "reference", "bicubic")
    steps_per_epoch = -(-(40 - 8) // 8)  # ceil: the reference's DataLoader keeps the ragged batch
    logged = [m for m in _metrics(run) if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, 2 * steps_per_epoch + 1))
    for m in logged:  # step s (1-based) ran at the rate of schedule position s - 1
        assert m["lr"] == pytest.approx(3e-3 * reference_lr_lambda(m["step"] - 1, 3, 2 * steps_per_epoch), rel=1e-9)
    assert load_student(run / "model.pt")[1]["preprocess"].interpolation == "bicubic"
    out = capsys.readouterr().out
    # 8 labeled samples x 2 views, drawn 8 x 8 / 8 = 8 times each; the pool's 32 x 2 views, 2 times each
    assert "labeled stream: 8 samples x 2 cached views; each sample is drawn ~8.0 times, each (sample, view) ~4.0 times" in out
    assert "unlabeled stream: 32 samples x 2 cached views; each sample is drawn ~2.0 times, each (sample, view) ~1.0 times" in out
    assert "warning" not in out


def test_heavy_reuse_of_cached_views_is_warned_about(world, tmp_path, capsys):
    distill(_cfg(world, tmp_path / "run", epochs=6))
    out = capsys.readouterr().out
    # 6 epochs x 5 steps x 8 labeled per step over 8 labeled samples = 30 draws over 2 views = 15 per view
    assert "warning: each labeled (sample, view) is used ~15 times (more than 10)" in out and "--views 3 or more" in out
    with pytest.raises(ConfigError, match="--lr-schedule must be one of warmup-cosine, reference, linear"):
        distill(_cfg(world, tmp_path / "bad", lr_schedule="step"))
    with pytest.raises(ConfigError, match="--unlabeled-pool must be one of union, exclude-labeled"):
        distill(_cfg(world, tmp_path / "bad", unlabeled_pool="all"))


def test_linear_schedule_is_transformers_linear_warmup_then_decay():
    """The ten-dataset reference: get_linear_schedule_with_warmup(warmup = 0.1 x total), stepped per iteration."""
    from dho.distill import linear_lr_lambda

    total, warmup = 400, 0.1 * 400
    assert linear_lr_lambda(0, warmup, total) == 0.0 and linear_lr_lambda(20, warmup, total) == pytest.approx(0.5)
    assert linear_lr_lambda(40, warmup, total) == pytest.approx(1.0) and linear_lr_lambda(220, warmup, total) == pytest.approx(0.5)
    assert linear_lr_lambda(400, warmup, total) == 0.0 and linear_lr_lambda(1, 0, 10) == pytest.approx(0.9)


def test_the_ten_dataset_reference_options(world, tmp_path):
    """--epoch shorter (the zip of two loaders), --forward separate, --lr-schedule linear with --warmup-fraction,
    --select-best-on-val: the epoch best on val becomes model.pt with its alpha/beta."""
    run = tmp_path / "run"
    distill(_cfg(world, run, epochs=3, epoch="shorter", forward="separate", lr_schedule="linear", warmup_fraction=0.1,
                 val=str(world / "val"), select_best_on_val=True, unlabeled_pool="exclude-labeled"))
    # 8 labeled vs 32 unlabeled at batch 8: the shorter pass is 1 step, so 3 epochs are 3 steps
    logged = [m for m in _metrics(run) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert logged[0]["lr"] == 0.0  # transformers' warm-up starts at 0
    selections = [m for m in _metrics(run) if "val_selection_top1" in m]
    assert [m["epoch"] for m in selections] == [1, 2, 3]
    best = max(selections, key=lambda m: (m["val_selection_top1"], -m["epoch"]))
    student, meta = load_student(run / "model.pt")
    chosen = meta["extra"]["selected_on_val"]
    assert chosen["epoch"] == best["epoch"] and chosen["top1"] == best["val_selection_top1"]
    stored = json.loads((run / "alpha_beta.json").read_text())
    assert (meta["alpha"], meta["beta"]) == (stored["alpha"], stored["beta"]) and stored["epoch"] == best["epoch"]
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["epoch"], cfg["forward"], cfg["lr_schedule"], cfg["warmup_fraction"]) == ("shorter", "separate", "linear", 0.1)
    with pytest.raises(ConfigError, match="--select-best-on-val needs --val"):
        _cfg(world, tmp_path / "x", select_best_on_val=True)
    # the best epoch lives in checkpoints/best/ until the schedule ends; a lost model.pt comes back on --resume
    assert (run / "model.pt").read_bytes() == (run / "checkpoints" / "best" / "model.pt").read_bytes()
    kept = {n: (run / n).read_bytes() for n in ("model.pt", "alpha_beta.json")}
    for name in kept:
        (run / name).unlink()
    distill(_cfg(world, run, epochs=3, epoch="shorter", forward="separate", lr_schedule="linear", warmup_fraction=0.1,
                 val=str(world / "val"), select_best_on_val=True, unlabeled_pool="exclude-labeled"), resume=True)
    assert {n: (run / n).read_bytes() for n in kept} == kept


def test_an_unfinished_select_best_run_has_no_model(world, tmp_path, monkeypatch):
    """--select-best-on-val keeps the best epoch so far out of RUN/model.pt: a run stopped after its first
    epoch must not look finished (a Makefile or a user takes model.pt as the end of the run)."""
    import os
    import signal

    from dho import evaluate
    from dho.errors import Interrupted

    search = evaluate.search_and_store

    def search_then_stop(*args, **kwargs):
        result = search(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the run stops (with a checkpoint) at the end of the next step
        return result

    monkeypatch.setattr(evaluate, "search_and_store", search_then_stop)
    run = tmp_path / "run"
    cfg = dict(epochs=3, epoch="shorter", val=str(world / "val"), select_best_on_val=True, unlabeled_pool="exclude-labeled")
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 2/3"):
        distill(_cfg(world, run, **cfg))
    assert (run / "checkpoints" / "best" / "model.pt").is_file() and not (run / "model.pt").exists()
    assert not (run / "alpha_beta.json").exists()
    monkeypatch.setattr(evaluate, "search_and_store", search)
    distill(_cfg(world, run, **cfg), resume=True)
    _, meta = load_student(run / "model.pt")
    assert meta["extra"]["selected_on_val"]["epoch"] in (1, 2, 3) and (run / "alpha_beta.json").is_file()


def test_report_to_sinks_log_txt_checkpoints_and_best(world, tmp_path, monkeypatch):
    """--report-to tensorboard,wandb: grouped names in both; the console in RUN/log.txt with per-epoch validation;
    --keep-checkpoints 3 keeps the newest three; last.pt loads with plain torch.load; the best epoch on val is kept."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    distill(_cfg(world, run, epochs=3, val=str(world / "val"), eval_every_epoch=True, report_to="tensorboard,wandb",
                 keep_checkpoints=3, checkpoint_every=2, log_every=5, run_name="r-tiny-2shot", group="grp-seeds-a",
                 tags="tag-alpha, tag-beta"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/kd", "train/kd_labeled", "train/kd_unlabeled", "train/lr",
            "train/data_wait_s", "val/combined_top1", "val/ce_head_top1", "final/combined_top1", "final/kd_head_top1"} <= tags
    assert "train/peak_memory_gib" not in tags  # CUDA only
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    # each epoch's validation once under val/, the final one under final/ (not a second point at step 15)
    assert [e.step for e in acc.Scalars("val/combined_top1")] == [5, 10, 15]
    final = [m for m in _metrics(run) if m.get("final")][0]
    assert [(e.step, e.value) for e in acc.Scalars("final/combined_top1")] == [(15, pytest.approx(final["val_combined_top1"]))]
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and (run / "wandb_id.txt").read_text().strip() in wandb_runs[0].name
    record = next(wandb_runs[0].glob("*.wandb")).read_bytes()  # the offline run's records (protobuf): name, group, tags
    assert all(s in record for s in (b"r-tiny-2shot", b"grp-seeds-a", b"tag-alpha", b"tag-beta", b"final/combined_top1"))

    log = (run / "log.txt").read_text()
    assert log.startswith("dho distill: dho | student resnet-tiny") and "done: " in log
    assert [line.split(":")[0] for line in log.splitlines() if "validation:" in line] == [
        "epoch 1 validation", "epoch 2 validation", "epoch 3 validation", "validation"]
    steps = sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pt"))
    assert steps == [12, 14, 15]  # 5 steps per epoch; every 2 steps and at each epoch end; the newest three
    ckpt = torch.load(run / "checkpoints" / "last.pt")  # weights_only: no numpy objects, no pickled classes
    assert ckpt["step"] == 15 and torch.equal(ckpt["model"]["student.ce_head.weight"],
                                              torch.load(run / "checkpoints" / "step-000000015.pt")["model"]["student.ce_head.weight"])
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    vals = [m["val_combined_top1"] for m in _metrics(run) if "val_combined_top1" in m and not m.get("final")]
    assert best["top1"] == max(vals) and best["epoch"] == 1 + vals.index(max(vals))
    load_student(run / "checkpoints" / "best" / "model.pt")


def test_wandb_names_are_checked_and_may_change_on_resume(world, tmp_path, capsys):
    for kw, said in (({"tags": "a,,b"}, "--tags 'a,,b' has an empty tag"), ({"tags": "x" * 65}, "longer than 64 characters"),
                     ({"group": "g" * 129}, "--group must be 1 to 128 characters"), ({"run_name": " "}, "--run-name must not be empty")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            _cfg(world, tmp_path / "x", **kw)
    assert _cfg(world, tmp_path / "x", tags="b, a,b").tag_list() == ["b", "a"]
    run = tmp_path / "run"
    distill(_cfg(world, run, epochs=1, max_steps=2, group="one"))
    assert "note: --run-name, --group and --tags name the W&B run; without --report-to wandb" in capsys.readouterr().out
    distill(_cfg(world, run, epochs=1, group="two", tags="t", run_name="n"), resume=True)  # no numerics: not refused
    assert DistillConfig.load(run / "config.json").group == "two"


def test_report_to_refuses_unknown_and_missing_sinks(world, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"--report-to 'jsonl,mlflow': unknown \['mlflow'\]"):
        _cfg(world, tmp_path / "a", report_to="jsonl,mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package.*pip install 'dho\[wandb\]'"):
        _cfg(world, tmp_path / "b", report_to="wandb")


@pytest.mark.parametrize("student", ["resnet-tiny", str(TINY_CLIP_CONFIG)])
def test_hot_path_compiles_without_graph_breaks(student):
    """The student's forward over [labeled; unlabeled] and the DHO loss are one graph for torch.compile."""
    from dho.distill import OBJECTIVES, Trainee
    from dho.stream import Batch, Half
    from dho.students import build_student

    torch.manual_seed(0)
    s = build_student(student, 5, classnames=[f"c{i}" for i in range(5)])
    size = s.preprocess.image_size
    model = Trainee(s, None)
    labels = torch.tensor([0, 1, 2, 3])
    batch = Batch(Half(labels, labels, image=torch.randn(4, 3, size, size), probs=torch.softmax(torch.randn(4, 5), -1)),
                  Half(labels, labels, image=torch.randn(4, 3, size, size), probs=torch.softmax(torch.randn(4, 5), -1)))

    def forward_loss(b):  # as dho.distill.loop's step: both halves through the student, the method's loss
        out_l, out_u = model(*b.images(), False)
        return OBJECTIVES["dho"].loss(out_l, out_u, b, model, 0.5, 2.0)

    explained = torch._dynamo.explain(forward_loss)(batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_training_matches_eager(world, tmp_path):
    """--compile trains the same model as eager within float tolerance (other kernels, same math)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    distill(_cfg(world, eager, epochs=1, max_steps=3, workers=0))
    distill(_cfg(world, compiled, epochs=1, max_steps=3, workers=0, compile=True))
    a = [m["loss"] for m in _metrics(eager) if "loss" in m]
    b = [m["loss"] for m in _metrics(compiled) if "loss" in m]
    assert len(a) == len(b) == 3 and b == pytest.approx(a, rel=1e-4, abs=1e-5)
    wa = torch.load(eager / "checkpoints" / "last.pt")["model"]
    wb = torch.load(compiled / "checkpoints" / "last.pt")["model"]
    assert wa.keys() == wb.keys()  # the compiled wrapper adds no prefix: checkpoints and model.pt are interchangeable
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=1e-3, atol=1e-4)
    assert json.loads((compiled / "config.json").read_text())["compile"] is True


def test_workers_receive_arrays_not_the_manifest(world, tmp_path, monkeypatch):
    """The stream opens datasets and caches once, in the main process; DataLoader workers read shards and
    chunks only (opening a manifest or a cache there fails this test) and hold no per-sample Python object."""
    import pickle

    from dho.cache import TeacherCache
    from dho.stream import PairedStream, Part, PartData

    kw = dict(micro_l=2, micro_u=4, seed=0, rank=0, world_size=1, num_workers=2, start_item=0, view_sampling="random",
              image_size=16, interpolation="bilinear", eta=2.0)
    parts = [PartData.open(Part(world / "labeled", world / "labeled.zarr")), PartData.open(Part(world / "full", world / "full.zarr"))]
    stream = PairedStream(parts[:1], parts[1:], **kw)
    for part in parts:
        assert part.dataset._keys is None and "keys" not in part.dataset.manifest["shards"][0]
        assert isinstance(part.dataset.key_bytes, np.ndarray) and part.usable.dtype == bool
    # the per-worker state is O(shards): its pickle is a few kB beside the datasets' columns
    state = pickle.dumps(stream)
    assert len(state) < 40_000, len(state)

    def refuse(*a, **k):
        raise AssertionError("a worker re-opened a manifest or a cache")

    monkeypatch.setattr(data.Dataset, "open", refuse)
    monkeypatch.setattr(TeacherCache, "open", refuse)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = [b for _, b in zip(range(4), loader)]
    # worker w is consumer w of 2: the batches equal what those consumers yield in this process
    consumers = [(stream.half("l", c, 2), stream.half("u", c, 2)) for c in (0, 1)]
    for i, b in enumerate(got):
        want_l, want_u = (next(h) for h in consumers[i % 2])
        assert torch.equal(b.u.index, want_u.index) and torch.equal(b.u.image, want_u.image)
        assert torch.equal(b.l.index, want_l.index) and torch.equal(b.u.probs, want_u.probs)


def test_topk_caches_stay_sparse_until_the_loop(world, tmp_path, tiny_teacher_ckpt):
    """A top-k cache is streamed as (b, K) rows and densified by the loop (`densify`): equal to the
    cache's dense reading at the distillation eta (numpy densify + exact re-tempering)."""
    from dho.cache import TeacherCache
    from dho.stream import PairedStream, Part, PartData

    precompute(world / "full", tmp_path / "top.zarr", model=str(TINY_CLIP_CONFIG), views=2, device="cpu", workers=0,
               batch_size=16, topk=2, pretrained=str(tiny_teacher_ckpt))
    cache = TeacherCache.open(tmp_path / "top.zarr")
    stream = PairedStream([], [PartData.open(Part(world / "full", tmp_path / "top.zarr"))], micro_l=0, micro_u=6, seed=0, rank=0,
                          world_size=1, num_workers=0, start_item=0, view_sampling="cycle", image_size=16,
                          interpolation="bilinear", eta=1.5)
    batch = next(iter(stream)).u
    assert batch.probs is None and batch.topk_idx.shape == (6, 2) and batch.topk_val.dtype == torch.float32
    dense = stream.densify("u", batch, num_classes=4).probs  # (6, 4)
    expected = np.stack([cache.probs(0, i, i + 1, eta=1.5)[0] for i in batch.index.tolist()])
    assert np.allclose(dense.numpy(), expected, atol=1e-6) and np.allclose(dense.sum(1).numpy(), 1, atol=1e-5)


def test_each_dataset_cache_and_the_validation_set_is_opened_once_per_run(world, tmp_path, monkeypatch):
    """A run opens (and checks) each training dataset, each cache and --val once: the streams and the workers
    get the opened parts, every epoch's validation and best-epoch selection reuse the opened --val."""
    from collections import Counter

    from dho.cache import TeacherCache

    opened: Counter = Counter()
    open_dataset, open_cache = data.Dataset.open.__func__, TeacherCache.open.__func__

    def counting(kind, real):
        def open_(cls, path, *args, **kwargs):
            opened[(kind, Path(path).name)] += 1
            return real(cls, path, *args, **kwargs)
        return classmethod(open_)

    monkeypatch.setattr(data.Dataset, "open", counting("dataset", open_dataset))
    monkeypatch.setattr(TeacherCache, "open", counting("cache", open_cache))
    run = tmp_path / "run"
    distill(_cfg(world, run, epochs=3, val=str(world / "val"), eval_every_epoch=True, select_best_on_val=True, workers=2))
    assert dict(opened) == {("dataset", "labeled"): 1, ("dataset", "full"): 1, ("dataset", "val"): 1,
                            ("cache", "labeled.zarr"): 1, ("cache", "full.zarr"): 1}
    assert len([m for m in _metrics(run) if "val_selection_top1" in m]) == 3 and (run / "model.pt").is_file()


def test_a_labeled_set_missing_classes_is_warned_about(world, tmp_path, capsys, tiny_teacher_ckpt):  # noqa: F811
    """A --keys split covering 1 of 4 classes trains (its labels say nothing of 3 classes): one warning line."""
    lab = data.Dataset.open(world / "labeled")
    keys = [lab.key(i) for i in range(lab.num_samples) if lab.labels[i] == 0]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    one, _ = data.split(world / "full", tmp_path / "one-class", keys_file=tmp_path / "keys.txt", shard_size=4)
    precompute(one.root, tmp_path / "one.zarr", model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2,
               device="cpu", workers=0)
    distill(_cfg(world, tmp_path / "run", labeled=str(one.root), labeled_cache=str(tmp_path / "one.zarr"), epochs=1))
    out = capsys.readouterr().out
    assert f"warning: the labeled set {one.root} holds no usable sample of 3 of the 4 classes (first: 'class_1')" in out


def test_the_torch_free_names_are_the_builders():
    """dho/names.py holds what the CLI checks before torch is imported; it must be what the builders build."""
    from dho import losses, names, students
    from dho.distill import METHODS, OBJECTIVES

    assert names.METHODS == METHODS == tuple(OBJECTIVES)
    assert names.CNN_STUDENTS == tuple(students._TORCHVISION_STUDENTS)
    assert (names.ETA, names.ZETA) == (losses.ETA, losses.ZETA) == (DistillConfig.eta, DistillConfig.zeta)
    import open_clip

    assert sorted(open_clip.list_models()) == sorted(names.open_clip_models())
