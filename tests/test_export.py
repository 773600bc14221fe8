"""dho.export: every format predicts like `dho predict` from raw uint8 images of any size, in a process that never
imports dho; the weights and metadata beside it describe the run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_student import make_trained_run
from PIL import Image
from typer.testing import CliRunner

from dho import evaluate as ev
from dho import export as export_lib
from dho.data import file_sha256
from dho.cli import app
from dho.errors import ConfigError
from dho.export import FORMATS, export, metadata_path, weights_path
from dho.students import build_student, save_student

TINY_CLIP = Path(__file__).parent / "assets" / "tiny-clip.json"
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated")

# The exported preprocessing resizes with torch's antialiased interpolate, PIL (`dho predict`) with its own
# fixed-point code: a pixel may land one uint8 level apart (and other CPUs' kernels round other pixels). Measured
# on these images: <= 2e-5 (all formats); over 36 images of 16-500 px, bilinear/bicubic x shortest/squash/longest:
# <= 7e-4.
PROB_ATOL = 5e-3

# Plain torch + numpy + PIL (+ onnxruntime): load the model and its metadata, feed each image as a batch of one,
# and two images of one size as a batch of two; print probabilities and whether dho got imported.
STANDALONE = r"""
import json, sys
import numpy as np
import torch
from PIL import Image

fmt, path, *files = sys.argv[1:]
images = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1) for f in files]  # (3, H, W)
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dho.json"])
    run = lambda x: session.run(None, {"images": x.numpy()})[0]
else:
    extra = {"dho.json": ""}
    model = torch.export.load(path, extra_files=extra).module() if fmt == "pt2" else torch.jit.load(path, _extra_files=extra)
    meta = json.loads(extra["dho.json"])
    run = lambda x: model(x).numpy()
with torch.no_grad():
    probs = [run(x[None])[0].tolist() for x in images]  # (C,) per image
    pair = torch.stack([images[0], images[0].flip(-1)])  # (2, 3, H, W)
    batch = {"batch": run(pair).tolist(), "flipped": run(pair[1:])[0].tolist()}
    if fmt == "torchscript":
        batch["unbatched"] = model(images[0]).tolist()  # (3, H, W) -> (1, C)
