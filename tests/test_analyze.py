"""dho.analyze: Fig. 15's head agreement on a hand-made example and on a tiny run, the feature
spectrum and the heads' dominant eigenvalues against numpy / torch eigen-solvers, the linear
probe, exported features, and the analysis folder with its refusals."""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers_data import make_image_folder
from helpers_student import make_trained_run

from dho import analyze as an
from dho import data
from dho import evaluate as ev
from dho.errors import ConfigError
from dho.students import CosineHead, NormalizedLinearHead, load_student

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds spin-waiting, badly so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
    """Read-only finished run (ce_head learns the labels, kd_head the class after it); copy it before writing."""
    return make_trained_run(tmp_path_factory.mktemp("runs") / "run", tiny_dataset)


@pytest.fixture(scope="module")
def train_dataset(tmp_path_factory):
    """Labeled training data for the probe: other images of the same 3 classes (read-only)."""
    root = tmp_path_factory.mktemp("probe")
    return data.prepare(make_image_folder(root / "images", num_classes=3, per_class=6, seed=1), root / "dataset", shard_size=4)


@pytest.fixture(scope="module")
def outputs(trained_run, tiny_dataset):
    """(student, ce, kd, labels, z) of the run over tiny_dataset, collected directly."""
    student, _ = load_student(trained_run / "model.pt")
    return (student, *ev.collect_logits(student, tiny_dataset, batch_size=256, device="cpu", workers=0, features=True))


# ---------------------------------------------------------------------------------- Fig. 15


def test_head_agreement_hand_example():
    # six samples, 3 classes; 10 = a confident logit, 1 = a mild one (softmax max 0.9999 / 0.5761)
    ce = torch.tensor([[10.0, 0, 0], [0, 10, 0], [0, 0, 10], [1, 0, 0], [1, 0, 0], [10, 0, 0]])
    kd = torch.tensor([[10.0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 10, 0], [0, 10, 0], [10, 0, 0]])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    # heads:    both right, both right, ce only, ce only, kd only, both wrong
    # Eq. 11 at alpha 0.5, beta 1: right, right, right (0.61 vs 0.29), wrong (kd's 0.61 wins), right, wrong
    res = an.head_agreement(ce, kd, labels, alpha=0.5, beta=1.0, classnames=["a", "b", "c"])
    assert res["num_samples"] == 6 and res["num_classes"] == 3
    assert res["top1"] == pytest.approx({"ce_head": 400 / 6, "kd_head": 50.0, "combined": 400 / 6})
    assert [res[k] for k in an.CATEGORIES] == pytest.approx([200 / 6, 200 / 6, 100 / 6, 100 / 6])
    assert sum(res[k] for k in an.CATEGORIES) == pytest.approx(100.0)
    assert res["agreement"] == pytest.approx(50.0)  # argmax equal in samples 0, 1, 5
    assert res["same_outcome"] == pytest.approx(50.0)  # both right (0, 1) or both wrong (5)
    assert res["combined_top1_given"] == pytest.approx({"both_correct": 100.0, "ce_only": 50.0, "kd_only": 100.0,
                                                        "both_wrong": 0.0})
    assert res["error_reduction"]["kd_head"] == pytest.approx({"failed": 200 / 6, "still_failed": 100 / 6})
    assert res["error_reduction"]["ce_head"] == pytest.approx({"failed": 100 / 6, "still_failed": 0.0})
    # max probabilities: 0.5761 -> bin 11 ([0.55, 0.6)), 0.9999 -> bin 19; Eq. 11: 0.9999 (x2), 0.788 (bin 15), 0.606 (x3, bin 12)
    hist = res["max_prob"]
    assert len(hist["bin_edges"]) == 21 and hist["bin_edges"][0] == 0.0 and hist["bin_edges"][-1] == 1.0
    expect = lambda bins: [bins.get(i, 0) for i in range(20)]  # noqa: E731
    assert hist["ce_head"] == expect({11: 2, 19: 4})
    assert hist["kd_head"] == expect({11: 2, 19: 4})
    assert hist["combined"] == expect({12: 3, 15: 1, 19: 2})
    mild, sure = math.e / (math.e + 2), 1 / (1 + 2 * math.exp(-10))
    assert hist["mean"]["ce_head"] == pytest.approx((2 * mild + 4 * sure) / 6, rel=1e-6)
    assert res["per_class"] == [
        {"class": "a", "num_samples": 2, "ce_head": 100.0, "kd_head": 50.0, "combined": 50.0},
        {"class": "b", "num_samples": 2, "ce_head": 50.0, "kd_head": 100.0, "combined": 100.0},
        {"class": "c", "num_samples": 2, "ce_head": 50.0, "kd_head": 0.0, "combined": 50.0},
    ]
    # beta tempers kd_head: at beta 0.5 its mild rows become softmax([2, 0, 0]) = 0.787 (bin 15)
    assert an.head_agreement(ce, kd, labels, 0.5, 0.5)["max_prob"]["kd_head"] == expect({15: 2, 19: 4})
    with pytest.raises(ConfigError, match="leave unlabeled samples"):
        an.head_agreement(ce, kd, torch.tensor([0, 1, 2, 0, 1, -1]), 0.5, 1.0)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.2, 2.0)])
