"""dho.losses: hand-computed values on fixed tiny tensors, KL direction, eta**2 scale, Theorem A.1."""

from __future__ import annotations

import math

import pytest
import torch

from dho import losses


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


LOGITS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])  # (2, 3)
PROBS = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])  # (2, 3), with exact zeros


def test_ce_loss_hand_value():
    labels = torch.tensor([2, 0])
    expected = ((math.log(math.e + math.e**2 + math.e**3) - 3.0) + math.log(3.0)) / 2
    assert losses.ce_loss(LOGITS, labels).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_hand_value_direction_and_zero_probs():
    eta = 2.0
    q1 = _softmax([0.5, 1.0, 1.5])  # softmax(logits / eta)
    kl_pq = (_kl([0.7, 0.2, 0.1], q1) + math.log(3.0)) / 2  # row 2: p = e_0, q uniform -> log 3
    got = losses.kd_loss(LOGITS, PROBS, eta).item()
    assert got == pytest.approx(eta**2 * kl_pq, rel=1e-5)
    # KL(p || q), not KL(q || p): on row 1 alone the two directions differ
    kl_qp = _kl(q1, [0.7, 0.2, 0.1])
    row1 = losses.kd_loss(LOGITS[:1], PROBS[:1], eta).item()
    assert row1 == pytest.approx(eta**2 * _kl([0.7, 0.2, 0.1], q1), rel=1e-5)
    assert abs(row1 - eta**2 * kl_qp) > 0.1
    assert math.isfinite(got)