print(json.dumps({"probs": probs, **batch, "meta": meta,
                  "dho_imported": any(m == "dho" or m.startswith("dho.") for m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
    return make_trained_run(tmp_path_factory.mktemp("export_runs") / "run", tiny_dataset)


@pytest.fixture(scope="module")
def searched_run(trained_run, tmp_path_factory):
    """The trained run with an alpha/beta search result: alpha 0.7 lets ce_head (which learnt the labels) win
    clearly over kd_head (which learnt the shifted classes), so top-1 is well defined (at 0.5 the heads tie)."""
    run = tmp_path_factory.mktemp("export_runs") / "searched"
    run.mkdir()
    (run / "model.pt").write_bytes((trained_run / "model.pt").read_bytes())
    (run / "alpha_beta.json").write_text(json.dumps({"alpha": 0.7, "beta": 2.0}))
    return run


@pytest.fixture(scope="module")
def images(tiny_dataset, tmp_path_factory):
    """Source files of the dataset (sizes 24-40 x 20-36) and two non-square PNGs made from them, wide and tall,
    larger than the student's 32 px; none of the export example's size (39 x 69) or aspect ratio."""
    src = tiny_dataset.root.parent / "images"
    files = [src / "class_0" / "img_001.jpg", src / "class_1" / "img_004.jpg", src / "class_2" / "img_007.jpg"]
    out = tmp_path_factory.mktemp("export_images")
    made = [("wide.png", src / "class_1" / "img_002.jpg", (141, 52)), ("tall.png", src / "class_2" / "img_003.jpg", (45, 118))]
    for name, path, size in made:
        with Image.open(path) as im:
            im.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out / name)
        files.append(out / name)
    assert len({Image.open(f).size for f in files}) == len(files)
    return files


@pytest.fixture(scope="module")
def exported(searched_run, tmp_path_factory):
    """fmt -> the searched run exported in that format (once per module)."""
    out, done = tmp_path_factory.mktemp("exported"), {}

    def get(fmt: str) -> Path:
        if fmt not in done:
            done[fmt] = export(searched_run, out / f"model-{fmt}.{export_lib.SUFFIXES[fmt]}", format=fmt)
        return done[fmt]

    return get


def _predict_probs(run: Path, files: list[Path]) -> tuple[torch.Tensor, list[str]]:
    """`dho predict`'s probabilities (N, C) in the model's class order, and the class names."""
    _, meta = ev.load_run(run)
    classnames = meta["classnames"]
    results = ev.predict(run, files, topk=len(classnames))
    return torch.tensor([[dict(top)[name] for name in classnames] for _, top in results]), classnames


def _uint8(path: Path) -> torch.Tensor:
    import numpy as np

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W)


def _assert_like_predict(got: torch.Tensor, expected: torch.Tensor, top1: bool = True) -> None:
    torch.testing.assert_close(got, expected, atol=PROB_ATOL, rtol=0)
    if top1:
        top2 = expected.topk(2, dim=-1).values  # (N, 2)
        assert bool(((top2[:, 0] - top2[:, 1]) > 2 * PROB_ATOL).all()), "a test image is too close to a tie to compare top-1"
        assert got.argmax(dim=-1).tolist() == expected.argmax(dim=-1).tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_predicts_like_predict_without_dho(fmt, exported, searched_run, images):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = exported(fmt)
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left
    proc = subprocess.run([sys.executable, "-c", STANDALONE, fmt, str(out), *map(str, images)],
                          capture_output=True, text=True, timeout=120, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["dho_imported"] is False
    expected, classnames = _predict_probs(searched_run, images)
    assert got["meta"]["classnames"] == classnames and (got["meta"]["alpha"], got["meta"]["beta"]) == (0.7, 2.0)
    _assert_like_predict(torch.tensor(got["probs"]), expected)
    # batch of two: the image and its mirror image, each as its own batch of one
    torch.testing.assert_close(torch.tensor(got["batch"]), torch.tensor([got["probs"][0], got["flipped"]]), atol=1e-5, rtol=0)
    if fmt == "torchscript":
        torch.testing.assert_close(torch.tensor(got["unbatched"]), torch.tensor([got["probs"][0]]), atol=1e-6, rtol=0)


def test_onnx_names_its_dynamic_axes(exported):
    """The ONNX graph's input is (batch, 3, height, width) by name, as a reader of the graph (netron, onnxruntime,
    TensorRT profiles) sees it, and its output (batch, classes)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    path = exported("onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,), (probs,) = session.get_inputs(), session.get_outputs()
    assert (images.name, images.shape) == ("images", ["batch", 3, "height", "width"])
    assert probs.name == "probs" and probs.shape[0] == "batch" and isinstance(probs.shape[1], int)
    if importlib.util.find_spec("onnx") is not None:  # the graph itself: dim_param, not a value
        import onnx

        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_writes_safetensors_weights_and_metadata(fmt, exported, searched_run):
    from safetensors import safe_open
    from safetensors.torch import load_file

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = exported(fmt)
    student, meta = ev.load_run(searched_run)
    weights = load_file(str(weights_path(out)))
    state = student.state_dict()
    assert set(weights) == set(state)
    for key, value in state.items():
        assert torch.equal(weights[key], value), key
    with safe_open(str(weights_path(out)), "pt") as f:
        tags = f.metadata()
    assert json.loads(tags["classnames"]) == meta["classnames"]
    assert (float(tags["alpha"]), float(tags["beta"])) == (0.7, 2.0)
    assert json.loads(tags["preprocess"]) == meta["preprocess"].to_dict()

    info = json.loads(metadata_path(out).read_text())
    assert metadata_path(out).name == out.name + ".json"
    assert info["classnames"] == meta["classnames"] and (info["alpha"], info["beta"]) == (0.7, 2.0)
    assert info["export_format"] == fmt and info["student"] == "resnet-tiny" and info["alpha_beta_source"] == "alpha_beta.json"
    assert info["preprocess"] == meta["preprocess"].to_dict()
    assert set(info["preprocess"]) >= {"image_size", "interpolation", "mean", "std", "resize_mode"}
    assert info["files"] == {"model": out.name, "weights": weights_path(out).name}
    assert info["sha256"] == {"model": file_sha256(out), "weights": file_sha256(weights_path(out))}


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_export_predicts_like_predict_and_its_files_are_readable(fmt, exported, searched_run, images):
    """dho.load_export of each format: the exported graph within PROB_ATOL of `dho predict`, its weights file the
    rebuilt student with `dho predict`'s very floats; the three files 0666 & ~umask (safetensors alone makes 0600)."""
    import os

    import dho

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = exported(fmt)
    expected, classnames = _predict_probs(searched_run, images)
    model = dho.load_export(out)
    assert isinstance(model, dho.ExportedModel) and model.format == fmt and model.classnames == classnames
    assert (model.alpha, model.beta, model.alpha_beta_source) == (0.7, 2.0, "alpha_beta.json")
    assert model.preprocessing.image_size == 32 and model.to("cpu") is model
    preds = model.predict(images)  # each image its own batch of one
    _assert_like_predict(preds.probs, expected)
    assert preds.sources == images and preds.labels == [classnames[i] for i in expected.argmax(-1).tolist()]
    pair = torch.stack([_uint8(images[0]), _uint8(images[0]).flip(-1)])  # a uint8 batch in one call
    torch.testing.assert_close(model.predict(pair).probs[0], preds.probs[0], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=r"is an exported model: it takes uint8 images"):
        model.predict(pair.float())
    with pytest.raises(AttributeError):
        model.alpha = 0.5  # baked into the graph
    weights = dho.load_export(weights_path(out))
    assert isinstance(weights, dho.Run) and (weights.alpha, weights.beta) == (0.7, 2.0)
    assert weights.alpha_beta_source == "alpha_beta.json"
    assert torch.equal(weights.predict(images).probs, expected)
    mode = 0o666 & ~_umask()
    for path in (out, weights_path(out), metadata_path(out)):
        assert os.stat(path).st_mode & 0o777 == mode, path


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_export_without_search_bakes_in_model_pt_alpha_beta(trained_run, searched_run, images, tmp_path):
    path = export(trained_run, tmp_path / "m.ts", format="torchscript")
    extra = {"dho.json": ""}
    model = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["dho.json"])
    assert (meta["alpha"], meta["beta"], meta["alpha_beta_source"]) == (0.5, 0.5, "model.pt")
    assert json.loads(metadata_path(path).read_text())["alpha_beta_source"] == "model.pt"
    expected, _ = _predict_probs(trained_run, images)
    with torch.no_grad():
        got = torch.cat([model(_uint8(f)) for f in images])  # one (3, H, W) image at a time
    _assert_like_predict(got, expected, top1=False)  # at alpha = beta = 0.5 the two saturated heads tie
    assert not torch.allclose(expected, _predict_probs(searched_run, images)[0], atol=0.1)


@pytest.mark.parametrize(("interpolation", "resize_mode"), [("bicubic", "squash"), ("bilinear", "longest")])
def test_export_resize_modes_match_predict(interpolation, resize_mode, trained_run, images, tmp_path):
    student, meta = ev.load_run(trained_run)
    student.preprocess = meta["preprocess"].replace(interpolation=interpolation, resize_mode=resize_mode)
    save_student(tmp_path / "run" / "model.pt", student, meta["classnames"], alpha=0.7, beta=2.0)
    model = torch.export.load(str(export(tmp_path / "run", tmp_path / "m.pt2"))).module()
    with torch.no_grad():
        got = torch.cat([model(_uint8(f)[None]) for f in images])
    _assert_like_predict(got, _predict_probs(tmp_path / "run", images)[0])


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise around a grey: every pixel differs from its neighbours, so a resize or crop a pixel off shows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(128 + rng.integers(-60, 61, size=(height, width, 3)), 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_preprocess_is_pils_eval_view_to_a_level(interpolation, resize_mode, images):
    """The exported preprocessing against dho.data.eval_view_uint8 (PIL), in uint8 levels. Measured with Pillow 13.0:
    bicubic identical but for 1 value in 10^4, bilinear 0.4-1% of values one level apart, none more. The bounds leave
    room for other CPUs' rounding and Pillow < 13's pass order; a resize without antialiasing is far outside."""
    import numpy as np

    from dho import data

    pre = export_lib.Preprocess(32, interpolation, resize_mode, mean=[0.0] * 3, std=[1 / 255] * 3)  # -> levels
    pictures = [Image.open(f).convert("RGB") for f in images] + [_noise_image(301, 187, 0), _noise_image(70, 233, 1)]
    diffs, controls = [], []
    for im in pictures:
        ref = data.eval_view_uint8(im, 32, interpolation, resize_mode).float()  # (3, 32, 32)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        diffs.append((pre(x[None])[0].round() - ref).abs().flatten())
        if resize_mode == "shortest":  # the usual mistake: a tensor resize without antialiasing
            from torchvision.transforms.v2 import functional as TF

            wrong = TF.center_crop(TF.resize(x, 32, TF.InterpolationMode(interpolation), antialias=False), 32).float()
            controls.append((wrong - ref).abs().flatten())
    d = torch.cat(diffs)
    assert d.mean() < 0.05 and (d > 1).float().mean() < 0.002, (d.mean(), (d > 1).float().mean(), d.max())
    if controls:
        c = torch.cat(controls)
        assert c.mean() > 1.0 and (c > 1).float().mean() > 0.1  # the check above would catch it


def test_export_tiny_clip_student(tmp_path):
    torch.manual_seed(0)
    student = build_student(str(TINY_CLIP), 3, init_heads_from_text=False)
    save_student(tmp_path / "run" / "model.pt", student, ["a", "b", "c"], alpha=0.3, beta=1.0)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "clip.pt2")])
    assert result.exit_code == 0, result.output
    images = [torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(h), dtype=torch.uint8)
              for h, w in [(45, 61), (90, 33)]]
    with torch.no_grad():
        logits = [student.eval()(student.preprocess.eval_view(Image.fromarray(x.permute(1, 2, 0).numpy()))[None]) for x in images]
        expected = torch.cat([ev.combine_heads(o["ce_logits"], o["kd_logits"], 0.3, 1.0) for o in logits])
        models = {"pt2": torch.export.load(str(tmp_path / "clip.pt2")).module(),
                  "torchscript": torch.jit.load(str(export(tmp_path / "run", tmp_path / "clip.ts", format="torchscript")))}
        if importlib.util.find_spec("onnxruntime") is not None:  # attention through ONNX
            import onnxruntime

            session = onnxruntime.InferenceSession(str(export(tmp_path / "run", tmp_path / "clip.onnx", format="onnx")))
            models["onnx"] = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        for fmt, model in models.items():
            got = torch.cat([model(x[None]) for x in images])
            torch.testing.assert_close(got, expected, atol=PROB_ATOL, rtol=0, msg=fmt)
            assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_export_errors_are_one_line_and_leave_nothing(trained_run, tmp_path, monkeypatch):
    def refused(match, **kwargs):
        with pytest.raises(ConfigError, match=match) as err:
            export(trained_run, **{"out": tmp_path / "m.pt2", **kwargs})
        assert "\n" not in str(err.value)

    refused(r"--format must be one of pt2, onnx, torchscript, hf; got 'tflite'", format="tflite")
    (tmp_path / "folder").mkdir()
    refused(r"--out .*folder is a folder; give the file to write, e\.g\. .*model\.pt2", out=tmp_path / "folder")
    refused(r"the weights go to OUT\.safetensors beside the model; give the model file, e\.g\. .*m\.onnx",
            out=tmp_path / "m.safetensors", format="onnx")
    refused(r"--out .*m\.ts names a torchscript file but the format is pt2; pass --format torchscript or --out .*m\.pt2",
            out=tmp_path / "m.ts", format="pt2")
    monkeypatch.setattr(export_lib, "ONNX_PACKAGES", (*export_lib.ONNX_PACKAGES, "dho_no_such_package"))
    refused(r"cannot export .*run as onnx: (.*, )?dho_no_such_package not installed; pip install 'dho\[onnx\]'",
            out=tmp_path / "m.onnx", format="onnx")

    student, meta = ev.load_run(trained_run)
    student.preprocess = meta["preprocess"].replace(interpolation="lanczos")
    save_student(tmp_path / "lanczos" / "model.pt", student, meta["classnames"])
    with pytest.raises(ConfigError, match=r"lanczos.*model\.pt: interpolation 'lanczos' cannot be exported"):
        export(tmp_path / "lanczos", tmp_path / "m.pt2")

    class DataDependent(torch.nn.Module):  # torch.export cannot trace a branch on a tensor's values
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, x):
            z = self.backbone(x)
            return z if bool(z.sum() > 0) else -z

    real_load_run = export_lib.load_run

    def load_run(run_dir, device="cpu", weights=None, tome_r=None):
        student, meta = real_load_run(run_dir, device, weights, tome_r)
        student.backbone = DataDependent(student.backbone)
        return student, meta

    monkeypatch.setattr(export_lib, "load_run", load_run)
    refused(r"student 'resnet-tiny' of .*run does not export as pt2 \(.*\); try --format torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "lanczos"]  # nothing written, no temporary files
    monkeypatch.setattr(export_lib, "load_run", real_load_run)
    (tmp_path / "theirs.pt2").write_bytes(b"a file dho did not write")
    refused(r"--out .*theirs\.pt2 exists and is not a dho export .*; it is left alone", out=tmp_path / "theirs.pt2")
    assert (tmp_path / "theirs.pt2").read_bytes() == b"a file dho did not write"


def test_an_export_replaces_its_own_earlier_export(trained_run, tmp_path):
    first = export(trained_run, tmp_path / "m.pt2")
    assert export(trained_run, first) == first and json.loads(metadata_path(first).read_text())["format"] == "dho-export"


def test_torchscript_refuses_channels_last_and_one_channel_images(exported):
    """pt2 and ONNX refuse other shapes by their guards; the TorchScript module says what it takes."""
    model = torch.jit.load(str(exported("torchscript")))
    for shape in ((20, 24, 3), (1, 1, 20, 24), (2, 4, 20, 24)):
        with pytest.raises(Exception, match=r"expected uint8 images \(B, 3, H, W\) or one image \(3, H, W\)"):
            model(torch.zeros(shape, dtype=torch.uint8))
    assert model(torch.zeros((3, 20, 24), dtype=torch.uint8)).shape[0] == 1


def test_two_formats_of_one_name_keep_their_own_files(tmp_path, trained_run):
    """model.pt2 and model.onnx side by side: each has its own weights and JSON; neither overwrites the other's."""
    pytest.importorskip("onnxruntime")
    a = export(trained_run, tmp_path / "m.pt2")
    b = export(trained_run, tmp_path / "m.onnx", format="onnx")
    assert weights_path(a).name == "m.pt2.safetensors" and weights_path(b).name == "m.onnx.safetensors"
    assert json.loads(metadata_path(a).read_text())["files"]["weights"] == "m.pt2.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.onnx", "m.onnx.json", "m.onnx.safetensors", "m.pt2", "m.pt2.json", "m.pt2.safetensors"]


