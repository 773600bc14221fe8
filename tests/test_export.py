"""dho.export: the TorchScript model predicts like `dho predict`, in a process that never imports dho."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_student import make_trained_run
from typer.testing import CliRunner

from dho import evaluate as ev
from dho.cli import app
from dho.export import export
from dho.students import build_student, save_student

TINY_CLIP = Path(__file__).parent / "assets" / "tiny-clip.json"
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated")

# Plain torch + torchvision + PIL: load the model, read its metadata, preprocess with the usual
# torchvision Resize + CenterCrop (what the metadata describes), print top-k.
STANDALONE = r"""
import json, sys
import torch
from PIL import Image
from torchvision import transforms as T

extra = {"dho.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
meta = json.loads(extra["dho.json"])
pre = meta["preprocess"]
assert pre["resize_mode"] == "shortest"
preprocess = T.Compose([T.Resize(pre["image_size"], interpolation=T.InterpolationMode(pre["interpolation"])),
                        T.CenterCrop(pre["image_size"]), T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
xs = [preprocess(Image.open(path).convert("RGB")) for path in sys.argv[2:]]
with torch.no_grad():
    probs = model(torch.stack(xs))
top = probs.topk(min(5, probs.shape[1]), dim=-1)
out = [[[meta["classnames"][c], v] for c, v in zip(i, p)] for i, p in zip(top.indices.tolist(), top.values.tolist())]
print(json.dumps({"predictions": out, "alpha": meta["alpha"], "beta": meta["beta"],
                  "dho_imported": any(m == "dho" or m.startswith("dho.") for m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
    return make_trained_run(tmp_path_factory.mktemp("export_runs") / "run", tiny_dataset)


def test_exported_model_predicts_like_predict_without_dho(trained_run, tiny_dataset, tmp_path):
    out = export(trained_run, tmp_path / "deploy" / "model.ts")
    assert out.is_file() and not (tmp_path / "deploy" / "model.ts.tmp").exists()
    src = tiny_dataset.root.parent / "images"
    images = [src / "class_0" / "img_001.jpg", src / "class_1" / "img_004.jpg", src / "class_2" / "img_007.jpg"]
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(out), *map(str, images)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["dho_imported"] is False
    assert (got["alpha"], got["beta"]) == (0.5, 0.5)
    expected = ev.predict(trained_run, images, topk=5)
    for (path, top), theirs in zip(expected, got["predictions"]):
        assert [name for name, _ in theirs] == [name for name, _ in top]
        assert [p for _, p in theirs] == pytest.approx([p for _, p in top], abs=1e-5)


def test_export_bakes_in_searched_alpha_beta_and_metadata(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes((trained_run / "model.pt").read_bytes())
    (run / "alpha_beta.json").write_text(json.dumps({"alpha": 0.8, "beta": 2.0}))
    path = export(run, tmp_path / "m.ts")
    extra = {"dho.json": ""}
    model = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["dho.json"])
    assert (meta["alpha"], meta["beta"], meta["alpha_beta_source"]) == (0.8, 2.0, "alpha_beta.json")
    assert meta["classnames"] == ["class_0", "class_1", "class_2"] and meta["student"] == "resnet-tiny"
    assert set(meta["preprocess"]) >= {"image_size", "interpolation", "mean", "std"}
    student, _ = ev.load_run(run)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = student(x)
        torch.testing.assert_close(model(x), ev.combine_heads(logits["ce_logits"], logits["kd_logits"], 0.8, 2.0))


def test_export_tiny_clip_student(tmp_path):
    torch.manual_seed(0)
    student = build_student(str(TINY_CLIP), 3, init_heads_from_text=False)
    save_student(tmp_path / "run" / "model.pt", student, ["a", "b", "c"], alpha=0.3, beta=1.0)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "clip.ts")])
    assert result.exit_code == 0, result.output
    model = torch.jit.load(str(tmp_path / "clip.ts"))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        logits = student.eval()(x)
        torch.testing.assert_close(model(x), ev.combine_heads(logits["ce_logits"], logits["kd_logits"], 0.3, 1.0),
                                   atol=1e-5, rtol=1e-4)