def test_kd_loss_eta_squared_scale_and_float32():
    p = torch.softmax(torch.tensor([[0.3, -1.0, 2.0, 0.5]]), dim=-1)
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    base = losses.kd_loss(logits, p, eta=1.0)
    # same student distribution at temperature 4 -> same KL, times 4**2
    assert losses.kd_loss(logits * 4.0, p, eta=4.0).item() == pytest.approx(16.0 * base.item(), rel=1e-5)
    half = losses.kd_loss(logits.half(), p.half(), eta=1.0)
    assert half.dtype == torch.float32
    assert losses.kd_loss(logits, p, eta=1.0).item() >= 0.0
    assert losses.kd_loss(torch.log(p), p, eta=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dho_loss_terms_and_head_separation():
    ce_l = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    kd_l = torch.tensor([[0.5, 0.5, 0.0]], requires_grad=True)
    kd_u = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0])
    p_l = torch.tensor([[0.6, 0.3, 0.1]])
    p_u = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    out = losses.dho_loss(ce_l, kd_l, labels, p_l, kd_u, p_u, lambda_=0.5, eta=2.0)
    assert set(out) == {"loss", "ce", "kd", "kd_labeled", "kd_unlabeled"}
    assert out["ce"].item() == pytest.approx(losses.ce_loss(ce_l, labels).item())
    assert out["kd_labeled"].item() == pytest.approx(losses.kd_loss(kd_l, p_l, 2.0).item())
    assert out["kd_unlabeled"].item() == pytest.approx(losses.kd_loss(kd_u, p_u, 2.0).item())
    assert out["kd"].item() == pytest.approx(out["kd_labeled"].item() + out["kd_unlabeled"].item())
    assert out["loss"].item() == pytest.approx(0.5 * out["ce"].item() + 0.5 * out["kd"].item())
    out["loss"].backward()
    # ce_head gets only the CE gradient: lambda * (softmax - y) / B (Eq. 8)
    expected = 0.5 * (torch.softmax(ce_l.detach(), -1) - torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(ce_l.grad, expected)
    # kd_head gets only the KD gradient: (1 - lambda) * eta**2 * (q - p) / eta / B
    q = torch.softmax(kd_l.detach() / 2.0, -1)
    torch.testing.assert_close(kd_l.grad, 0.5 * 2.0 * (q - p_l))


def test_single_head_baselines():
    logits_l = torch.tensor([[2.0, 0.0, -1.0]])
    logits_u = torch.tensor([[1.0, -1.0, 0.0]])
    labels = torch.tensor([1])
    p_l, p_u = torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([[0.2, 0.2, 0.6]])
    sho = losses.sho_loss(logits_l, labels, p_l, logits_u, p_u, lambda_=0.3, eta=2.0)
    dho = losses.dho_loss(logits_l, logits_l, labels, p_l, logits_u, p_u, lambda_=0.3, eta=2.0)
    for k in dho:
        assert sho[k].item() == pytest.approx(dho[k].item())
    assert losses.ce_only(logits_l, labels)["loss"].item() == pytest.approx(losses.ce_loss(logits_l, labels).item())
    kd = losses.kd_only(logits_u, p_u, eta=2.0)
    assert kd["loss"].item() == pytest.approx(losses.kd_loss(logits_u, p_u, 2.0).item())


def test_feature_kd_loss_hand_value():
    z = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    emb = torch.tensor([[10.0, 0.0], [0.0, 2.0]])
    # row 1: |(0.6, 0.8) - (1, 0)|^2 = 0.16 + 0.64 = 0.8 ; row 2: |(1, 0) - (0, 1)|^2 = 2
    got = losses.feature_kd_loss(z, emb, torch.nn.Identity())
    assert got.item() == pytest.approx((0.8 + 2.0) / 2)
    proj = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps coordinates
    assert losses.feature_kd_loss(z, emb, proj).item() == pytest.approx(((0.8 - 1.0) ** 2 + 0.6**2 + 0.0) / 2)
    both = losses.ce_feature_kd_loss(z, torch.tensor([0, 1]), z, emb, torch.nn.Identity(), lambda_=0.25)
    assert both["loss"].item() == pytest.approx(0.25 * both["ce"].item() + 0.75 * 1.4)


def test_theorem_a1_single_head_optimum():
    """Minimising lambda*CE(y) + (1-lambda)*KL(p || softmax(l)) over free logits l gives
    softmax(l) = lambda*y + (1-lambda)*p (Theorem A.1, eta = 1)."""
    lam = 0.3
    y = torch.tensor([2])
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = torch.zeros(1, 4, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = lam * losses.ce_loss(logits, y) + (1 - lam) * losses.kd_loss(logits, p, eta=1.0)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    target = lam * torch.nn.functional.one_hot(y, 4).float() + (1 - lam) * p
    torch.testing.assert_close(torch.softmax(logits.detach(), -1), target, atol=1e-5, rtol=0)


def test_prediction_conflict_is_the_logit_gradient_inner_product():
    """(p_hat_CE - y)^T (p_hat_KD - p) equals the inner product of autograd's logit gradients of L_CE and
    L_KD / eta per sample (Eqs. 4-5 single head, 8-9 dual head)."""
    torch.manual_seed(0)
    b, c, eta = 6, 5, 2.0
    ce_logits = torch.randn(b, c, requires_grad=True)
    kd_logits = torch.randn(b, c, requires_grad=True)
    labels = torch.randint(0, c, (b,))
    p = torch.softmax(torch.randn(b, c), -1)
    inner = losses.prediction_conflict(ce_logits.detach(), kd_logits.detach(), labels, p, eta)
    # per-sample losses summed: row n of each gradient is sample n's own gradient
    g_ce, = torch.autograd.grad(losses.ce_loss(ce_logits, labels) * b, ce_logits)
    g_kd, = torch.autograd.grad(losses.kd_loss(kd_logits, p, eta) * b / eta, kd_logits)
    torch.testing.assert_close(inner, (g_ce * g_kd).sum(-1), atol=1e-6, rtol=1e-5)
    # single head: the same logits for both terms (SHO), a hand value for one sample
    one = losses.prediction_conflict(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([0]),
                                     torch.tensor([[0.0, 1.0]]), 1.0)
    assert float(one) == pytest.approx((0.5 - 1) * 0.5 + 0.5 * (0.5 - 1))  # -0.5: the label and teacher disagree