def test_head_agreement_on_run_matches_direct_argmaxes(outputs, tiny_dataset, alpha, beta):
    _, ce, kd, labels, _ = outputs
    res = an.head_agreement(ce, kd, labels, alpha, beta, classnames=tiny_dataset.classnames)
    n = len(labels)
    p = ev.combine_heads(ce, kd, alpha, beta)
    ce_ok = (ce.argmax(1) == labels).numpy()
    kd_ok = (kd.argmax(1) == labels).numpy()
    ok = (p.argmax(1) == labels).numpy()
    pct = lambda m: 100.0 * m.sum() / n  # noqa: E731
    assert res["top1"] == pytest.approx({"ce_head": ev.topk_accuracy(ce, labels)[1], "kd_head": ev.topk_accuracy(kd, labels)[1],
                                         "combined": ev.topk_accuracy(p, labels)[1]})
    assert res["both_correct"] == pytest.approx(pct(ce_ok & kd_ok))
    assert res["ce_only"] == pytest.approx(pct(ce_ok & ~kd_ok))
    assert res["kd_only"] == pytest.approx(pct(~ce_ok & kd_ok))
    assert res["both_wrong"] == pytest.approx(pct(~ce_ok & ~kd_ok))
    assert sum(res[k] for k in an.CATEGORIES) == pytest.approx(100.0)
    assert res["agreement"] == pytest.approx(pct((ce.argmax(1) == kd.argmax(1)).numpy()))
    assert res["error_reduction"]["kd_head"]["still_failed"] == pytest.approx(pct(ce_ok & ~kd_ok & ~ok))
    assert res["error_reduction"]["ce_head"]["still_failed"] == pytest.approx(pct(~ce_ok & kd_ok & ~ok))
    edges = np.linspace(0, 1, 21)
    for name, probs in (("ce_head", torch.softmax(ce, 1)), ("kd_head", torch.softmax(kd / beta, 1)), ("combined", p)):
        assert res["max_prob"][name] == np.histogram(probs.max(1).values.numpy(), bins=edges)[0].tolist()
    for k, row in enumerate(res["per_class"]):
        at = (labels == k).numpy()
        assert row["class"] == tiny_dataset.classnames[k] and row["num_samples"] == at.sum() == 8
        assert (row["ce_head"], row["kd_head"], row["combined"]) == pytest.approx(
            (100 * ce_ok[at].mean(), 100 * kd_ok[at].mean(), 100 * ok[at].mean()))
    # the run: ce_head learned the labels, kd_head the wrong teacher
    assert res["ce_only"] > 90.0 and res["error_reduction"]["kd_head"]["failed"] == res["ce_only"]


# ---------------------------------------------------------------------------------- spectra (Fig. 13)


def _check_spectrum(res: dict, z: np.ndarray) -> None:
    ref = np.linalg.eigvalsh(np.cov(z.astype(np.float64), rowvar=False))[::-1]
    eig = np.array(res["eigenvalues"])
    assert eig.dtype == np.float64 and eig.shape == (z.shape[1],) and np.all(np.diff(eig) <= 0)
    np.testing.assert_allclose(eig, ref, rtol=1e-9, atol=1e-9 * ref.max())
    frac = np.clip(ref, 0, None) / np.clip(ref, 0, None).sum()
    np.testing.assert_allclose(res["explained_variance"], frac, rtol=1e-9, atol=1e-12)
    nz = frac[frac > 0]
    assert res["effective_rank"] == pytest.approx(np.exp(-(nz * np.log(nz)).sum()), rel=1e-9)
    for level in (90, 99):
        k = next(i + 1 for i in range(len(frac)) if frac[: i + 1].sum() >= level / 100 - 1e-12)
        assert res[f"components_{level}"] == k


