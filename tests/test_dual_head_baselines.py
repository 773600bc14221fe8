"""The paper's two dual-head KD baselines (§4.1-4.2, Table 1's text): `dho distill --method sskd` (He et al. 2021)
and `--method dhkd` (Yang et al. 2024d). Each loss against a plain restatement of its equation on tiny tensors, the
teacher logits DHKD rebuilds from the cache against the cache's own probabilities, then each method through the real
`dho distill` / `dho evaluate` command lines on the tiny caches: trains, predicts with the ce_head, resumes bit for bit
after an interruption, and the one-line refusals."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dho import cli, losses
from dho.cache import TeacherCache
from dho.distill import DistillConfig
from dho.distill.objective import OBJECTIVES
from dho.errors import ConfigError
from dho.students import build_student, load_student
from fixtures_models import tiny_teacher_ckpt  # noqa: F401
from test_distill import world  # noqa: F401  the 4-class world: labeled / full / val, caches with and without embeddings

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated")


# ---------------------------------------------------------------------------------------------- the losses, restated


def _kl(p: list[float], logits: list[float], t: float) -> float:
    """KL(p || softmax(logits / t)) in float64, term by term."""
    m = max(x / t for x in logits)
    log_z = m + math.log(sum(math.exp(x / t - m) for x in logits))
    return sum(pi * (math.log(pi) - (x / t - log_z)) for pi, x in zip(p, logits) if pi > 0)


def _ce(logits: list[float], y: int) -> float:
    m = max(logits)
    return -(logits[y] - m - math.log(sum(math.exp(x - m) for x in logits)))


def _bern_kl(p: float, q: float) -> float:
    """KL(Bern(p) || Bern(q))."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def _tensors(seed: int, b: int = 3, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = lambda: torch.randn(b, c, generator=g) * 3  # noqa: E731
    probs = lambda: torch.softmax(torch.randn(b, c, generator=g) * 2, dim=-1)  # noqa: E731
    return logits, probs, torch.randint(0, c, (b,), generator=g)


