"""Evaluation sets distributed against another dataset's class list (ImageNet-V2, -Sketch, -R, -A).

V2-style: numeric class folders name class indices (numbers, never string order). R-style: a subset of
the classes, folders named by class id; evaluation scores the subset's classes only, for the student
and for the teacher (whose cache of the subset dataset prompts only those classes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dho import data
from dho import evaluate as ev
from dho.cache import TeacherCache
from dho.errors import ConfigError, DatasetError
from dho.precompute import precompute
from dho.students import load_student
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder
from helpers_student import make_trained_run

DHO = [sys.executable, "-m", "dho.cli"]


def _one_image_per_folder(root: Path, folders: list[str]) -> Path:
    src = make_image_folder(root / "gen", num_classes=len(folders), per_class=2)
    for i, name in enumerate(folders):
        shutil.move(src / f"class_{i}", root / "v2" / name)
    return root / "v2"


def test_v2_numeric_folders_are_class_indices_not_string_order(tmp_path):
    names = [f"class {i}" for i in range(12)]
    ref = tmp_path / "classnames.txt"
    ref.write_text("".join(n + "\n" for n in names))
    src = _one_image_per_folder(tmp_path, [str(i) for i in range(12)])  # string order: 0 1 10 11 2 ...
    ds = data.prepare(src, tmp_path / "v2ds", shard_size=5, classes_of=ref, class_folders="index")
    assert ds.classnames == names  # the reference's list: the model's classes, in its order
    for s in ds.shards:
        for key, label in zip(s.keys, s.labels):
            assert ds.classnames[label] == f"class {key.split('/')[0]}"  # folder "10" -> class 10
    assert ds.manifest["class_subset_of"]["indices"] == list(range(12))

    # part of the classes, folders still numbers: classes in reference order
    part = tmp_path / "part"
    for f in ("10", "2", "0"):
        shutil.copytree(src / f, part / f)
    sub = data.prepare(part, tmp_path / "partds", classes_of=ref, class_folders="index")
    assert sub.classnames == ["class 0", "class 2", "class 10"]
    assert sub.manifest["class_subset_of"] == {"reference": str(ref.resolve()), "num_classes": 12, "indices": [0, 2, 10]}
    assert sorted({(k.split("/")[0], int(lab)) for k, lab in zip(sub.keys, sub.labels)}) == [("0", 0), ("10", 2), ("2", 1)]

    with pytest.raises(DatasetError, match=r"class folder '12' is not a class index 0\.\.11"):
        (part / "12").mkdir()
        shutil.copy(next((src / "0").iterdir()), part / "12" / "x.jpg")
        data.prepare(part, tmp_path / "bad", classes_of=ref, class_folders="index")


def test_class_file_with_ids_and_name_matching(tmp_path):
    ref = tmp_path / "ids.txt"
    ref.write_text("n001\tgolden retriever\nn002\ttabby cat\nn003\tbarn owl\n")
    assert data.read_class_list(ref) == (["golden retriever", "tabby cat", "barn owl"], ["n001", "n002", "n003"])
    # Sketch/R/A: folders are ids; folders named by class names (with '_' for spaces) work too
    assert data.map_class_folders(["n003", "n001"], ref) == [2, 0]
    assert data.map_class_folders(["tabby_cat", "barn owl"], ref) == [1, 2]
    with pytest.raises(DatasetError, match=r"class folder 'n009' is neither a class id nor a class name of"):
        data.map_class_folders(["n009"], ref)
    with pytest.raises(DatasetError, match="both name class 1"):
        data.map_class_folders(["n002", "tabby_cat"], ref)
    with pytest.raises(ConfigError, match="--class-folders 'wnid'"):
        data.map_class_folders(["n001"], ref, "wnid")
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("n001\tdog\ncat\n")
    with pytest.raises(DatasetError, match="line 2 lacks a tab"):
        data.read_class_file(mixed)


@pytest.fixture(scope="module")
def subset_world(tmp_path_factory, tiny_dataset, tiny_teacher_ckpt):
    """The tiny 3-class dataset's run and teacher cache; an R-style copy of 2 of its 3 classes (the very
    same images: make_image_folder is deterministic), folders named by class id, and its teacher cache."""
    root = tmp_path_factory.mktemp("ood")
    run = make_trained_run(root / "run", tiny_dataset)
    ref = root / "imagenet-classes.txt"
    ref.write_text("".join(f"n00{i}\t{name}\n" for i, name in enumerate(tiny_dataset.classnames)))
    gen = make_image_folder(root / "gen", num_classes=3, per_class=8)
    (root / "r").mkdir()
    shutil.move(gen / "class_2", root / "r" / "n002")
    shutil.move(gen / "class_0", root / "r" / "n000")
    subset = data.prepare(root / "r", root / "r-ds", shard_size=5, classes_of=ref)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=1, center_view=True,
                   device="cpu", workers=0, batch_size=16)
    precompute(tiny_dataset.root, root / "full.zarr", **teacher)
    precompute(subset.root, root / "r.zarr", **teacher)
    return dict(run=run, ref=ref, subset=subset, full_cache=root / "full.zarr", subset_cache=root / "r.zarr", root=root)


def test_restrict_hand_example():
    ce = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 4.0]])  # model classes 0, 1, 2
    kd = torch.tensor([[0.0, 9.0, 1.0], [2.0, 9.0, 0.0]])
    columns = torch.tensor([2, 0])  # the dataset's classes: model class 2, then model class 0
    labels = torch.tensor([0, 1])  # sample 1 is model class 2, sample 2 model class 0
    r_ce, r_kd = ev.restrict(ce, kd, columns)
    assert r_ce.tolist() == [[2.0, 1.0], [4.0, 3.0]] and r_kd.tolist() == [[1.0, 0.0], [0.0, 2.0]]
    # unrestricted, both heads would say model class 1 for sample 1 (wrong); restricted: ce 1 of 2, kd 2 of 2
    assert ev.topk_accuracy(r_ce, labels)[1] == 50.0 and ev.topk_accuracy(r_kd, labels)[1] == 100.0
    assert ev.restrict(ce, kd, None) == (ce, kd)


def test_evaluate_scores_a_subset_on_its_classes(subset_world, tiny_dataset):
    run, subset = subset_world["run"], subset_world["subset"]
    assert subset.classnames == ["class_0", "class_2"]  # reference names, reference order
    assert subset.manifest["class_ids"] == ["n000", "n002"]
    assert subset.manifest["class_subset_of"]["indices"] == [0, 2]
    columns = ev.class_columns(subset, tiny_dataset.classnames)
    assert columns.tolist() == [0, 2]

    student, _ = load_student(run / "model.pt")
    ce, kd, labels = ev.collect_logits(student, subset, workers=0)  # (16, 3) each: the model's 3 classes
    res = ev.evaluate(run, subset.root, workers=0, device="cpu")
    assert res["class_subset"] and res["num_classes"] == 2 and res["model_classes"] == 3 and res["num_samples"] == 16
    # by hand: each head's argmax among columns 0 and 2 against labels 0 (class_0) / 1 (class_2)
    hand_ce = 100.0 * float((ce[:, [0, 2]].argmax(1) == labels).float().mean())
    hand_kd = 100.0 * float((kd[:, [0, 2]].argmax(1) == labels).float().mean())
    p = 0.5 * torch.softmax(ce[:, [0, 2]], 1) + 0.5 * torch.softmax(kd[:, [0, 2]] / 0.5, 1)
    hand_comb = 100.0 * float((p.argmax(1) == labels).float().mean())
    assert (res["ce_head"]["top1"], res["kd_head"]["top1"], res["combined"]["top1"]) == pytest.approx((hand_ce, hand_kd, hand_comb))
    assert res["ce_head"]["top5"] == 100.0  # two classes
    # kd_head learned class y+1: for class_0 images that is class_1, outside the subset, so the restriction
    # decides; unrestricted it would be 0 % on class_0 images
    assert int((kd.argmax(1) == 1).sum()) > 0

    # the same images in the full dataset: the restricted scores are the full logits' columns
    full = ev.collect_logits(student, tiny_dataset, workers=0)
    by_file = {f.split("/", 1)[1] + f.split("/")[0][-1]: i for i, f in enumerate(f for s in tiny_dataset.shards for f in s.files)}
    for j, f in enumerate(f for s in subset.shards for f in s.files):
        i = by_file[f.split("/", 1)[1] + f.split("/")[0][-1]]
        torch.testing.assert_close(ce[j], full[0][i], atol=1e-5, rtol=1e-5)


def test_teacher_cache_of_a_subset_is_the_restricted_teacher(subset_world, tiny_dataset):
    """Prompting only the subset's classes is restricting the teacher's 3-way scores to them: probabilities
    are the full ones renormalised over the subset (same images, same center view)."""
    full = TeacherCache.open(subset_world["full_cache"])
    sub = TeacherCache.open(subset_world["subset_cache"])
    subset = subset_world["subset"]
    p_full = full.probs(full.num_views - 1, 0, full.num_samples)  # (24, 3)
    p_sub = sub.probs(sub.num_views - 1, 0, sub.num_samples)  # (16, 2)
    files_full = [f for s in tiny_dataset.shards for f in s.files]
    rows = [files_full.index(f.replace("n000/", "class_0/").replace("n002/", "class_2/")) for s in subset.shards for f in s.files]
    restricted = p_full[rows][:, [0, 2]]
    np.testing.assert_allclose(p_sub, restricted / restricted.sum(1, keepdims=True), atol=1e-3)  # stored as float16
    assert (p_sub.argmax(1) == restricted.argmax(1)).all()


def test_cli_prepare_classes_of_and_evaluate_subset(subset_world, tmp_path):
    out = subprocess.run([*DHO, "prepare", str(subset_world["root"] / "r"), "--out", str(tmp_path / "r"),
                          "--classes-of", str(subset_world["ref"])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "2 classes of the 3 of" in out.stdout
    res = subprocess.run([*DHO, "evaluate", str(subset_world["run"]), "--data", str(tmp_path / "r"), "--workers", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "2 classes of the model's 3, scored on these only" in res.stdout
    # index: a names file that is a subset of the reference is recorded; a foreign name is refused
    names = tmp_path / "names.txt"
    names.write_text("class_2\nclass_0\n")
    shards = sorted(str(p) for p in (tmp_path / "r").glob("*.tar"))
    ok = subprocess.run([*DHO, "index", *shards, "--classnames", str(names), "--out", str(tmp_path / "idx"),
                         "--classes-of", str(subset_world["ref"])], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["class_subset_of"]["indices"] == [2, 0]
    names.write_text("class_2\nzebra\n")
    bad = subprocess.run([*DHO, "index", *shards, "--classnames", str(names), "--out", str(tmp_path / "idx2"),
                          "--classes-of", str(subset_world["ref"])], capture_output=True, text=True)
    assert bad.returncode == 2 and "'zebra'" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_evaluate_refuses_classes_the_model_does_not_know(subset_world, tmp_path):
    src = make_image_folder(tmp_path / "imgs", num_classes=2, per_class=2)
    other = data.prepare(src, tmp_path / "other")  # class_0, class_1 ... are known; rename to foreign names
    foreign = tmp_path / "foreign"
    shutil.copytree(src, foreign)
    (foreign / "class_1").rename(foreign / "okapi")
    ds = data.prepare(foreign, tmp_path / "foreign-ds")
    with pytest.raises(ConfigError, match=r"1 class name\(s\) the model does not know \(first: 'okapi'"):
        ev.evaluate(subset_world["run"], ds, workers=0, device="cpu")
    assert ev.class_columns(other, ["class_0", "class_1", "class_2"]).tolist() == [0, 1]