def test_feature_spectrum_matches_numpy(outputs):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1, 0.01]) + 7.0  # (N, D), shifted
    res = an.feature_spectrum(torch.from_numpy(z).float(), chunk=33)  # chunks do not divide N
    _check_spectrum(res, torch.from_numpy(z).float().numpy())
    assert res["num_samples"] == 200 and res["dim"] == 6 and res["components_90"] == 2
    _check_spectrum(an.feature_spectrum(outputs[4]), outputs[4].numpy())  # the run's z: N=24 < D=128


def test_feature_spectrum_hand_values():
    square = an.feature_spectrum(np.array([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))  # cov = 2/3 I
    assert square["eigenvalues"] == pytest.approx([2 / 3, 2 / 3])
    assert square["effective_rank"] == pytest.approx(2.0) and square["components_90"] == square["components_99"] == 2
    line = an.feature_spectrum(np.outer(np.arange(5.0), [1.0, 2.0]))  # on a line: variance 2.5 * 5
    assert line["eigenvalues"] == pytest.approx([12.5, 0.0], abs=1e-12)
    assert line["effective_rank"] == pytest.approx(1.0) and line["components_99"] == 1
    flat = an.feature_spectrum(np.ones((4, 3)))
    assert flat["effective_rank"] == 0.0 and flat["total_variance"] == 0.0
    with pytest.raises(ConfigError, match="N >= 2"):
        an.feature_spectrum(np.ones((1, 3)))


def _top_eig(m: torch.Tensor) -> torch.Tensor:
    eig = torch.linalg.eigvals(m)
    return eig[eig.abs().argmax()]


def test_head_spectra_match_eigvals_of_class_products(outputs):
    student = copy.deepcopy(outputs[0])
    w_ce, w_kd = student.ce_head.weight.detach().double(), student.kd_head.weight.detach().double()  # (C, D), C < D
    res = an.head_spectra(student)
    assert res["ce_head"] == pytest.approx(_top_eig(w_ce @ w_ce.T).real.item(), rel=1e-9)
    assert res["kd_head"] == pytest.approx(_top_eig(w_kd @ w_kd.T).real.item(), rel=1e-9)
    assert res["ce_kd"] == pytest.approx(_top_eig(w_ce @ w_kd.T).real.item(), rel=1e-9)
    assert (res["ce_head_input"], res["kd_head_input"]) == ("z", "z")
    # aligned kd_heads of VLM students: the matrix acting on n(z), 1/zeta included
    torch.manual_seed(0)
    for head, w_eff in ((CosineHead(128, 3, zeta=0.05), lambda h: torch.nn.functional.normalize(h.weight.double(), dim=-1) / 0.05),
                        (NormalizedLinearHead(128, 3, zeta=0.05), lambda h: h.weight.double() / 0.05)):
        student.kd_head = head
        w = w_eff(head).detach()  # (C, D)
        res = an.head_spectra(student)
        assert res["kd_head"] == pytest.approx(_top_eig(w @ w.T).real.item(), rel=1e-5)
        assert res["ce_kd"] == pytest.approx(_top_eig(w_ce @ w.T).real.item(), rel=1e-5)
        assert res["kd_head_input"] == "n(z)"
        z = torch.randn(4, 128)
        bias = head.bias.detach().double() / 0.05 if isinstance(head, NormalizedLinearHead) else 0.0
        torch.testing.assert_close(torch.nn.functional.normalize(z.double(), dim=-1) @ w.T + bias, head(z).detach().double(),
                                   rtol=1e-5, atol=1e-5)  # it is the map to the logits


# ---------------------------------------------------------------------------------- probe, features


def _blobs(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    centres = 6.0 * np.eye(3, 16)  # (C, D): three well-separated classes
    y = np.repeat(np.arange(3), per_class)
    z = centres[y] + rng.normal(size=(len(y), 16))
    return (1000.0 * z + 50.0).astype(np.float32), y  # far from standardised: the probe standardises


def test_linear_probe_separable_and_deterministic():
    rng = np.random.default_rng(0)
    (train_z, train_y), (test_z, test_y) = _blobs(rng, 30), _blobs(rng, 20)
    res = an.linear_probe(train_z, train_y, test_z, test_y)  # the defaults analyze uses
    assert (res["top1"], res["top5"], res["train_top1"]) == (100.0, 100.0, 100.0)
    assert res["final_loss"] < 0.05 and (res["num_train"], res["num_test"], res["num_classes"], res["dim"]) == (90, 60, 3, 16)
    assert (res["epochs"], res["steps"]) == (1000, 1000)  # one batch per epoch: raised to min_steps
    assert an.linear_probe(train_z, train_y, test_z, test_y) == res
    # a test set with its labels rotated is the same features, now all wrong
    assert an.linear_probe(train_z, train_y, test_z, (test_y + 1) % 3)["top1"] == 0.0
    short = an.linear_probe(train_z, train_y, test_z, test_y, epochs=3, batch_size=16, min_steps=0)
    assert (short["epochs"], short["steps"]) == (3, 18)
    with pytest.raises(ConfigError, match="leave unlabeled"):
        an.linear_probe(train_z, np.r_[train_y[:-1], -1], test_z, test_y)


def test_export_features_equals_collected_z(trained_run, tiny_dataset, outputs, tmp_path):
    z, labels = outputs[4], outputs[3]
    info = an.export_features(trained_run, tiny_dataset.root, tmp_path / "feats" / "F.npy", device="cpu", workers=0)
    features = np.load(tmp_path / "feats" / "F.npy")
    assert features.dtype == np.float32 and features.shape == (24, 128)
    np.testing.assert_array_equal(features, z.numpy())
    stored_labels = np.load(tmp_path / "feats" / "F.labels.npy")
    assert stored_labels.dtype == np.int64
    np.testing.assert_array_equal(stored_labels, labels.numpy())
    np.testing.assert_array_equal(stored_labels, tiny_dataset.labels)
    meta = json.loads((tmp_path / "feats" / "F.json").read_text())
    assert meta == info and meta["keys"] == tiny_dataset.keys and meta["shape"] == [24, 128]
    assert (meta["fingerprint"], meta["classnames"], meta["run"]) == (tiny_dataset.fingerprint, tiny_dataset.classnames, str(trained_run))
    assert sorted(p.name for p in (tmp_path / "feats").iterdir()) == ["F.json", "F.labels.npy", "F.npy"]  # no temp files left
    with pytest.raises(ConfigError, match="ending in .npy"):
        an.export_features(trained_run, tiny_dataset.root, tmp_path / "F.txt")


# ---------------------------------------------------------------------------------- the analysis folder


def test_analyze_writes_every_file_with_the_functions_numbers(trained_run, tiny_dataset, train_dataset, outputs, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    student, ce, kd, labels, z = outputs
    res = an.analyze(run, tiny_dataset.root, probe_train=train_dataset.root, tsne=True, device="cpu", workers=0)
    out = run / "analysis" / "dataset"
    assert res["out_dir"] == str(out)
    assert res["files"] == ["heads.json", "heads.png", "spectrum.json", "spectrum.png", "probe.json", "tsne.png"]
    for name in res["files"]:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    heads = json.loads((out / "heads.json").read_text())
    expected = an.head_agreement(ce, kd, labels, 0.5, 0.5, classnames=tiny_dataset.classnames)
    assert {k: heads[k] for k in expected} == json.loads(json.dumps(expected))
    assert (heads["alpha_beta_source"], heads["data_fingerprint"]) == ("model.pt", tiny_dataset.fingerprint)
    spectrum = json.loads((out / "spectrum.json").read_text())
    assert spectrum["eigenvalues"] == an.feature_spectrum(z)["eigenvalues"]
    assert spectrum["head_spectra"] == an.head_spectra(student)
    probe = json.loads((out / "probe.json").read_text())
    _, _, train_labels, train_z = ev.collect_logits(student, train_dataset, workers=0, features=True)
    direct = an.linear_probe(train_z, train_labels, z, labels, num_classes=3)
    assert {k: probe[k] for k in direct} == direct and probe["probe_train_fingerprint"] == train_dataset.fingerprint
    assert res["probe"]["top1"] == direct["top1"] and res["top1"] == expected["top1"]
    assert res["effective_rank"] == spectrum["effective_rank"]
    text = an.format_summary(res)
    assert f"combined {expected['top1']['combined']:.2f}" in text and f"top-1 {direct['top1']:.2f}" in text
    # another folder, no probe, no t-SNE
    again = an.analyze(run, tiny_dataset, out_dir=tmp_path / "elsewhere", device="cpu", workers=0)
    assert again["files"] == ["heads.json", "heads.png", "spectrum.json", "spectrum.png"] and again["probe"] is None
    assert json.loads((tmp_path / "elsewhere" / "heads.json").read_text()) == heads


def _inside(inner, outer) -> bool:
    return inner.x0 >= outer.x0 - 1 and inner.x1 <= outer.x1 + 1 and inner.y0 >= outer.y0 - 1 and inner.y1 <= outer.y1 + 1


def test_plots_keep_legends_off_the_data_and_axes_to_what_exists(outputs, tiny_dataset, monkeypatch):
    """heads.png: the per-class legend lies above the 100% line (no bar reaches it), with bars and with curves;
    spectrum.png: min(N, D) components on the x axis (N = 24 < D = 128), integer ticks; tsne.png: the legend
    beside the map."""
    import matplotlib.pyplot as plt

    student, ce, kd, labels, z = outputs
    heads = an.head_agreement(ce, kd, labels, 0.5, 0.5, classnames=tiny_dataset.classnames)
    many = an.head_agreement(torch.randn(40, 40), torch.randn(40, 40), torch.arange(40), 0.5, 0.5)  # > 30 classes: curves
    for result, kind in ((heads, "bars"), (many, "curves")):
        fig = an.heads_figure(result)
        fig.canvas.draw()
        ax = fig.axes[3]
        legend = ax.get_legend().get_window_extent()
        top_of_data = ax.transData.transform((0, 100))[1]  # display y of 100%
        assert legend.y0 > top_of_data and _inside(legend, ax.get_window_extent()), kind
        assert ax.get_ylim()[1] == an.PER_CLASS_YMAX and max(ax.get_yticks()) == 100
        assert (len(ax.patches) == 3 * 3) == (kind == "bars")
        plt.close(fig)
    spectrum = an.feature_spectrum(z)
    assert (spectrum["num_samples"], spectrum["dim"]) == (24, 128)
    fig = an.spectrum_figure(spectrum, heads=an.head_spectra(student))
    ax = fig.axes[0]
    assert ax.get_xlim() == (0.5, 24.5) and len(ax.get_lines()[0].get_xdata()) <= 24
    assert all(float(t).is_integer() for t in ax.get_xticks())
    plt.close(fig)
    captured = {}
    monkeypatch.setattr(an, "_save_figure", lambda fig, path: captured.setdefault("fig", fig))
    an.plot_tsne(z, labels, "unused.png", classnames=tiny_dataset.classnames)
    fig = captured["fig"]
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= box.x1 and legend.x1 <= fig.bbox.x1  # right of the map, inside the figure
    plt.close(fig)


def test_analyze_refusals_are_one_line(trained_run, tiny_dataset, tmp_path, monkeypatch):
    other = data.prepare(make_image_folder(tmp_path / "img4", num_classes=4, per_class=2), tmp_path / "four")
    two = make_image_folder(tmp_path / "img2", num_classes=3, per_class=2)
    shutil.rmtree(two / "class_2")
    subset = data.prepare(two, tmp_path / "two")  # class_0, class_1 of the run's three: analysed on those
    unknown = r"1 class name\(s\) the model does not know \(first: 'class_3'"  # the one rule of evaluate.open_labeled
    for kwargs, pattern in (
        (dict(data=other.root), unknown),
        (dict(data=tiny_dataset.root, probe_train=other.root), unknown),
        (dict(data=tiny_dataset.root, probe_train=subset.root), "other classes than --data"),
        (dict(data=tiny_dataset.root, probe_train=tiny_dataset.root), "same data"),
    ):
        with pytest.raises(ConfigError, match=pattern) as err:
            an.analyze(trained_run, device="cpu", workers=0, **kwargs)
        assert "\n" not in str(err.value)
    assert "four" in str(pytest.raises(ConfigError, an.analyze, trained_run, other.root, device="cpu").value)

    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "alpha_beta.json").write_text(json.dumps({"alpha": 0.5, "beta": 0.5, "search_on_fingerprint": tiny_dataset.fingerprint}))
    with pytest.raises(ConfigError, match="searched on"):
        an.analyze(run, tiny_dataset.root, device="cpu", workers=0)

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # scikit-learn not installed
    with pytest.raises(ConfigError, match="pip install scikit-learn"):
        an.analyze(trained_run, tiny_dataset.root, tsne=True, device="cpu", workers=0)
    assert not (trained_run / "analysis").exists()


def test_a_subset_of_the_run_classes_is_analysed_on_its_classes(trained_run, tmp_path):
    """The one rule of scored data (evaluate.open_labeled): data holding some of the run's classes is analysed
    with both heads restricted to those classes, as evaluate scores it."""
    src = make_image_folder(tmp_path / "img", num_classes=3, per_class=3, seed=2)
    shutil.rmtree(src / "class_0")
    subset = data.prepare(src, tmp_path / "two")  # class_1, class_2 of the run's class_0..2
    res = an.analyze(trained_run, subset.root, out_dir=tmp_path / "out", device="cpu", workers=0)
    student, meta = load_student(trained_run / "model.pt")
    ce, kd, labels = ev.collect_logits(student, subset, batch_size=256, device="cpu", workers=0)
    expected = an.head_agreement(ce[:, 1:], kd[:, 1:], labels, meta["alpha"], meta["beta"], classnames=["class_1", "class_2"])
    heads = json.loads((tmp_path / "out" / "heads.json").read_text())
    assert res["top1"] == expected["top1"] == heads["top1"] and heads["num_classes"] == 2
    assert [r["class"] for r in heads["per_class"]] == ["class_1", "class_2"]


# ---------------------------------------------------------------------------------- Figs. 9, 16-19


def test_pick_examples_hand_example():
    """Rows where one head is right and the other wrong, the clearest first (restated by hand on 5 samples)."""
    ce = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    kd = torch.tensor([[0.0, 4.0, 0.0], [0.0, 4.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 0, 2])
    # row 0: ce right, kd wrong; row 3: ce right, kd wrong (less clear); row 2: kd right, ce wrong; rows 1, 4: both right
    picked = an.pick_examples(ce, kd, labels, alpha=0.5, beta=1.0, n=5)
    assert [e["row"] for e in picked["ce_only"]] == [0, 3] and [e["row"] for e in picked["kd_only"]] == [2]
    p_ce0 = math.exp(4) / (math.exp(4) + 2)
    p_kd0 = 1 / (math.exp(4) + 2)
    first = picked["ce_only"][0]
    assert first["label"] == 0 and first["p_true"]["ce_head"] == pytest.approx(p_ce0, abs=1e-6)
    assert first["p_true"]["kd_head"] == pytest.approx(p_kd0, abs=1e-6)
    assert first["p_true"]["combined"] == pytest.approx(0.5 * p_ce0 + 0.5 * p_kd0, abs=1e-6)
    assert [c for c, _ in first["top"]["ce_head"]] == [0, 1, 2] and first["top"]["kd_head"][0][0] == 1
    assert [e["row"] for e in an.pick_examples(ce, kd, labels, 0.5, 1.0, n=1)["ce_only"]] == [0]
    with pytest.raises(ConfigError, match="--examples"):
        an.pick_examples(ce, kd, labels, 0.5, 1.0, n=0)


def test_analyze_examples_writes_the_cases_and_their_images(trained_run, tiny_dataset, outputs, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    _, ce, kd, labels, _ = outputs
    res = an.analyze(run, tiny_dataset, out_dir=tmp_path / "a", device="cpu", workers=0, examples=2)
    assert res["files"][-2:] == ["examples.json", "examples.png"]
    assert (tmp_path / "a" / "examples.png").read_bytes()[:8] == PNG_SIGNATURE
    record = json.loads((tmp_path / "a" / "examples.json").read_text())
    # independent restatement: ce right and kd wrong, ranked by p_ce(true) - p_kd(true) (beta 0.5, the run's)
    p_ce, p_kd = torch.softmax(ce, -1), torch.softmax(kd / 0.5, -1)
    rows = [i for i in range(len(labels)) if p_ce[i].argmax() == labels[i] and p_kd[i].argmax() != labels[i]]
    rows.sort(key=lambda i: (-float(p_ce[i, labels[i]] - p_kd[i, labels[i]]), i))
    assert [e["row"] for e in record["ce_only"]] == rows[:2] and len(rows) >= 2
    assert res["examples"] == {"ce_only": 2, "kd_only": len(record["kd_only"])}
    assert all(e["key"] == tiny_dataset.keys[e["row"]] for e in record["ce_only"])
    # the grid's images are the dataset's own pixels
    from dho.data.reader import iter_shard

    images = an.example_images(tiny_dataset, rows[:2])
    direct = {s.index: s.image for shard in range(len(tiny_dataset.shards)) for s in iter_shard(tiny_dataset, shard)}
    assert all(np.array_equal(np.asarray(images[r]), np.asarray(direct[r])) for r in rows[:2])
    assert "examples: 2 where only ce_head is right" in an.format_summary(res)