def test_the_format_comes_from_the_suffix_of_out(trained_run, tmp_path):
    """`dho export RUN --out m.onnx` is an ONNX export without --format; a --format that contradicts the suffix, or
    a suffix that names no format without --format, is one line naming the choices (nothing written)."""
    from dho.export import SUFFIX_FORMATS, format_for

    assert {s: format_for(Path("m" + s), None) for s in SUFFIX_FORMATS} == SUFFIX_FORMATS
    assert format_for(Path("M.ONNX"), None) == "onnx" and format_for(Path("m.bin"), "pt2") == "pt2"
    assert format_for(Path("m.ts"), "torchscript") == "torchscript"
    result = CliRunner().invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "m.ts")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'm.ts'} (torchscript)" in result.output
    assert torch.jit.load(str(tmp_path / "m.ts"))(torch.zeros(1, 3, 40, 40, dtype=torch.uint8)).shape[0] == 1
    for args, message in [
        (["--out", str(tmp_path / "m.onnx"), "--format", "pt2"],
         r"--out .*m\.onnx names a onnx file but the format is pt2; pass --format onnx or --out .*m\.pt2"),
        (["--out", str(tmp_path / "model")],
         r"--out .*model: the suffix '\(none\)' names no format; name the file \.pt2 \(pt2\), \.onnx \(onnx\), \.ts "
         r"\(torchscript\), \.torchscript \(torchscript\), or pass --format pt2 \| onnx \| torchscript \| hf"),
        (["--out", str(tmp_path / "m.bin")], r"--out .*m\.bin: the suffix '\.bin' names no format"),
        (["--out", str(tmp_path / "m.pt2"), "--format", "tflite"], r"--format must be one of pt2, onnx, torchscript, hf; got 'tflite'"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            CliRunner().invoke(app, ["export", str(trained_run), *args], catch_exceptions=False)
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ts", "m.ts.json", "m.ts.safetensors"]
