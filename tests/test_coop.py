"""`dho import-coop`: the CoOp benchmark's layouts become train/val/test datasets with CoOp's class names,
label order and splits; K-shot splits and the few-shot validation split are deterministic."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import cache_schemas
from dho import data
from dho.coop import SPECS, import_coop, read_split
from dho.errors import ConfigError, DatasetError
from dho.templates import COOP_TEMPLATES, coop_templates, resolve_templates

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_smoke_coop", ROOT / "pipelines" / "fewshot" / "make_smoke_coop.py")
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)


@pytest.mark.parametrize("name", ["oxford_pets", "eurosat", "fgvc_aircraft", "stanford_cars", "imagenet"])
def test_import_keeps_coops_counts_names_and_label_order(tmp_path, name):
    smoke.make_smoke_coop(tmp_path / "coop", name, classes=3, train=5, val=3, test=4)
    parts = import_coop(name, tmp_path / "coop", tmp_path / "out", shard_size=4)
    expected_parts = ["train", "test"] if name == "imagenet" else ["train", "val", "test"]
    assert sorted(parts) == sorted(expected_parts) and not (name == "imagenet" and (tmp_path / "out" / "val").exists())
    split, classnames, images = read_split(name, tmp_path / "coop")
    assert classnames == ["smoke class 2", "smoke class 1", "smoke class 0"]  # CoOp's order, not sorted
    for part, ds in parts.items():
        assert ds.classnames == classnames
        assert ds.num_samples == len(split[part]) == 3 * {"train": 5, "val": 3, "test": 4}[part]
        by_file = {f: lab for s in ds.shards for f, lab in zip(s.files, s.labels)}
        assert by_file == {rel: label for rel, label, _ in split[part]}  # every file, with its CoOp label
        assert ds.manifest["provenance"]["dataset"] == name
    # deterministic: the same import gives byte-identical shards
    again = import_coop(name, tmp_path / "coop", tmp_path / "again", shard_size=4)
    for part in parts:
        assert [s.sha256 for s in again[part].shards] == [s.sha256 for s in parts[part].shards]


def test_kshot_and_fewshot_val_splits_are_deterministic_per_seed(tmp_path):
    smoke.make_smoke_coop(tmp_path / "coop", "oxford_pets", classes=3, train=8, val=6, test=2)
    parts = import_coop("oxford_pets", tmp_path / "coop", tmp_path / "out", shard_size=8)
    picks = {}
    for seed in (1, 2, 3):
        for k in (1, 2, 4):
            lab, _ = data.split(parts["train"], tmp_path / f"k{k}-s{seed}", shots=k, seed=seed)
            val, _ = data.split(parts["val"], tmp_path / f"v{k}-s{seed}", shots=min(k, 4), seed=seed)
            assert lab.num_samples == 3 * k and val.num_samples == 3 * min(k, 4)
            picks[(k, seed)] = sorted(lab.keys)
        again, _ = data.split(parts["train"], tmp_path / f"again-{seed}", shots=4, seed=seed)
        assert sorted(again.keys) == picks[(4, seed)]
    assert picks[(4, 1)] != picks[(4, 2)] != picks[(4, 3)]


def _coop_fewshot(items: list, num_shots: int) -> list:
    """Dassl's DatasetBase.generate_fewshot_dataset (repeat=False, its default), restated: items grouped by
    label in first-seen order (split_dataset_by_label), random.sample(K) per class, all of a smaller class."""
    tracker = collections.defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    picked = []
    for _, group in tracker.items():
        picked += random.sample(group, num_shots) if len(group) >= num_shots else group
    return picked


def test_coop_sampler_draws_coops_shots_and_val(tmp_path, capsys):
    """`--sampler coop` picks the items CoOp's OxfordPets picks for a seed (train K shots, then the min(K, 4)
    val shots from the same random stream, `--after`), though the split file lists classes interleaved and
    not sorted and the shards hold another order; one class has fewer than K and gives all of it."""
    folder = smoke.make_smoke_coop(tmp_path / "coop", "oxford_pets", classes=3, train=7, val=5, test=1)
    path = folder / "split_zhou_OxfordPets.json"
    split = json.loads(path.read_text())
    order = np.random.default_rng(5)
    split["train"] = [split["train"][i] for i in order.permutation(len(split["train"]))]
    split["train"] = [e for e in split["train"] if not (e[1] == 2 and e[0] >= "smoke_class_0/train_003")]  # 3 of class 2
    split["val"] = [split["val"][i] for i in order.permutation(len(split["val"]))]
    path.write_text(json.dumps(split))
    parts = import_coop("oxford_pets", tmp_path / "coop", tmp_path / "ds", shard_size=4)
    assert parts["train"].columns.source_index is not None  # the split file's order, kept beside the shuffled rows

    def files(ds):
        return sorted(f for s in ds.shards for f in s.files)

    differ = 0
    for shots, seed in ((1, 1), (4, 1), (4, 2), (5, 3)):
        random.seed(seed)
        train = sorted(e[0] for e in _coop_fewshot(split["train"], shots))
        val = sorted(e[0] for e in _coop_fewshot(split["val"], min(shots, 4)))
        lab, _ = data.split(parts["train"], tmp_path / f"lab-{shots}-{seed}", shots=shots, sampler="coop", seed=seed)
        fs_val, _ = data.split(parts["val"], tmp_path / f"val-{shots}-{seed}", shots=min(shots, 4), sampler="coop", seed=seed,
                               after=lab.root)
        assert files(lab) == train and files(fs_val) == val, (shots, seed)
        assert lab.manifest["provenance"]["sampler"] == "coop" and fs_val.manifest["provenance"]["after"] == str(lab.root)
        numpy_pick, _ = data.split(parts["train"], tmp_path / f"np-{shots}-{seed}", shots=min(shots, 3), seed=seed)
        differ += len(set(files(numpy_pick)) - set(train))
    assert differ > 0  # dho's own sampler draws other shots
    assert "'smoke class 0' has 3" in capsys.readouterr().err  # fewer than K: all of it, as Dassl
    # the ImageNet few-shot pool carves its validation after the labeled draw; the labeled shots stay CoOp's
    lab, val = data.split(parts["train"], tmp_path / "carve", shots=2, sampler="coop", seed=1, val_per_class=1, val_out=tmp_path / "carve-val")
    random.seed(1)
    assert files(lab) == sorted(e[0] for e in _coop_fewshot(split["train"], 2)) and not set(files(lab)) & set(files(val))
    with pytest.raises(ConfigError, match=r"drawn with --seed 1; give --seed 1"):
        data.split(parts["val"], tmp_path / "bad", shots=1, sampler="coop", seed=2, after=tmp_path / "lab-1-1")
    # a dataset imported before import-coop kept the split file's order cannot be drawn from as CoOp does
    shutil.copytree(parts["train"].root, tmp_path / "old-import")
    manifest = json.loads((tmp_path / "old-import" / "manifest.json").read_text())
    for field in ("columns", "column_checks"):
        manifest[field].pop("source_index")
    (tmp_path / "old-import" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="imported by an older dho .* re-import it with `dho import-coop ... --overwrite`"):
        data.split(tmp_path / "old-import", tmp_path / "old-lab", shots=1, sampler="coop", seed=1)


def test_imagenet_labels_are_sorted_folders_and_the_sampler_is_the_references(tmp_path):
    """CoOp's ImageNet: label = index of the folder in sorted order, named by its classnames.txt line, whatever
    the file's order; `--sampler coop` then draws what the DHO reference's ImageNet (torchvision's sorted
    listing, random.sample per class) and CoOp (on a file system listing in sorted order) draw."""
    folder = smoke.make_smoke_coop(tmp_path / "coop", "imagenet", classes=3, train=6, val=1, test=1)
    lines = (folder / "classnames.txt").read_text().splitlines()
    (folder / "classnames.txt").write_text("\n".join([lines[2], lines[0], lines[1]]) + "\n")  # not sorted
    parts = import_coop("imagenet", tmp_path / "coop", tmp_path / "ds", shard_size=4)
    assert parts["train"].classnames == ["smoke class 2", "smoke class 1", "smoke class 0"]  # folders n00000000.. sorted
    by_file = {f: lab for s in parts["train"].shards for f, lab in zip(s.files, s.labels)}
    assert all(by_file[f] == int(f.split("/")[1][1:]) for f in by_file)
    listing = [(f"train/{w}/{p.name}", label) for label, w in enumerate(sorted(os.listdir(folder / "images" / "train")))
               for p in sorted((folder / "images" / "train" / w).iterdir())]
    random.seed(1)
    expected = sorted(e[0] for e in _coop_fewshot(listing, 4))
    lab, _ = data.split(parts["train"], tmp_path / "lab", shots=4, sampler="coop", seed=1)
    assert sorted(f for s in lab.shards for f in s.files) == expected
    (folder / "classnames.txt").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DatasetError, match=r"names no class for the folders \['n00000002'\]"):
        read_split("imagenet", tmp_path / "coop")


def test_coop_templates_and_names():
    assert resolve_templates("coop:oxford_pets") == ["a photo of a {}, a type of pet."]
    assert resolve_templates("coop:EuroSAT") == ["a centered satellite photo of {}."]
    assert resolve_templates("coop:dtd") == ["{} texture."]
    assert len(coop_templates("imagenet")) == 7 and coop_templates("imagenet")[0] == "itap of a {}."
    assert len(SPECS) == 11 and set(COOP_TEMPLATES) == set(SPECS)
    with pytest.raises(ConfigError, match="unknown CoOp dataset 'mnist'"):
        resolve_templates("coop:mnist")


def test_missing_files_and_damaged_splits_are_clear_errors(tmp_path):
    folder = smoke.make_smoke_coop(tmp_path / "coop", "oxford_pets", classes=2, train=2, val=1, test=1)
    with pytest.raises(DatasetError, match=r"oxford_pets.*not found: give the ROOT"):
        import_coop("oxford_pets", tmp_path / "nowhere", tmp_path / "o1")
    victim = next((folder / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"1 file\(s\) named by the split are missing, the first: .*{victim.name}"):
        import_coop("oxford_pets", tmp_path / "coop", tmp_path / "o2")
    assert not (tmp_path / "o2" / "train").exists()
    split = json.loads((folder / "split_zhou_OxfordPets.json").read_text())
    split["test"][0][2] = "another name"
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match="label 1 is 'another name' .* but 'smoke class 0' elsewhere|label .* elsewhere"):
        read_split("oxford_pets", tmp_path / "coop")
    (folder / "split_zhou_OxfordPets.json").write_text('{"train": []}')
    with pytest.raises(DatasetError, match="no 'train' list"):
        read_split("oxford_pets", tmp_path / "coop")
    shutil.rmtree(folder)
    smoke.make_smoke_coop(tmp_path / "coop", "fgvc_aircraft", classes=2, train=1, val=1, test=1)
    (tmp_path / "coop" / "fgvc_aircraft" / "images_variant_val.txt").write_text("0000001 Concorde\n")
    with pytest.raises(DatasetError, match=r"images_variant_val.txt:1: variant 'Concorde' is not in"):
        read_split("fgvc_aircraft", tmp_path / "coop")


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory):
    """A 3-class toy set in the CoOp layout, imported, a 4-shot split and its few-shot val, caches with embeddings."""
    from fixtures_models import TINY_CLIP_CONFIG, _tiny_state_dict

    import torch

    from dho.precompute import precompute

    root = tmp_path_factory.mktemp("fewshot")
    smoke.make_smoke_coop(root / "coop", "oxford_pets", classes=3, train=10, val=4, test=6)
    parts = import_coop("oxford_pets", root / "coop", root / "ds", shard_size=6)
    data.split(parts["train"], root / "lab", shots=4, seed=1, shard_size=6)
    data.split(parts["val"], root / "val4", shots=4, seed=1, shard_size=6)
    torch.save(_tiny_state_dict(seed=1), root / "teacher.pt")
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(root / "teacher.pt"), device="cpu", workers=0,
                   templates="coop:oxford_pets", store_embeddings=True, batch_size=32)
    precompute(root / "ds" / "train", root / "pool.zarr", views=2, **teacher)
    precompute(root / "lab", root / "lab.zarr", views=4, **teacher)
    precompute(root / "val4", root / "val4.zarr", views=1, center_view=True, **teacher)
    precompute(root / "ds" / "test", root / "test.zarr", views=1, center_view=True, **teacher)
    return root


def test_tip_adapter_f_beats_the_zero_shot_teacher_and_its_cache_trains_a_student(fewshot):
    from dho import tip_adapter as tip
    from dho.cache import TeacherCache
    from dho.cache_info import summarize
    from dho.distill import DistillConfig, distill

    root = fewshot
    adapter = tip.build(root / "lab", root / "lab.zarr", root / "val4", root / "val4.zarr", epochs=5, device="cpu", log=lambda m: None)
    val = adapter["val_top1"]
    assert val["tip_adapter_f"] > val["zero_shot"] + 20 and val["tip_adapter_f"] >= val["tip_adapter_f_fixed"]
    assert adapter["keys"].shape == (12, 32) and adapter["values"].shape == (12, 3) and adapter["shots"] == 12
    assert adapter["alpha"] in tip.ALPHA_GRID and adapter["beta"] in tip.BETA_GRID
    path = tip.save(adapter, root / "tipf.pt")
    assert tip.load(path)["labeled_fingerprint"] == data.Dataset.open(root / "lab").fingerprint

    test = tip.apply(path, root / "ds" / "test", root / "test.zarr", root / "test-tipf.zarr", device="cpu", log=lambda m: None)
    zs, tipf = summarize(root / "test.zarr"), summarize(root / "test-tipf.zarr")
    assert tipf["complete"] and tipf["schema_version"] == cache_schemas.CURRENT_VERSION and tipf["teacher"]["model"] == "tip-adapter-f(tiny-clip)"
    assert "12 labeled images of lab" in tipf["teacher"]["pretrained"]
    assert tipf["agreement"] > zs["agreement"] + 0.2, (tipf["agreement"], zs["agreement"])  # on unseen test images
    assert test.verify() == []
    # the teacher caches of DHO-F: pool and labeled set, then a student trains from them unchanged
    tip.apply(path, root / "ds" / "train", root / "pool.zarr", root / "pool-tipf.zarr", device="cpu", log=lambda m: None)
    tip.apply(path, root / "lab", root / "lab.zarr", root / "lab-tipf.zarr", device="cpu", log=lambda m: None)
    pool = TeacherCache.open(root / "pool-tipf.zarr", dataset=data.Dataset.open(root / "ds" / "train"))
    np_probs = pool.probs(0, 0, 6)
    assert abs(float(np_probs.sum(axis=1).mean()) - 1.0) < 1e-2 and not pool.has_embeddings
    run = distill(DistillConfig(labeled=str(root / "lab"), labeled_cache=str(root / "lab-tipf.zarr"),
                                unlabeled=str(root / "ds" / "train"), unlabeled_cache=str(root / "pool-tipf.zarr"),
                                student="resnet-tiny", out=str(root / "run"), epochs=1, batch_size=6, workers=0, device="cpu",
                                unlabeled_pool="exclude-labeled"))
    assert (run / "model.pt").is_file()
    # resumable and refusing: the same apply again computes nothing; a cache without embeddings is refused
    again = tip.apply(path, root / "ds" / "test", root / "test.zarr", root / "test-tipf.zarr", device="cpu", log=lambda m: None)
    assert again.is_complete()
    with pytest.raises(Exception, match="holds no teacher embeddings"):
        tip.apply(path, root / "ds" / "test", root / "test-tipf.zarr", root / "x.zarr", device="cpu", log=lambda m: None)
    with pytest.raises(ConfigError, match="is the labeled set itself"):
        tip.build(root / "lab", root / "lab.zarr", root / "lab", root / "lab.zarr", device="cpu", log=lambda m: None)
    with pytest.raises(ConfigError, match="shares .* sample\\(s\\) with --labeled .*: alpha/beta would be searched on training data"):
        tip.build(root / "lab", root / "lab.zarr", root / "ds" / "train", root / "pool.zarr", device="cpu", log=lambda m: None)
