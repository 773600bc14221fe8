"""The Python API (`dho.load_run`, `dho.load_export`), the README's snippet of it, the Hugging Face-style folder of
`dho export --format hf` (read back by dho and by plain safetensors) and the mode of every file dho writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder
from PIL import Image
from typer.testing import CliRunner

import dho
from dho import data
from dho import evaluate as ev
from dho.atomic import write_atomic
from dho.cache import TeacherCache
from dho.cli import app
from dho.distill import DistillConfig, distill
from dho.errors import ConfigError, DatasetError
from dho.precompute import precompute

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher_ckpt):  # noqa: F811
    """A finished dho run of resnet-tiny on 3 classes (1 epoch, --val), its caches, and an alpha/beta search on val."""
    root = tmp_path_factory.mktemp("api")
    src = make_image_folder(root / "images", num_classes=3, per_class=6)
    full = data.prepare(src, root / "full", shard_size=6)
    labeled, _ = data.split(full, root / "labeled", shots=2, seed=0, val_per_class=1, val_out=root / "val", shard_size=3)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0, batch_size=16)
    precompute(full.root, root / "full.zarr", **teacher)
    precompute(labeled.root, root / "labeled.zarr", **teacher)
    cfg = DistillConfig(labeled=str(root / "labeled"), labeled_cache=str(root / "labeled.zarr"), unlabeled=str(root / "full"),
                        unlabeled_cache=str(root / "full.zarr"), student="resnet-tiny", out=str(root / "run"), epochs=1,
                        batch_size=6, lr=3e-3, workers=0, device="cpu", seed=0, val=str(root / "val"))
    distill(cfg)
    ev.evaluate(root / "run", root / "full", search_on=root / "val", device="cpu", workers=0)  # -> RUN/alpha_beta.json
    images = [src / "class_0" / "img_001.jpg", src / "class_1" / "img_002.jpg", src / "class_2" / "img_003.jpg"]
    return {"root": root, "run": root / "run", "images": images, "src": src}


def _predict_probs(run: Path, files, heads: bool = False) -> dict[str, torch.Tensor]:
    """`dho predict`'s probabilities (N, C) in the model's class order (per head with `heads`)."""
    _, meta = ev.load_run(run)
    names = meta["classnames"]
    results = ev.predict(run, files, topk=len(names), device="cpu", heads=heads)
    per = [top if heads else {"combined": top} for _, top in results]
    return {h: torch.tensor([[dict(p[h])[n] for n in names] for p in per]) for h in per[0]}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# import dho stays light
# --------------------------------------------------------------------------------------------


def test_import_dho_is_light_and_the_api_loads_on_first_use():
    code = ("import json, sys, dho\n"
            "try:\n    dho.no_such_thing\n    missing = False\nexcept AttributeError:\n    missing = True\n"
            "print(json.dumps(['torch' in sys.modules, 'load_run' in dir(dho), dho.__version__, missing]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == [False, True, dho.__version__, True]
    # reached as attributes of the package (PEP 562), loaded from dho.api on first use
    assert dho.load_run.__module__ == dho.load_export.__module__ == dho.Run.__module__ == "dho.api"


# --------------------------------------------------------------------------------------------
# dho.load_run
# --------------------------------------------------------------------------------------------


def test_load_run_predicts_what_dho_predict_prints(world):
    run = dho.load_run(world["run"], device="cpu")
    stored = json.loads((world["run"] / "alpha_beta.json").read_text())
    _, meta = ev.load_run(world["run"])
    assert (run.alpha, run.beta, run.alpha_beta_source) == (stored["alpha"], stored["beta"], "alpha_beta.json")
    assert run.classnames == meta["classnames"] == data.Dataset.open(world["root"] / "full").classnames
    assert run.config == json.loads((world["run"] / "config.json").read_text()) and run.config["student"] == "resnet-tiny"
    assert run.device == torch.device("cpu") and run.to("cpu") is run
    assert run.preprocessing == meta["preprocess"] and run.preprocess.image_size == 32
    assert "resnet-tiny" in repr(run) and "3 classes" in repr(run)

    expected = _predict_probs(world["run"], world["images"], heads=True)
    preds = run.predict(world["images"], heads=True)
    assert torch.equal(preds.probs, expected["combined"])  # the same floats
    assert torch.equal(preds.ce_head, expected["ce_head"]) and torch.equal(preds.kd_head, expected["kd_head"])
    assert preds.sources == world["images"] and len(preds) == 3
    assert preds.labels == [run.classnames[i] for i in expected["combined"].argmax(-1).tolist()]
    assert preds.top(2) == [[(n, p) for n, p in top[:2]] for _, top in ev.predict(world["run"], world["images"], device="cpu")]
    assert preds.top(1, head="kd_head")[0][0][1] == float(expected["kd_head"][0].max())

    pils = [Image.open(f) for f in world["images"]]
    as_pixels = [np.asarray(im.convert("RGB")) for im in pils]  # (H, W, 3) uint8
    assert torch.equal(run.predict(pils).probs, expected["combined"])
    assert torch.equal(run.predict(as_pixels).probs, expected["combined"])
    # CPU kernels round differently in batches of other sizes: each input against `dho predict` of the same images
    one, folder = world["images"][1], world["src"] / "class_2"
    assert torch.equal(run.predict(str(one)).probs, _predict_probs(world["run"], [one])["combined"])  # one path
    assert torch.equal(run.predict(folder).probs, _predict_probs(world["run"], [folder])["combined"])  # a folder
    chw = torch.from_numpy(as_pixels[0].copy()).permute(2, 0, 1)  # (3, H, W) uint8
    assert torch.equal(run.predict(chw).probs, _predict_probs(world["run"], world["images"][:1])["combined"])
    pair = _predict_probs(world["run"], world["images"][:1] * 2)["combined"]
    assert torch.equal(run.predict(torch.stack([chw, chw])).probs, pair)  # uint8 (B, 3, H, W)
    assert torch.equal(run.predict(world["images"] * 22, batch_size=64).probs[60:],  # 66 images: batches of 64 + 2
                       _predict_probs(world["run"], world["images"] * 22)["combined"][60:])
    views = torch.stack([run.preprocess(im) for im in pils])  # (3, 3, 32, 32)
    assert views.dtype == torch.float32 and torch.equal(views[0], meta["preprocess"].eval_view(pils[0].convert("RGB")))
    assert torch.equal(run.predict(views).probs, expected["combined"]) and run.predict(views).sources == [None] * 3
    with torch.no_grad():
        assert torch.equal(run.model(views), expected["combined"])
        out = run.student(views)
    assert set(out) == {"ce_logits", "kd_logits", "z"} and run.model.ce_head is run.student.ce_head

    run.alpha, run.beta = 1.0, 2.0  # settable: the model and predict follow
    assert run.alpha_beta_source == "explicit" and "alpha=1, beta=2" in repr(run.model)
    assert torch.equal(run.predict(views).probs, expected["ce_head"])  # alpha = 1: ce_head alone
    with pytest.raises(ConfigError, match="alpha must be"):
        run.alpha = 1.5
    with pytest.raises(ConfigError, match=r"images\[1\]: cannot read an image from a int"):
        run.predict([world["images"][0], 3])
    with pytest.raises(ConfigError, match=r"a float tensor is a preprocessed view; pass the whole batch"):
        run.predict([views[0]])
    with pytest.raises(ConfigError, match=r"a tensor image must be uint8 \(3, H, W\)"):
        run.predict(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(DatasetError, match=r"image .*nothing\.jpg not found"):
        run.predict("nothing.jpg")


def test_load_run_refuses_what_is_not_a_run(world, tmp_path):
    with pytest.raises(ConfigError, match=r"run directory .*nowhere not found"):
        dho.load_run(tmp_path / "nowhere")
    (tmp_path / "m.pt2").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"m\.pt2 is a file; load_run takes a run folder, .* use dho\.load_export"):
        dho.load_run(tmp_path / "m.pt2")
    with pytest.raises(ConfigError, match=r"is a folder but not a `dho export --format hf` folder .*use dho\.load_run"):
        dho.load_export(world["run"])


def test_readme_snippet_prints_what_dho_predict_prints(world, tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("\n## Python API\n"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'dho.load_run("runs/r18")' in snippet
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r18").symlink_to(world["run"])
    shutil.copyfile(world["images"][0], tmp_path / "cat.jpg")
    Image.open(world["images"][1]).save(tmp_path / "dog.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md:Python API", "exec"), scope)
    printed = capsys.readouterr().out
    result = CliRunner().invoke(app, ["predict", "runs/r18", "cat.jpg", "dog.png", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert printed == result.stdout and printed.count("  0.") == 6  # 2 images x 3 classes
    assert scope["labels"] == [scope["preds"].labels[0]]
    torch.testing.assert_close(scope["probs"], scope["preds"].probs[:1], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# dho export --format hf
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(world):
    out = world["root"] / "hf" / "r18"
    result = CliRunner().invoke(app, ["export", str(world["run"]), "--format", "hf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}/ (hf): config.json, model.safetensors, README.md" in result.stdout
    return out


def test_hf_folder_holds_what_rebuilds_and_describes_the_student(world, hf_folder):
    assert sorted(p.name for p in hf_folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p.name for p in hf_folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((hf_folder / "config.json").read_text())
    _, meta = ev.load_run(world["run"])
    stored = json.loads((world["run"] / "alpha_beta.json").read_text())
    assert config["format"] == "dho-hf" and config["library_name"] == "dho" and config["build_args"] == meta["build_args"]
    assert config["classnames"] == meta["classnames"] and config["id2label"] == {"0": "class_0", "1": "class_1", "2": "class_2"}
    assert (config["alpha"], config["beta"], config["alpha_beta_source"]) == (stored["alpha"], stored["beta"], "alpha_beta.json")
    assert config["preprocess"] == meta["preprocess"].to_dict()
    assert config["pretrained_cfg"] == {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                                        "std": [0.229, 0.224, 0.225], "crop_pct": 1.0, "crop_mode": "center"}
    cache = TeacherCache.open(world["root"] / "labeled.zarr").attrs
    assert {k: config["teacher"][k] for k in cache["teacher"]} == cache["teacher"] and config["teacher"]["model"] == "tiny-clip"
    assert config["teacher"]["pretrained"] == "tiny-teacher.pt" and len(config["teacher"]["weights_sha256"]) == 64
    assert config["teacher"]["num_views"] == 2
    fingerprints = {role: data.Dataset.open(world["root"] / name).fingerprint
                    for role, name in (("labeled", "labeled"), ("unlabeled", "full"), ("val", "val"))}
    assert {role: d["fingerprint"] for role, d in config["data"].items()} == fingerprints
    assert config["data"]["unlabeled"]["num_samples"] == 18 and config["data"]["val"]["cache"] is None
    final = [r for r in map(json.loads, (world["run"] / "metrics.jsonl").read_text().splitlines()) if r.get("final")][-1]
    assert config["validation"]["final"] == {"data": str(world["root"] / "val"), **{k: v for k, v in final.items() if k != "final"}}
    assert config["validation"]["alpha_beta_search"]["best_top1"] == stored["best_top1"]
    assert config["distill_config"] == json.loads((world["run"] / "config.json").read_text())
    r = world["root"]
    assert config["commands"]["distill"] == (
        f"dho distill --labeled {r}/labeled --labeled-cache {r}/labeled.zarr --student resnet-tiny --out {r}/run "
        f"--unlabeled {r}/full --unlabeled-cache {r}/full.zarr --epochs 1 --batch-size 6 --lr 0.003 --device cpu "
        f"--workers 0 --val {r}/val")
    assert config["commands"]["export"] == f"dho export {r}/run --format hf --out {hf_folder}"

    card = (hf_folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"library_name": "dho", "license": "unknown", "pipeline_tag": "image-classification",
                     "tags": ["dho", "image-classification", "knowledge-distillation", "dual-head-optimization", "torchvision"]}
    assert cache["teacher"]["weights_sha256"] in card and fingerprints["unlabeled"] in card
    assert config["commands"]["distill"] in card and config["commands"]["export"] in card
    assert f"combined {final['val_combined_top1']:.2f}" in card and f"top-1 {stored['best_top1']:.2f}" in card


def test_hf_folder_loads_with_plain_safetensors_and_with_dho_like_predict(world, hf_folder):
    from safetensors.torch import load_file

    from dho.students import rebuild_student

    config = json.loads((hf_folder / "config.json").read_text())
    student = rebuild_student(config["build_args"], data.Preprocessing.from_dict(config["preprocess"])).eval()
    student.load_state_dict(load_file(str(hf_folder / "model.safetensors")), strict=True)
    original, _ = ev.load_run(world["run"])
    views = torch.stack([student.preprocess.eval_view(ev.load_image(f)) for f in world["images"]])  # (3, 3, 32, 32)
    with torch.no_grad():
        got, want = student(views), original(views)
    assert torch.equal(got["ce_logits"], want["ce_logits"]) and torch.equal(got["kd_logits"], want["kd_logits"])
    expected = _predict_probs(world["run"], world["images"])["combined"]
    assert torch.equal(ev.combine_heads(got["ce_logits"], got["kd_logits"], config["alpha"], config["beta"]), expected)

    for loaded in (dho.load_run(hf_folder, device="cpu"), dho.load_export(hf_folder)):
        assert isinstance(loaded, dho.Run) and loaded.classnames == config["classnames"]
        assert (loaded.alpha, loaded.beta) == (config["alpha"], config["beta"]) and loaded.config == config["distill_config"]
        assert torch.equal(loaded.predict(world["images"]).probs, expected)


def test_hf_export_replaces_its_own_folder_and_refuses_others(world, hf_folder, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(hf_folder, again)
    (again / "README.md").write_text("an older card")
    runner = CliRunner()

    def export(out: Path):
        return runner.invoke(app, ["export", str(world["run"]), "--format", "hf", "--out", str(out)])

    assert export(again).exit_code == 0 and (again / "README.md").read_text() == (hf_folder / "README.md").read_text().replace(
        str(hf_folder), str(again))
    (tmp_path / "empty").mkdir()
    assert export(tmp_path / "empty").exit_code == 0 and (tmp_path / "empty" / "model.safetensors").is_file()

    def refused(out: Path, match: str):
        with pytest.raises(ConfigError, match=match) as err:
            from dho.export import export as export_run

            export_run(world["run"], out, format="hf")
        assert "\n" not in str(err.value)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    refused(theirs, r"--out .*theirs is a folder with files but not a dho hf export .*; it is left alone")
    (again / "notes.txt").write_text("mine too")
    refused(again, r"--out .*again holds files a dho hf export does not write \(notes\.txt\); move them away first")
    (tmp_path / "file").write_text("a file")
    refused(tmp_path / "file", r"--out .*file is a file; --format hf writes a folder")
    assert (theirs / "notes.txt").read_text() == "mine" and (again / "notes.txt").read_text() == "mine too"
    assert (tmp_path / "file").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "empty", "file", "theirs"]  # no temporary folders


def test_load_export_of_the_weights_beside_an_export_is_the_run(world, tmp_path):
    """OUT.safetensors of `dho export` (written by the same code as the folder's weights) rebuilds the student."""
    from dho.export import weights_path
    from dho.hub import write_weights

    student, meta = ev.load_run(world["run"])
    alpha, beta, _ = ev.run_alpha_beta(world["run"], meta)
    path = write_atomic(weights_path(tmp_path / "m.pt2"), lambda part: write_weights(student, part, meta, alpha, beta))
    loaded = dho.load_export(path)
    assert isinstance(loaded, dho.Run) and (loaded.alpha, loaded.beta) == (alpha, beta) and loaded.config is None
    assert torch.equal(loaded.predict(world["images"]).probs, _predict_probs(world["run"], world["images"])["combined"])
    (tmp_path / "other.safetensors").write_bytes((tmp_path / "m.pt2.safetensors").read_bytes()[:50])
    with pytest.raises(ConfigError, match=r"cannot read .*other\.safetensors as safetensors"):
        dho.load_export(tmp_path / "other.safetensors")


# --------------------------------------------------------------------------------------------
# file modes
# --------------------------------------------------------------------------------------------


def test_weights_and_other_outputs_are_readable_like_any_file(world, hf_folder, tmp_path):
    """safetensors creates 0600 files; dho gives every output 0666 & ~umask, as open() does (execute bits kept)."""
    from safetensors.torch import save_file

    default = 0o666 & ~_umask()
    for path in [*hf_folder.iterdir(), world["run"] / "model.pt", world["run"] / "config.json", world["run"] / "alpha_beta.json"]:
        assert os.stat(path).st_mode & 0o777 == default, path
    old = os.umask(0o027)
    try:
        out = write_atomic(tmp_path / "w.safetensors", lambda part: save_file({"a": torch.zeros(2)}, str(part)))
        assert os.stat(out).st_mode & 0o777 == 0o640
        script = write_atomic(tmp_path / "run.sh", lambda part: (part.write_text("#!/bin/sh\n"), part.chmod(0o755)))
        assert os.stat(script).st_mode & 0o777 == 0o750  # the writer's execute bits, within the umask
        private = tmp_path / "plain.safetensors"
        save_file({"a": torch.zeros(2)}, str(private))
        assert os.stat(private).st_mode & 0o777 == 0o600  # what safetensors does by itself
    finally:
        os.umask(old)


def test_hf_folder_of_an_open_clip_student_rebuilds_it(tmp_path):
    """A VLM student (open_clip tower, the reference's aligned kd_head): config.json's build_args carry the model
    config, so the folder rebuilds offline and predicts as `dho predict` does."""
    from dho.export import export
    from dho.students import build_student, save_student

    torch.manual_seed(0)
    student = build_student(str(TINY_CLIP_CONFIG), 3, init_heads_from_text=False)
    save_student(tmp_path / "run" / "model.pt", student, ["a", "b", "c"], alpha=0.3, beta=1.0)
    images = []
    for i, size in enumerate([(45, 61), (90, 33)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append(tmp_path / f"{i}.png")
    out = export(tmp_path / "run", tmp_path / "hf", format="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["build_args"]["kind"] == "open_clip" and config["build_args"]["clip_config"]["embed_dim"] == 32
    assert config["pretrained_cfg"]["interpolation"] == "bicubic" and config["teacher"] is None and config["data"] == {}
    card = (out / "README.md").read_text()
    assert "- open_clip\n" in card and "Not recorded: the run's teacher cache was not found" in card
    assert "None recorded (the run had no --val" in card and "not recorded in the run's config.json" in card
    run = dho.load_run(out, device="cpu")
    assert type(run.student.kd_head).__name__ == "NormalizedLinearHead" and (run.alpha, run.beta) == (0.3, 1.0)
    assert torch.equal(run.predict(images).probs, _predict_probs(tmp_path / "run", images)["combined"])
