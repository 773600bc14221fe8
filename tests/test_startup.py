"""Start-up: `dho --help` and the data commands (prepare, index, split) never import torch, open_clip or
matplotlib; their shards stay byte-identical to webdataset's writer and read like webdataset reads them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from dho import data
from dho.data.index import scan_and_hash, scan_shards
from helpers_data import make_image_folder

HEAVY = ("torch", "open_clip", "matplotlib", "webdataset", "zarr")


def _run_in_fresh_process(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_and_data_commands_import_no_heavy_module(tmp_path):
    src = make_image_folder(tmp_path / "images", num_classes=3, per_class=4)
    (tmp_path / "classes.txt").write_text("class_0\nclass_1\nclass_2\n")
    code = f"""
import json, sys, glob, contextlib, io
from dho.cli import app
heavy = {HEAVY!r}
seen = {{}}
def run(name, args):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            app(args, standalone_mode=False)
        except SystemExit:
            pass
    seen[name] = [m for m in heavy if m in sys.modules]
run("help", ["--help"])
run("distill-help", ["distill", "--help"])
run("precompute-help", ["precompute-teacher", "--help"])
run("prepare", ["prepare", "{src}", "--out", "{tmp_path / 'ds'}", "--shard-size", "5"])
run("index", ["index", *sorted(glob.glob("{tmp_path / 'ds'}/*.tar")), "--classnames", "{tmp_path / 'classes.txt'}", "--out", "{tmp_path / 'idx'}"])
run("split", ["split", "{tmp_path / 'ds'}", "--out", "{tmp_path / 'lab'}", "--shots", "2", "--val-per-class", "1", "--val-out", "{tmp_path / 'val'}"])
print(json.dumps(seen))
"""
    seen = _run_in_fresh_process(code)
    assert seen == {"help": [], "distill-help": [], "precompute-help": [], "prepare": [], "index": [], "split": []}
    assert data.Dataset.open(tmp_path / "lab").num_samples == 6 and data.Dataset.open(tmp_path / "idx").num_samples == 12


def test_print_config_imports_no_heavy_module(tmp_path):
    """`dho distill --print-config` resolves and prints the config without torch (0.5 s, not 10) and writes nothing."""
    code = f"""
import json, sys, contextlib, io
from dho.cli import app
out = io.StringIO()
with contextlib.redirect_stdout(out):
    app(["distill", "--labeled", "L", "--labeled-cache", "L.zarr", "--student", "resnet18", "--out", "{tmp_path / 'run'}",
         "--print-config"], standalone_mode=False)
print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules], "printed": out.getvalue()}}))
"""
    seen = _run_in_fresh_process(code)
    assert seen["heavy"] == [] and "\nstudent: resnet18\n" in seen["printed"]
    assert not (tmp_path / "run").exists()


def test_shards_are_byte_identical_to_webdatasets_writer_and_read_alike(tmp_path):
    import webdataset as wds

    src = make_image_folder(tmp_path / "images", num_classes=3, per_class=4, odd=False)
    (src / "class_1" / "čaj ünï.v2.jpg").write_bytes((src / "class_1" / "img_000.jpg").read_bytes())  # PAX name, dots
    ds = data.prepare(src, tmp_path / "ds", shard_size=5)
    for shard in ds.shards:
        with open(tmp_path / "wds.tar", "wb") as f:
            writer = wds.TarWriter(f, user="", group="", mode=0o644, encoder=False, mtime=0)
            for key, label, file in zip(shard.keys, shard.labels, shard.files):
                ext = file.rsplit(".", 1)[1].lower()
                writer.write({"__key__": key, ext: (src / file).read_bytes(), "cls": str(label).encode()})
            writer.close()
        ours, theirs = shard.path.read_bytes(), (tmp_path / "wds.tar").read_bytes()
        assert hashlib.sha256(ours).hexdigest() == hashlib.sha256(theirs).hexdigest()
        mine = list(data.tar_samples(shard.path))
        reference = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                     for s in wds.tarfile_samples([{"url": str(shard.path)}])]
        assert mine == reference


def test_ordered_reader_is_made_on_first_use_and_pickles_by_reference(tiny_dataset):
    import pickle

    import torch

    reader = data.OrderedReader(tiny_dataset, rank=0, world_size=1)
    assert isinstance(reader, torch.utils.data.IterableDataset)
    again = pickle.loads(pickle.dumps(reader))  # spawned DataLoader workers pickle the dataset
    assert type(again) is data.OrderedReader and [s.key for s in again] == [s.key for s in reader]
    with pytest.raises(AttributeError):
        data.NoSuchThing  # noqa: B018


def test_index_scans_shards_in_a_process_pool_like_one_by_one(tmp_path, tiny_dataset):
    """The pooled scan (several shards, several cores) gives what scanning each shard in turn gives, in order;
    an error in a worker (a truncated tar) reaches the caller as the same one-line DatasetError."""
    paths = [s.path for s in tiny_dataset.shards]
    pooled = list(scan_shards(paths, "cls"))
    assert pooled == [scan_and_hash(p, "cls") for p in paths]
    assert [scan["keys"] for scan in pooled] == [s.keys for s in tiny_dataset.shards]
    assert [scan["sha256"] for scan in pooled] == [s.sha256 for s in tiny_dataset.shards]
    assert [scan["size"] for scan in pooled] == [s.size for s in tiny_dataset.shards]
    spans = np.concatenate([scan["spans"] for scan in pooled])  # byte spans and digests: what prepare's writer recorded
    assert np.array_equal(spans, tiny_dataset.columns.spans)
    assert np.concatenate([scan["digests"] for scan in pooled]).tolist() == tiny_dataset.columns.digests.tolist()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(paths[1].read_bytes()[: paths[1].stat().st_size // 2])  # cut inside a member
    with pytest.raises(data.DatasetError, match=r"cut\.tar: truncated"):
        list(scan_shards([paths[0], cut, paths[2]], "cls"))