def test_sskd_loss_is_ce_and_kd_on_the_ce_head_for_labeled_and_kd_on_the_aux_head_for_unlabeled():
    logits, probs, y = _tensors(0)
    ce_l, kd_u, p_l, p_u = logits(), logits(), probs(), probs()
    lam, eta = 0.3, 2.0
    got = losses.sskd_loss(ce_l, y, p_l, kd_u, p_u, lambda_=lam, eta=eta)
    ce = sum(_ce(r, int(t)) for r, t in zip(ce_l.tolist(), y)) / 3
    kd_l = eta**2 * sum(_kl(p, r, eta) for p, r in zip(p_l.tolist(), ce_l.tolist())) / 3
    kd_un = eta**2 * sum(_kl(p, r, eta) for p, r in zip(p_u.tolist(), kd_u.tolist())) / 3
    assert float(got["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(got["kd_labeled"]) == pytest.approx(kd_l, rel=1e-5)
    assert float(got["kd_unlabeled"]) == pytest.approx(kd_un, rel=1e-5)
    assert float(got["loss"]) == pytest.approx(lam * ce + (1 - lam) * (kd_l + kd_un), rel=1e-5)
    # the gradient reaches the ce_head's logits from CE and the labeled KL, the aux head's only from the unlabeled KL
    ce_l.requires_grad_(True)
    kd_u.requires_grad_(True)
    losses.sskd_loss(ce_l, y, p_l, kd_u, p_u, lambda_=1.0, eta=eta)["loss"].backward()
    assert kd_u.grad is None or not kd_u.grad.any()


def test_binary_kl_norm_is_the_per_class_binary_kl_of_the_logit_difference_to_one_half():
    logits, _, _ = _tensors(1)
    s, t, temp = logits(), logits(), 2.0
    got = float(losses.binary_kl_norm(s, t, temp))
    want = temp**2 * sum(
        sum(_bern_kl(0.5, 1 / (1 + math.exp(-(a - b) / temp))) for a, b in zip(rs, rt)) for rs, rt in zip(s.tolist(), t.tolist())
    ) / 3
    assert got == pytest.approx(want, rel=1e-5)
    assert float(losses.binary_kl_norm(t, t, temp)) == pytest.approx(0.0, abs=1e-6)  # zero where z_s = z_t
    # not invariant to a per-sample shift of the teacher's logits: log-probabilities would train another target
    shifted = t - torch.logsumexp(t / temp, dim=-1, keepdim=True) * temp  # eta * log softmax(t / eta): t - c(x)
    assert float(losses.binary_kl_norm(s, shifted, temp)) != pytest.approx(got, rel=1e-3)
    # CLIP-scale gaps (logit scale 100): finite, with the gradient of log cosh, T/2 tanh((z_s - z_t) / 2T) / B
    far = torch.tensor([[80.0, -90.0, 0.5]], requires_grad=True)
    value = losses.binary_kl_norm(far, torch.zeros(1, 3), temp)
    value.backward()
    assert math.isfinite(float(value.detach())) and float(value.detach()) == pytest.approx(
        temp**2 * sum(math.log(math.cosh(v / (2 * temp))) for v in (80.0, -90.0, 0.5)), rel=1e-6)
    assert torch.allclose(far.grad, temp / 2 * torch.tanh(far.detach() / (2 * temp)), atol=1e-6)


def test_dhkd_loss_is_ce_on_the_ce_head_and_binary_kl_norm_on_the_aux_head_for_both_halves():
    logits, _, y = _tensors(2)
    ce_l, kd_l, t_l, kd_u, t_u = logits(), logits(), logits(), logits(), logits()
    lam, eta = 0.5, 2.0
    got = losses.dhkd_loss(ce_l, y, kd_l, t_l, kd_u, t_u, lambda_=lam, eta=eta)
    bkln = lambda s, t: eta**2 * sum(  # noqa: E731
        sum(_bern_kl(0.5, 1 / (1 + math.exp(-(a - b) / eta))) for a, b in zip(rs, rt)) for rs, rt in zip(s.tolist(), t.tolist())) / 3
    ce = sum(_ce(r, int(c)) for r, c in zip(ce_l.tolist(), y)) / 3
    assert float(got["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(got["kd"]) == pytest.approx(bkln(kd_l, t_l) + bkln(kd_u, t_u), rel=1e-5)
    assert float(got["loss"]) == pytest.approx(lam * ce + (1 - lam) * (bkln(kd_l, t_l) + bkln(kd_u, t_u)), rel=1e-5)


def test_the_records_train_both_heads_and_predict_with_the_ce_head():
    for name in ("sskd", "dhkd"):
        o = OBJECTIVES[name]
        assert o.reads_labeled and o.reads_unlabeled and o.trains == ("ce_head", "kd_head") and o.alpha_beta == (1.0, 1.0)
    assert OBJECTIVES["dhkd"].reads_embeddings and not OBJECTIVES["sskd"].reads_embeddings


def test_teacher_logits_rebuilt_from_the_cache_reproduce_its_probabilities(world):  # noqa: F811
    """emb . W^T / zeta of the cache at temperature eta is the cached softmax, up to the float16 storage of both."""
    tc = TeacherCache.open(world / "full.zarr")
    emb = torch.from_numpy(tc.embeddings(0, 0, 8))  # (8, D)
    weight = torch.from_numpy(tc.text_classifier) / float(tc.attrs["zeta"])  # (C, D)
    rebuilt = torch.softmax(emb @ weight.T / float(tc.attrs["eta"]), dim=-1)
    cached = torch.from_numpy(tc.probs(0, 0, 8))
    assert float((rebuilt - cached).abs().max()) < 5e-3
    from dho.distill.objective import Trainee

    trainee = Trainee(torch.nn.Identity(), None, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop's --precision bf16: the teacher's logits stay float32
        logits = trainee.teacher_logits(emb)
    assert logits.dtype == torch.float32 and torch.equal(logits, emb @ weight.T)


# ---------------------------------------------------------------------------------------------- the command lines


def _cli(args: list[str]) -> tuple[int, str, str]:
    """`dho ARGS` in this process as the console script runs it -> (exit status, stdout, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["dho", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def _distill(world: Path, run: Path, method: str, *extra) -> None:
    code, out, err = _cli(["distill", "--labeled", world / "labeled", "--labeled-cache", world / "labeled.zarr",
                           "--unlabeled", world / "full", "--unlabeled-cache", world / "full.zarr", "--out", run,
                           "--student", "resnet-tiny", "--method", method, "--epochs", "2", "--batch-size", "8",
                           "--lr", "3e-3", "--device", "cpu", "--workers", "0", "--seed", "0", "--log-every", "1", *extra])
    assert code == 0, err + out


def _losses(run: Path) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.mark.parametrize("method", ["sskd", "dhkd"])
def test_method_trains_evaluates_with_the_ce_head_and_resumes_bit_identical(world, tmp_path, method):  # noqa: F811
    full, split = tmp_path / "full", tmp_path / "split"
    _distill(world, full, method)
    steps = _losses(full)
    assert len(steps) == 2 * 40 // 8 and all(math.isfinite(m["loss"]) for m in steps)
    assert {"ce", "kd", "kd_labeled", "kd_unlabeled"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]
    student, meta = load_student(full / "model.pt")
    assert (meta["alpha"], meta["beta"]) == (1.0, 1.0)  # predicts with the ce_head alone (paper §4.1)
    torch.manual_seed(0)
    init = build_student("resnet-tiny", 4)
    for head in ("ce_head", "kd_head"):  # both heads trained, both saved in model.pt
        assert not torch.equal(getattr(student, head).weight, getattr(init, head).weight), head

    _distill(world, split, method, "--max-steps", "3")  # interrupted after step 3 ...
    assert not (split / "model.pt").exists() or len(_losses(split)) == 3
    _distill(world, split, method, "--resume")  # ... and resumed
    a, b = load_student(full / "model.pt")[0].state_dict(), load_student(split / "model.pt")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in _losses(split)] == [m["loss"] for m in steps]

    code, out, err = _cli(["evaluate", full, "--data", world / "val", "--workers", "0", "--device", "cpu", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert (result["alpha"], result["beta"]) == (1.0, 1.0)
    assert result["combined"]["top1"] == result["ce_head"]["top1"] and 0 <= result["combined"]["top1"] <= 100


def test_dhkd_refuses_caches_without_embeddings_and_other_teachers_in_one_line(world, tmp_path):  # noqa: F811
    code, out, err = _cli(["distill", "--labeled", world / "labeled", "--labeled-cache", world / "labeled-noemb.zarr",
                           "--unlabeled", world / "full", "--unlabeled-cache", world / "full.zarr", "--out", tmp_path / "r",
                           "--student", "resnet-tiny", "--method", "dhkd", "--device", "cpu", "--workers", "0"])
    assert code == 2 and err.count("\n") == 1
    assert "labeled-noemb.zarr: --method dhkd needs teacher image embeddings in the caches (to rebuild the teacher's logits)" in err
    assert "--store-embeddings" in err
    # sskd reads the probabilities only: the same caches train it
    code, _, err = _cli(["distill", "--labeled", world / "labeled", "--labeled-cache", world / "labeled-noemb.zarr",
                         "--unlabeled", world / "full", "--unlabeled-cache", world / "full.zarr", "--out", tmp_path / "s",
                         "--student", "resnet-tiny", "--method", "sskd", "--device", "cpu", "--workers", "0", "--max-steps", "1"])
    assert code == 0, err


def test_dhkd_refuses_caches_of_two_teachers(world, tmp_path):  # noqa: F811
    from dho.distill.streams import _teacher_logit_weight
    from dho.errors import CacheError

    a = TeacherCache.open(world / "full.zarr")
    b = TeacherCache.open(world / "labeled.zarr")
    weight = _teacher_logit_weight("dhkd", [("a.zarr", a), ("b.zarr", b)])
    assert np.array_equal(weight, a.text_classifier / float(a.attrs["zeta"]))

    class Other:  # another teacher's cache: the same arrays, another identity
        attrs = {**b.attrs, "teacher": {**b.attrs["teacher"], "model": "other"}}
        text_classifier = b.text_classifier

    with pytest.raises(CacheError, match=r"b\.zarr and a\.zarr were made by different teachers .* --method dhkd distills one"):
        _teacher_logit_weight("dhkd", [("a.zarr", a), ("b.zarr", Other())])


def test_options_refuse_what_makes_no_sense_for_the_dual_head_baselines(world, tmp_path):  # noqa: F811
    base = dict(labeled=str(world / "labeled"), labeled_cache=str(world / "labeled.zarr"), student="resnet-tiny",
                out=str(tmp_path / "o"), device="cpu", workers=0)
    with pytest.raises(ConfigError, match="--method must be one of .*sskd, dhkd"):
        DistillConfig(**base, method="dhkd2")
    for method in ("sskd", "dhkd"):  # both read the unlabeled pool
        code, _, err = _cli(["distill", "--labeled", world / "labeled", "--labeled-cache", world / "labeled.zarr",
                             "--out", tmp_path / method, "--student", "resnet-tiny", "--method", method, "--device", "cpu"])
        assert code == 2 and err.count("\n") == 1 and f"--method {method} needs --unlabeled DATASET --unlabeled-cache CACHE" in err


@pytest.mark.parametrize("method", ["sskd", "dhkd"])
def test_pcgrad_projects_the_two_terms_of_each_dual_head_baseline(world, tmp_path, method):  # noqa: F811
    from dho.distill import distill
    from test_distill import _cfg

    distill(_cfg(world, tmp_path / "plain", method=method, epochs=1, max_steps=2))
    distill(_cfg(world, tmp_path / "pcgrad", method=method, epochs=1, max_steps=2, grad_surgery="pcgrad"))
    a, b = ([m["loss"] for m in _losses(tmp_path / run)] for run in ("plain", "pcgrad"))
    assert len(b) == 2 and a[0] == b[0] and math.isfinite(b[1])  # the same first loss (same weights and batch) ...
    w = [torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=False)["model"] for run in ("plain", "pcgrad")]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])  # ... then another update (the metrics keep 6 digits)
