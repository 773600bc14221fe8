"""Cheap checks come before the slow start: what needs only manifests, cache attributes and the config fails
before torch is imported, with close-match suggestions for unknown names; and the messages that used to mislead
(a dataset given as a run, an undecodable image to predict)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401

from dho import data
from dho.cache_layout import read_attrs
from dho.distill.precheck import check_batch_split
from dho.errors import CacheError, ConfigError, did_you_mean
from dho.names import CNN_STUDENTS, check_student, check_teacher_model, open_clip_models


@pytest.fixture(scope="module")
def two_splits(tmp_path_factory, tiny_dataset, tiny_teacher_ckpt):
    """A labeled split and a validation split of tiny_dataset (same classes, same shard sizes, other samples) with
    their teacher caches: the validation cache looks like the labeled one in all but the content fingerprint."""
    from dho.precompute import precompute

    root = tmp_path_factory.mktemp("cheap")
    labeled, val = data.split(tiny_dataset, root / "labeled", shots=2, seed=0, val_per_class=2, val_out=root / "val", shard_size=3)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=1, device="cpu", workers=0)
    for ds in (labeled, val):
        precompute(ds.root, root / f"{ds.root.name}.zarr", **teacher)
    return root


MISTAKES = [  # (name, dho arguments after the common ones, the error line's pattern)
    ("student", ["distill", "--student", "resnet81"], r"unknown student 'resnet81' \(did you mean 'resnet18'\?\)"),
    ("clip-student", ["distill", "--student", "vit-b-16"], r"unknown student 'vit-b-16' \(did you mean 'ViT-B-16'\?\)"),
    ("foreign-cache", ["distill", "--labeled-cache", "{root}/val.zarr"],
     r"cache .*val\.zarr does not belong to dataset .*labeled: dataset fingerprint \w{12}\.\.\. differs from the cache's"),
    ("batch", ["distill", "--batch-size", "9", "--workers", "2"],
     r"--batch-size 9 must be divisible by world_size x workers x accum_steps = 1 x 2 x 1; .* multiple of 2"),
    ("method", ["distill", "--method", "dhoo"], r"--method must be one of dho, ce, .*; got 'dhoo' \(did you mean 'dho'\?\)"),
    ("no-dataset", ["distill", "--labeled", "{root}/nothing"], r"nothing: no manifest\.json found"),
    ("option", ["distill", "--learning-rate", "0.1"], r"No such option: --learning-rate \(did you mean --lr\?\)"),
    ("teacher", ["precompute-teacher", "{root}/val", "--out", "{root}/new.zarr", "--model", "ViT-B-61"],
     r"unknown open_clip model 'ViT-B-61' \(did you mean 'ViT-B-16'\?\)"),
    ("teacher-views", ["precompute-teacher", "{root}/val", "--out", "{root}/new.zarr", "--views", "0"],
     r"--views must be an integer >= 1; got 0"),
]


def test_mistakes_fail_before_torch_is_imported(two_splits):
    """Each mistake ends in its one error line (exit 2) in a process that never imported torch (nor zarr, nor
    open_clip): the check ran before the slow start, whatever the machine's speed."""
    root = two_splits
    common = ["--labeled", f"{root}/labeled", "--labeled-cache", f"{root}/labeled.zarr", "--student", "resnet-tiny",
              "--out", f"{root}/run", "--device", "cpu", "--workers", "0", "--batch-size", "6"]
    cases = [(name, [args[0], *(common if args[0] == "distill" else []), *(a.format(root=root) for a in args[1:])], pattern)
             for name, args, pattern in MISTAKES]  # the mistake last: of an option given twice, click takes the last
    code = f"""
import contextlib, io, json, sys
from dho.cli import main
out = {{}}
for name, args in {json.dumps([(n, a) for n, a, _ in cases])}:
    err = io.StringIO()
    sys.argv = ["dho", *args]
    with contextlib.redirect_stderr(err):
        try:
            main()
            status = 0
        except SystemExit as e:
            status = e.code
    out[name] = [status, err.getvalue()]
out["heavy"] = [m for m in ("torch", "zarr", "open_clip") if m in sys.modules]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("heavy") == []
    import re

    for name, _, pattern in cases:
        status, err = result[name]
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert re.search(pattern, lines[0]), (name, lines[0])
    assert not (root / "run").exists() and not (root / "new.zarr").exists()


def test_the_labeled_cache_is_read_from_its_attributes_alone(two_splits):
    """read_attrs reads zarr.json's attributes as zarr writes them; the precheck refuses a cache of another dataset
    with the same message as the full open, and passes the right one."""
    from dho.cache import TeacherCache
    from dho.distill.precheck import check_cache_belongs

    root = two_splits
    labeled, val = data.Dataset.open(root / "labeled"), data.Dataset.open(root / "val")
    assert read_attrs(root / "labeled.zarr") == TeacherCache.open(root / "labeled.zarr").attrs
    assert read_attrs(root / "nothing") is None
    assert check_cache_belongs(str(root / "labeled.zarr"), labeled)["dataset_fingerprint"] == labeled.fingerprint
    with pytest.raises(CacheError, match="does not belong to dataset .*: dataset fingerprint") as cheap:
        check_cache_belongs(str(root / "val.zarr"), labeled)
    with pytest.raises(CacheError, match="does not belong to dataset") as full:
        TeacherCache.open(root / "val.zarr", dataset=labeled)
    assert str(cheap.value).split(":")[0] == str(full.value).split(":")[0]
    with pytest.raises(CacheError, match=r"another class list \(class 0 is 'class_0' in the cache but 'x' in the dataset\)"):
        check_cache_belongs(str(root / "val.zarr"), type("D", (), {"root": "d", "classnames": ["x", "y", "z"],
                                                                   "num_samples": 6, "shards": [], "fingerprint": ""})())
    assert val.num_samples == labeled.num_samples  # the same sizes: only the fingerprint tells them apart


def test_suggestions_for_unknown_names():
    assert did_you_mean("resnet81", CNN_STUDENTS) == " (did you mean 'resnet18'?)"
    assert did_you_mean("mobilenetv2", CNN_STUDENTS) == " (did you mean 'mobilenet_v2'?)"
    assert did_you_mean("xyz", CNN_STUDENTS) == ""
    models = open_clip_models()
    assert "ViT-B-16" in models and "ViT-H-14-378-quickgelu" in models
    with pytest.raises(ConfigError, match=r"unknown student 'clip:ViT-B-61' \(did you mean 'ViT-B-16'\?\)"):
        check_student("clip:ViT-B-61")
    with pytest.raises(ConfigError, match=r"--student nope\.json: open_clip model config not found"):
        check_student("nope.json")
    for fine in ("resnet18", "timm/resnet18.a1_in1k", "ViT-B-16", "clip:ViT-B-16", str(TINY_CLIP_CONFIG)):
        check_student(fine)
    with pytest.raises(ConfigError, match=r"\(did you mean 'ViT-H-14-378-quickgelu'\?\)"):
        check_teacher_model("ViT-H-14-378-quickgelo", None)
    check_teacher_model("anything", "local-dir:/models/teacher")  # the folder names the model
    assert check_batch_split(12, 2, 3, 2) == 6
    with pytest.raises(ConfigError, match="multiple of 12"):
        check_batch_split(18, 2, 3, 2)


def test_a_dataset_or_cache_given_as_a_run_says_so(two_splits, tmp_path):
    from dho.run_dir import RunDir

    with pytest.raises(ConfigError, match=r"labeled is a dataset \(it holds manifest\.json\), not a run: pass the run folder"):
        RunDir(two_splits / "labeled").load_student()
    with pytest.raises(ConfigError, match=r"labeled\.zarr is a teacher cache \(it holds zarr\.json\), not a run"):
        RunDir(two_splits / "labeled.zarr").load_student()
    with pytest.raises(ConfigError, match=r"holds no dho run \(no model\.pt, config\.json or checkpoints/\)"):
        RunDir(tmp_path).load_student()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"the run is not finished; run `dho distill \.\.\. --out .* --resume`"):
        RunDir(tmp_path).load_student()


def test_predict_names_an_undecodable_file(tmp_path):
    from dho.evaluate import load_image

    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not a jpeg at all" * 10)
    with pytest.raises(data.DatasetError) as err:
        load_image(bad)
    message = str(err.value)
    assert message == (f"{bad}: cannot decode the jpg image (not an image format PIL can read); the file is damaged or "
                       "not an image: leave it out, or convert it (e.g. to .png)")
    assert "BytesIO" not in message and "--skip-bad" not in message
    with pytest.raises(data.DatasetError, match=r"k: cannot decode the png image \(not an image format PIL can read\); "
                                                r"replace the file or leave it out \(prepare --skip-bad\)"):
        data.decode_image(b"junk", "png", "k")  # a dataset's sample: the dataset's fix
