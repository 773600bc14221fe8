"""Data layer: prepare / index / split, shard checks, ordered reading, view params and replay."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from dho import data
from dho.data import manifest as manifest_module
from dho.data.index import scan_and_hash
from dho.errors import ConfigError, DatasetError
from helpers_data import ODD_BAD_FILES, ODD_EXTRA_FILES, make_image_folder


def _sha_tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _all_samples(ds, decode=False):
    return [s for i in range(len(ds.shards)) for s in data.iter_shard(ds, i, decode=decode)]


# --------------------------------------------------------------------------------------------
# prepare / index
# --------------------------------------------------------------------------------------------


def test_prepare_keeps_keys_labels_and_original_bytes(image_folder, tmp_path):
    ds = data.prepare(image_folder, tmp_path / "ds", shard_size=5, shuffle=False)
    assert ds.classnames == ["class_0", "class_1", "class_2"]
    assert ds.num_samples == 24 and [s.count for s in ds.shards] == [5, 5, 5, 5, 4]
    assert [s.offset for s in ds.shards] == [0, 5, 10, 15, 20]
    assert ds.keys[:2] == ["class_0/img_000", "class_0/img_001"] and ds.keys[-1] == "class_2/img_007"
    assert ds.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert ds.shards[0].files[0] == "class_0/img_000.jpg"
    assert [s.path.name for s in ds.shards] == [f"shard-{i:06d}.tar" for i in range(5)]
    samples = _all_samples(ds, decode=False)
    assert [s.index for s in samples] == list(range(24)) and [s.key for s in samples] == ds.keys
    for s in samples:
        file = ds.shards[s.shard].files[s.index - ds.shards[s.shard].offset]
        assert s.image is None and s.ext == "jpg" and s.data == (image_folder / file).read_bytes()
    decoded = next(data.iter_shard(ds, 4))
    original = Image.open(image_folder / "class_2/img_004.jpg")
    assert decoded.key == "class_2/img_004" and decoded.label == 2 and decoded.index == 20
    assert decoded.image.mode == "RGB" and decoded.image.size == original.size
    assert np.array_equal(np.asarray(decoded.image), np.asarray(original.convert("RGB")))
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["format"] == "dho-dataset" and m["version"] == 3 and m["num_samples"] == 24 and m["skipped"] == []
    assert set(m["shards"][0]) == {"path", "count", "sha256", "size"} and m["fingerprint"] == ds.fingerprint
    assert m["shards"][0]["size"] == ds.shards[0].path.stat().st_size
    # the columns are plain .npy files beside the manifest, read without dho
    cols = {name: np.load(tmp_path / "ds" / file) for name, file in m["columns"].items()}
    assert [k.decode() for k in cols["keys"]] == ds.keys and cols["labels"].tolist() == ds.labels.tolist()
    assert cols["files"][0].decode() == "class_0/img_000.jpg"
    assert m["provenance"]["command"] == "prepare" and m["provenance"]["shard_size"] == 5
    with tarfile.open(ds.shards[0].path) as tf:
        members = tf.getmembers()
    assert [t.name for t in members[:2]] == ["class_0/img_000.cls", "class_0/img_000.jpg"]
    assert {(t.mtime, t.uid, t.gid, t.uname, t.gname) for t in members} == {(0, 0, 0, "", "")}


def test_prepare_shuffles_classes_across_shards_deterministically(image_folder, tmp_path):
    a = data.prepare(image_folder, tmp_path / "a", shard_size=6)
    b = data.prepare(image_folder, tmp_path / "b", shard_size=6, seed=1)
    assert sorted(a.keys) == sorted(b.keys) and a.keys != b.keys
    assert all(len(set(s.labels)) > 1 for s in a.shards)  # every shard mixes classes
    assert a.labels.tolist() == [int(k.split("/")[0][-1]) for k in a.keys]
    assert a.keys == data.prepare(image_folder, tmp_path / "c", shard_size=6).keys


def test_prepare_is_byte_identical_on_rerun(image_folder, tmp_path):
    data.prepare(image_folder, tmp_path / "a", shard_size=7)
    data.prepare(image_folder, tmp_path / "b", shard_size=7)
    a, b = _sha_tree(tmp_path / "a"), _sha_tree(tmp_path / "b")
    fp = data.Dataset.open(tmp_path / "a").fingerprint[:16]
    columns = [f"manifest.{fp}.{c}.npy" for c in ("digests", "files", "keys", "labels", "spans")]
    assert list(a) == columns + ["manifest.json"] + [f"shard-{i:06d}.tar" for i in range(4)]
    assert a == b


def test_v1_manifest_opens_with_the_same_fingerprint_and_columns(tiny_dataset, tmp_path):
    """A v1 manifest (keys and labels in the JSON) opens like its v2 rewrite; index --overwrite of a
    v2 manifest replaces its column files and removes the old ones (no litter, nothing else touched)."""
    root = shutil.copytree(tiny_dataset.root, tmp_path / "v1")
    m = json.loads((root / "manifest.json").read_text())
    for name in m.pop("columns").values():
        (root / name).unlink()
    m.pop("fingerprint")
    m["version"] = 1
    for entry, s in zip(m["shards"], tiny_dataset.shards):
        entry.update(keys=s.keys, labels=s.labels)
    (root / "manifest.json").write_text(json.dumps(m))
    old = data.Dataset.open(root)
    assert old.version == 1 and old.fingerprint == tiny_dataset.fingerprint
    assert old.keys == tiny_dataset.keys and old.labels.tolist() == tiny_dataset.labels.tolist()
    assert "keys" not in old.manifest["shards"][0]  # the per-sample lists live in the columns only
    assert [s.keys for s in old.shards] == [s.keys for s in tiny_dataset.shards]
    # damaged columns are one-line errors, found where they are read
    v3 = shutil.copytree(tiny_dataset.root, tmp_path / "v3")
    cols = json.loads((v3 / "manifest.json").read_text())["columns"]
    labels = v3 / cols["labels"]
    np.save(labels, np.roll(tiny_dataset.labels, 1))  # v3: each column's size and crc32 checked at open
    with pytest.raises(DatasetError, match=r"^[^\n]*: its labels column \S+ does not match the manifest's crc32: the file was changed after"):
        data.Dataset.open(v3)
    np.save(labels, tiny_dataset.labels.astype(np.int32))
    with pytest.raises(DatasetError, match=r"its labels column \S+ is 224 bytes but the manifest says 320: the file was replaced"):
        data.Dataset.open(v3)
    v2 = _as_v2(tiny_dataset.root, tmp_path / "v2")  # v2: a column's shape and type at open, the fingerprint with verify
    np.save(v2 / cols["labels"], np.zeros(3, dtype=np.int64))
    with pytest.raises(DatasetError, match=r"labels column .* is int64 \(3,\), expected \(24,\) int64"):
        data.Dataset.open(v2)
    np.save(v2 / cols["labels"], np.roll(tiny_dataset.labels, 1))
    with pytest.raises(DatasetError, match="do not match the manifest's fingerprint"):
        data.Dataset.open(v2, verify=True)
    # the label range is read once per column file and process (min, max), and read again once the file changes
    np.save(v2 / cols["labels"], tiny_dataset.labels)
    before = len(manifest_module._LABEL_RANGES)
    data.Dataset.open(v2)
    data.Dataset.open(v2)
    assert len(manifest_module._LABEL_RANGES) == before + 1
    bad = tiny_dataset.labels.copy()
    bad[5] = tiny_dataset.num_classes
    np.save(v2 / cols["labels"], bad)
    os.utime(v2 / cols["labels"], ns=(1, 1))  # even a file rewritten within one clock tick: another mtime
    with pytest.raises(DatasetError, match=rf"sample '{tiny_dataset.key(5)}' has label {bad[5]} outside \[-1, {bad[5]}\)"):
        data.Dataset.open(v2)
    cli = subprocess.run([str(Path(sys.executable).parent / "dho"), "split", str(v2), "--out", str(tmp_path / "part"),
                          "--percent", "50"], capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and f"has label {bad[5]} outside" in cli.stderr
    (v2 / cols["keys"]).unlink()
    with pytest.raises(DatasetError, match="keys column .* is missing"):
        data.Dataset.open(v2)


def test_index_of_prepared_shards_matches_prepare(tiny_dataset, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("class_0\nclass_1\nclass_2\n\n")
    elsewhere = data.index([s.path for s in tiny_dataset.shards], names, tmp_path / "idx")
    assert elsewhere.keys == tiny_dataset.keys
    assert elsewhere.labels.tolist() == tiny_dataset.labels.tolist()
    assert elsewhere.fingerprint == tiny_dataset.fingerprint
    assert [Path(s["path"]).is_absolute() for s in elsewhere.manifest["shards"]] == [True] * 5
    # in place: paths relative to OUT, so the folder can be moved
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset.root, copy)
    (copy / "manifest.json").unlink()
    inplace = data.index(sorted(copy.glob("shard-*.tar")), names, copy)
    assert [s["path"] for s in inplace.manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert inplace.fingerprint == tiny_dataset.fingerprint
    moved = tmp_path / "moved"
    copy.rename(moved)
    assert data.Dataset.open(moved, verify=True).fingerprint == tiny_dataset.fingerprint
    with pytest.raises(DatasetError, match="already exists.*--overwrite"):
        data.index(sorted(moved.glob("shard-*.tar")), names, moved)


def test_process_pools_write_what_one_process_writes(tmp_path):
    """prepare, split and index in a pool of 3 processes (whatever the machine's cores) give byte for byte
    what one process gives, skipped files included (they move the later shard boundaries); an error in a
    worker keeps its one line."""
    src = make_image_folder(tmp_path / "images", num_classes=3, per_class=12)  # 36 files: 3 tasks of FILES_PER_TASK
    (src / "class_1" / "img_000.jpg").write_bytes(b"not a JPEG")
    (tmp_path / "classes.txt").write_text("class_0\nclass_1\nclass_2\n")
    for processes in (1, 3):
        ds = data.prepare(src, tmp_path / f"prepared{processes}", shard_size=5, skip_bad=True, processes=processes)
        data.index(sorted((tmp_path / "prepared1").glob("*.tar")), tmp_path / "classes.txt", tmp_path / f"index{processes}",
                   processes=processes)
        # split reads shards in the pool when it cannot copy byte spans: a manifest without them
        if processes == 1:
            _without_spans(tmp_path / "index1", tmp_path / "nospans1")
        data.split(tmp_path / "nospans1", tmp_path / f"split{processes}" / "lab", shots=3, val_per_class=2,
                   val_out=tmp_path / f"split{processes}" / "val", shard_size=4, processes=processes)
    assert np.array_equal(data.Dataset.open(tmp_path / "index1").columns.spans, data.Dataset.open(tmp_path / "prepared1").columns.spans)
    assert ds.num_samples == 35 and ds.manifest["skipped"][0]["file"] == "class_1/img_000.jpg"
    for name in ("prepared", "split", "index"):
        assert _sha_tree(tmp_path / f"{name}3") == _sha_tree(tmp_path / f"{name}1"), name
    with tarfile.open(tmp_path / "prepared1" / "shard-000004.tar", "w") as tf:  # another shard's bytes under its name
        tf.add(tmp_path / "prepared1" / "shard-000000.tar", arcname="x.jpg")
    with pytest.raises(DatasetError, match=r"^shard 4 \(.*shard-000004\.tar\): is \d+ bytes but the manifest says \d+; the shard changed[^\n]*$"):
        data.split(tmp_path / "nospans1", tmp_path / "bad", percent=100, processes=3)


def _without_spans(root: Path, out: Path) -> Path:
    """A copy of the manifest in `root` (pointing at the same shards) without its byte-spans column."""
    out.mkdir()
    m = json.loads((root / "manifest.json").read_text())
    for name, file in m["columns"].items():
        if name != "spans":
            shutil.copy(root / file, out / file)
    m["columns"].pop("spans")
    m["shards"] = [dict(s, path=str((root / s["path"]).resolve())) for s in m["shards"]]
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _as_v2(root: Path, out: Path) -> Path:
    """A copy of the v3 manifest in `root` (pointing at the same shards) as dho wrote version 2: no digests column,
    no shard sizes, no column checks."""
    out.mkdir()
    m = json.loads((root / "manifest.json").read_text())
    m["columns"].pop("digests")
    for file in m["columns"].values():
        shutil.copy(root / file, out / file)
    del m["column_checks"]
    m["version"] = 2
    m["shards"] = [{k: v for k, v in s.items() if k != "size"} | {"path": str((root / s["path"]).resolve())} for s in m["shards"]]
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _local_and_piped(tiny_dataset, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("class_0\nclass_1\nclass_2\n")
    local = data.index([s.path for s in tiny_dataset.shards], names, tmp_path / "local")
    piped = data.index([f"pipe:cat {tiny_dataset.root}/shard-{{000000..000004}}.tar"], names, tmp_path / "piped")
    return names, local, piped


def test_index_reads_pipe_urls_and_brace_ranges_as_the_local_files(tiny_dataset, tmp_path):
    names, local, piped = _local_and_piped(tiny_dataset, tmp_path)
    urls = [f"pipe:cat {tiny_dataset.root}/shard-{i:06d}.tar" for i in range(5)]
    assert [s["path"] for s in piped.manifest["shards"]] == urls  # the URL as given, expanded
    assert [s.path for s in piped.shards] == urls and piped.shards[0].name == urls[0]
    for field in ("count", "sha256"):
        assert [s[field] for s in piped.manifest["shards"]] == [s[field] for s in local.manifest["shards"]], field
    assert piped.keys == local.keys and piped.labels.tolist() == local.labels.tolist()
    assert piped.columns.spans is None and local.columns.spans is not None  # no byte offsets into a stream
    read = [(s.key, s.label, s.index, s.data) for s in _all_samples(piped)]
    assert read == [(s.key, s.label, s.index, s.data) for s in _all_samples(local)]
    assert [s.key for s in data.OrderedReader(piped, decode=False, rank=1, world_size=2)] == \
        [s.key for s in data.OrderedReader(local, decode=False, rank=1, world_size=2)]
    assert list(data.tar_samples(urls[2])) == list(data.tar_samples(local.shards[2].path))
    data.Dataset.open(tmp_path / "piped", verify=True)  # streamed and hashed
    # file: URLs and comma lists are local files; a Path is taken as it is (no brace expansion)
    mixed = data.index([f"file:{tiny_dataset.root}/shard-{{000000,000001}}.tar", tiny_dataset.shards[2].path], names,
                       tmp_path / "mixed", processes=1)
    assert [s.path for s in mixed.shards] == [s.path for s in local.shards[:3]]
    assert [s["sha256"] for s in mixed.manifest["shards"]] == [s.sha256 for s in local.shards[:3]]
    # a compressed stream reads as the tar inside it; an empty tar is a shard of no samples
    gz = f"pipe:gzip -c {local.shards[0].path}"
    scan = scan_and_hash(gz, "cls")
    assert (scan["keys"], scan["labels"], scan["digests"]) == (local.shards[0].keys, local.shards[0].labels, local.shards[0].digests)
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert scan_and_hash(tmp_path / "empty.tar", "cls") == {"keys": [], "labels": [], "sha256": data.file_sha256(tmp_path / "empty.tar"),
                                                          "spans": [], "digests": [], "size": 10240}
    assert scan["spans"] is None  # a compressed stream: no byte spans into the file


def test_a_failing_pipe_command_is_one_line(tiny_dataset, tmp_path):
    names, local, piped = _local_and_piped(tiny_dataset, tmp_path)
    one_line = r"[^\n]*$"
    with pytest.raises(DatasetError, match=r"^shard pipe:cat /no/such\.tar: the command exited with status 1 \(cat: /no/such\.tar: "
                                           r"No such file or directory\); run it in a shell to check that it prints the tar" + one_line):
        data.index(["pipe:cat /no/such.tar"], names, tmp_path / "bad")
    with pytest.raises(DatasetError, match=r"^shard pipe:exit 3: the command exited with status 3;" + one_line):
        data.index([local.shards[0].path, "pipe:exit 3"], names, tmp_path / "bad")
    with pytest.raises(DatasetError, match=r"^shard pipe:head -c 3000 .*shard-000000\.tar: not a readable tar file" + one_line):
        data.index([f"pipe:head -c 3000 {local.shards[0].path}"], names, tmp_path / "bad")
    with pytest.raises(DatasetError, match=r"^shard s3://b/s-0\.tar: s3:// URLs are read through a command .*'pipe:aws s3 cp s3://b/s-0\.tar -'"):
        data.index(["s3://b/s-0.tar"], names, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # OUT is made once every shard was read
    # a shard whose command fails, or prints another shard, once the dataset is read
    manifest = json.loads((tmp_path / "piped" / "manifest.json").read_text())
    manifest["shards"][1]["path"] = "pipe:cat /no/such.tar"
    manifest["shards"][2]["path"] = manifest["shards"][3]["path"]
    (tmp_path / "piped" / "manifest.json").write_text(json.dumps(manifest))
    broken = data.Dataset.open(tmp_path / "piped")
    for read in (lambda: list(data.iter_shard(broken, 1)), lambda: data.verify_shard(broken, 1)):
        with pytest.raises(DatasetError, match=r"^shard pipe:cat /no/such\.tar: the command exited with status 1" + one_line):
            read()
    with pytest.raises(DatasetError, match=r"^shard 2 \(pipe:cat .*shard-000003\.tar\) of dataset .* changed since its manifest"):
        data.verify_shard(broken, 2)
    samples = data.iter_shard(broken, 0, decode=False)  # a reader that stops early ends the command quietly
    assert next(samples).key == local.keys[0]
    samples.close()


def test_ctrl_c_stops_index_at_once_with_its_commands(tmp_path):
    """Ctrl-C (SIGINT to the process group) ends `dho index` and the pipe: commands its pool runs, and the
    tasks already queued to a worker do not start their commands."""
    (tmp_path / "classes.txt").write_text("a\n")
    shards = f"pipe:touch {tmp_path}/started-{{1,2,3,4,5,6}}; sleep 30"
    proc = subprocess.Popen([sys.executable, "-m", "dho", "index", shards, "--classnames", str(tmp_path / "classes.txt"),
                             "--out", str(tmp_path / "out")], start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not list(tmp_path.glob("started-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    start = time.monotonic()
    err = proc.communicate(timeout=20)[1]
    assert time.monotonic() - start < 5 and proc.returncode == 130, err
    assert "Traceback" not in err
    assert len(list(tmp_path.glob("started-*"))) <= min(os.cpu_count() or 1, 6)  # one command per worker at most
    assert not (tmp_path / "out").exists()


def test_a_pipe_command_that_prints_nothing_is_stopped_after_the_pipe_timeout(tiny_dataset, tmp_path, monkeypatch):
    """`pipe:sleep 100` would hold `dho index` (and every reader) forever: after --pipe-timeout / $DHO_PIPE_TIMEOUT
    seconds without a byte the command is killed (the sleep too, which dash does not exec) and one line names it."""
    (tmp_path / "classes.txt").write_text("a\n")
    marker = f"{tmp_path}/alive"  # the command's child, findable by its arguments
    cmd = [sys.executable, "-m", "dho", "index", f"pipe:sleep 100; echo {marker}", "--classnames", str(tmp_path / "classes.txt"),
           "--out", str(tmp_path / "out")]
    start = time.monotonic()
    done = subprocess.run([*cmd, "--pipe-timeout", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - start < 30, done.stderr
    assert done.stderr == (f"error: shard pipe:sleep 100; echo {marker}: the command printed nothing for 1 s; check that it runs "
                           "in a shell, or allow it longer with $DHO_PIPE_TIMEOUT (or dho index --pipe-timeout)\n")
    assert not (tmp_path / "out").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"sleep 100; echo {marker}" not in ps  # the shell is gone (its sleep has no unique arguments to look for)
    for value, said in (("0", "$DHO_PIPE_TIMEOUT must be a positive number of seconds, not '0'"), ("soon", "not 'soon'")):
        bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ, DHO_PIPE_TIMEOUT=value))
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and said in bad.stderr, bad.stderr
    # every reader: a dataset whose shard stalls, read with $DHO_PIPE_TIMEOUT
    names, local, piped = _local_and_piped(tiny_dataset, tmp_path)
    manifest = json.loads((tmp_path / "piped" / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "pipe:sleep 100"
    (tmp_path / "piped" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("DHO_PIPE_TIMEOUT", "0.5")
    with pytest.raises(DatasetError, match=r"^shard pipe:sleep 100: the command printed nothing for 0\.5 s; "):
        list(data.iter_shard(data.Dataset.open(tmp_path / "piped"), 0))


def test_expand_braces_as_braceexpand_does(monkeypatch):
    import braceexpand  # webdataset's

    from dho.data import shards

    monkeypatch.setattr(shards, "MAX_EXPANSION", 1000)  # the limit's mechanism, without generating a million names

    expand = data.expand_braces
    assert expand("data/shard-{000000..000003}.tar") == [f"data/shard-{i:06d}.tar" for i in range(4)]
    assert expand("pipe:aws s3 cp s3://b/s-{0098..0101}.tar -") == [f"pipe:aws s3 cp s3://b/s-{i:04d}.tar -" for i in range(98, 102)]
    assert expand("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]  # no leading zero: no padding
    assert expand("{train,val}-{0..1}.tar") == ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]  # first group slowest
    assert expand("plain.tar") == ["plain.tar"]
    patterns = ["{07..10}", "{4..1}", "{2..-1}", "{-01..1}", "{0..10..5}", "py{2.{5..7},3.{2,3}}", "{,x}y", "{a}", "{}",
                "pipe:awk '{print $1}' f", "a{b,c{d,e}}f{1..2}", "s-{a..c}.tar", "a\\{1,2\\}", "pipe:cat s-{0,1}.tar"]
    for pattern in patterns:
        assert expand(pattern) == list(braceexpand.braceexpand(pattern, escape=False)), pattern
    # a pipe: command's own braces (in quotes, in ${...}) stay as written; the shard pattern's groups expand,
    # an integer range inside quotes (a quoted URL) too. braceexpand alone splits awk's {print $1,$2} in two.
    awk = "pipe:awk '{print $1,$2}' s-{0..1}.txt"
    assert expand(awk) == ["pipe:awk '{print $1,$2}' s-0.txt", "pipe:awk '{print $1,$2}' s-1.txt"]
    assert len(list(braceexpand.braceexpand(awk, escape=False))) == 4
    assert expand("pipe:cat ${ROOT:-{a,b}}/s-{0,1}.tar") == ["pipe:cat ${ROOT:-{a,b}}/s-0.tar", "pipe:cat ${ROOT:-{a,b}}/s-1.tar"]
    assert expand("pipe:curl -s 'https://host/s-{08..10}.tar'") == [f"pipe:curl -s 'https://host/s-{i:02d}.tar'" for i in (8, 9, 10)]
    assert expand('pipe:jq -c "{a,b}" x-{0,1}') == ['pipe:jq -c "{a,b}" x-0', 'pipe:jq -c "{a,b}" x-1']
    assert expand("pipe:awk '{' f") == ["pipe:awk '{' f"]  # unbalanced, but the command's
    for pattern, error in [("s-{1..x}.tar", r"\{1\.\.x\} is not a range of integers or of letters"),
                           ("s-{000..}.tar", "not a range of integers"), ("s-{1{2,3}.tar", "unbalanced braces"),
                           ("s-1}.tar", "unbalanced braces"), ("s-{0..99999999}.tar", "more than 1000 names"),
                           ("{0..99}{0..99}", "expands to more than 1000 names"), ("pipe:cat s-{0..1", "unbalanced braces")]:
        with pytest.raises(DatasetError, match=rf"^shard pattern '{re.escape(pattern)}'.*{error}[^\n]*$"):
            expand(pattern)


def test_index_reads_labels_from_label_key_and_checks_them(tmp_path):
    def shard(path, samples):
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for name, payload in samples:
                ti = tarfile.TarInfo(name)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))

    jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpg, format="JPEG")
    img = jpg.getvalue()
    shard(tmp_path / "a.tar", [("x1.jpg", img), ("x1.label", b"1"), ("x2.jpg", img)])
    shard(tmp_path / "b.tar", [("x3.jpg", img), ("x3.label", b" 0\n")])
    names = tmp_path / "names.txt"
    names.write_text("zero\none\n")
    ds = data.index([tmp_path / "a.tar", tmp_path / "b.tar"], names, tmp_path / "out", label_key="label")
    assert ds.keys == ["x1", "x2", "x3"] and ds.labels.tolist() == [1, -1, 0]
    assert [s.key for s in _all_samples(ds, decode=True)] == ["x1", "x2", "x3"]
    shard(tmp_path / "c.tar", [("x2.jpg", img)])
    with pytest.raises(DatasetError, match=r"'x2' appears in shard .*a\.tar and again in shard .*c\.tar"):
        data.index([tmp_path / "a.tar", tmp_path / "c.tar"], names, tmp_path / "out2", label_key="label")
    shard(tmp_path / "d.tar", [("x4.jpg", img), ("x4.label", b"2")])
    with pytest.raises(DatasetError, match=r"'x4' has label 2 but .*names\.txt lists 2 classes"):
        data.index([tmp_path / "d.tar"], names, tmp_path / "out3", label_key="label")
    shard(tmp_path / "e.tar", [("x5.txt", b"caption")])
    with pytest.raises(DatasetError, match="'x5' has no image member"):
        data.index([tmp_path / "e.tar"], names, tmp_path / "out4")
    # keys are checked for repeats over arrays once scanned (a hash set, not a dict of every key), reporting what a
    # check shard by shard reports: the first repeat, before a later shard's (or the same shard's later) other error
    shard(tmp_path / "f.tar", [("x6.jpg", img), ("x6.label", b"1"), ("x6.png", img), ("x7.jpg", img), ("x7.label", b"9")])
    for order, repeated in [(["a", "c", "d"], "'x2' appears in shard .*a\\.tar and again in shard .*c\\.tar"),
                            (["d", "a", "c"], "'x4' has label 2"), (["b", "a", "e", "c"], "'x5' has no image member"),
                            (["f"], "'x7' has label 9")]:
        with pytest.raises(DatasetError, match=repeated):
            data.index([tmp_path / f"{n}.tar" for n in order], names, tmp_path / "out5", label_key="label")
    shard(tmp_path / "g.tar", [("x8.jpg", img), ("x8.label", b"1"), ("x9.jpg", img), ("x8.png", img), ("x10.jpg", img), ("x10.label", b"9")])
    cli = subprocess.run([str(Path(sys.executable).parent / "dho"), "index", str(tmp_path / "b.tar"), str(tmp_path / "g.tar"), "--classnames", str(names),
                          "--label-key", "label", "--out", str(tmp_path / "out6")], capture_output=True, text=True)
    # x8 again inside g.tar after x9: its members are apart (webdataset would read two samples x8), said as such
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1
    assert re.match(r"error: shard .*g\.tar: the members of sample 'x8' are not adjacent \('x8\.png' comes after members of 'x9'\)",
                    cli.stderr)
    assert not (tmp_path / "out6").exists()


def test_bad_file_fails_naming_it_and_leaves_nothing(odd_image_folder, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(DatasetError, match=r"class_2/broken\.jpg: not a readable image.*--skip-bad"):
        data.prepare(odd_image_folder, out)
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder


def test_skip_bad_lists_files_and_odd_images_work(odd_image_folder, tmp_path):
    ds = data.prepare(odd_image_folder, tmp_path / "ds", shard_size=4, skip_bad=True)
    skipped = ds.manifest["skipped"]
    assert [s["file"] for s in skipped] == ODD_BAD_FILES
    assert all(s["reason"] for s in skipped)
    files = [f for s in ds.shards for f in s.files]
    assert set(ODD_EXTRA_FILES) <= set(files) and not set(ODD_BAD_FILES) & set(files)
    assert "class_1/README.txt" not in files
    assert ds.num_samples == 3 * 4 + len(ODD_EXTRA_FILES)
    by_key = {s.key: s for s in _all_samples(ds, decode=True)}
    assert by_key["class_1/photo_v2_final"].ext == "jpg"  # dots of the stem replaced
    assert by_key["class_1/čaj_ünï"].label == 1  # non-ASCII names survive the tar round trip
    assert by_key["class_1/huge"].image.size == (5000, 5000)
    assert {by_key[f"class_1/{k}"].image.mode for k in ("gray", "palette", "alpha")} == {"RGB"}


def test_colliding_keys_are_refused(tmp_path):
    src = make_image_folder(tmp_path / "src", num_classes=1, per_class=1)
    shutil.copy(src / "class_0/img_000.jpg", src / "class_0/a.b.jpg")
    shutil.copy(src / "class_0/img_000.jpg", src / "class_0/a_b.jpg")
    with pytest.raises(DatasetError, match=r"'class_0/a\.b\.jpg' and 'class_0/a_b\.jpg' map to the same sample key 'class_0/a_b'"):
        data.prepare(src, tmp_path / "ds")


def test_prepare_refuses_non_empty_out_unless_overwrite(image_folder, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        data.prepare(image_folder, out)
    with pytest.raises(ConfigError, match="does not hold a dataset .* written by dho; it is left alone"):
        data.prepare(image_folder, out, overwrite=True)  # not a dho dataset: never replaced
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    data.prepare(image_folder, out, shard_size=5)
    ds = data.prepare(image_folder, out, overwrite=True)  # a dho dataset: replaced
    assert ds.num_samples == 24 and len(ds.shards) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "images"]  # old copy removed


def test_modified_shard_is_detected(image_folder, tmp_path):
    v3 = data.prepare(image_folder, tmp_path / "ds", shard_size=5, shuffle=False)
    v3.verify()
    ds = data.Dataset.open(_as_v2(v3.root, tmp_path / "v2"))  # the checks a manifest without sizes and digests gets
    with open(ds.shards[1].path, "ab") as f:
        f.write(b"\0" * 512)  # samples unchanged, bytes changed
    with pytest.raises(DatasetError, match=r"shard 1 \(.*shard-000001\.tar\) .*changed since its manifest"):
        data.Dataset.open(tmp_path / "ds", verify=True)
    with pytest.raises(DatasetError, match="shard-000001.tar.*changed"):
        data.verify_shard(ds, 1)
    with pytest.raises(DatasetError, match=r"^shard 1 \(.*\): is \d+ bytes but the manifest says \d+; the shard changed"):
        list(data.iter_shard(v3, 1, decode=False))  # v3: the size, checked by every reader
    # another shard's content under this name: caught while reading, without hashing
    shutil.copy(ds.shards[3].path, ds.shards[2].path)
    with pytest.raises(DatasetError, match=r"sample 0 has key 'class_1/img_007' but the manifest expects 'class_1/img_002'"):
        list(data.iter_shard(ds, 2, decode=False))
    with tarfile.open(ds.shards[3].path) as tf:  # keep the first 4 of its 5 samples
        members = [(t, tf.extractfile(t).read()) for t in tf.getmembers()[:8]]
    with tarfile.open(ds.shards[3].path, "w", format=tarfile.PAX_FORMAT) as tf:
        for t, payload in members:
            tf.addfile(t, io.BytesIO(payload))
    with pytest.raises(DatasetError, match="holds 4 samples but the manifest says 5"):
        list(data.iter_shard(ds, 3, decode=False))
    ds.shards[0].path.unlink()
    with pytest.raises(DatasetError, match="shard 0 .* is missing"):
        ds.verify()


def test_decode_error_names_where():
    with pytest.raises(DatasetError, match="shard 3 key 'k1': cannot decode the png image"):
        data.decode_image(b"not a png", "png", "shard 3 key 'k1'")


# --------------------------------------------------------------------------------------------
# ordered reading
# --------------------------------------------------------------------------------------------


def _index_of(sample):
    return sample.index


def _read_indices(ds, num_workers, rank=0, world_size=1):
    reader = data.OrderedReader(ds, transform=_index_of, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=num_workers)
    return [int(i) for i in loader]


def test_ordered_reader_covers_every_sample_once(tiny_dataset):
    n = tiny_dataset.num_samples
    assert _read_indices(tiny_dataset, num_workers=0) == list(range(n))
    two_workers = _read_indices(tiny_dataset, num_workers=2)
    assert sorted(two_workers) == list(range(n))
    ranks = [_read_indices(tiny_dataset, num_workers=0, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0] == list(range(0, 5)) + list(range(10, 15)) + list(range(20, 24))  # shards 0, 2, 4
    assert sorted(ranks[0] + ranks[1]) == list(range(n))
    both = [i for r in (0, 1) for i in _read_indices(tiny_dataset, num_workers=2, rank=r, world_size=2)]
    assert sorted(both) == list(range(n))
    assert data.assign_shards(5, 1, 2) == [1, 3] and data.assign_shards(2, 3, 4) == []


def test_ordered_reader_yields_samples_of_chosen_shards(tiny_dataset):
    samples = list(data.OrderedReader(tiny_dataset, shards=[3, 1]))
    assert [s.index for s in samples] == list(range(15, 20)) + list(range(5, 10))
    assert all(s.image.mode == "RGB" for s in samples)
    with pytest.raises(ConfigError, match="rank 2"):
        data.OrderedReader(tiny_dataset, rank=2, world_size=2)


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------


def test_split_shots_with_val(tiny_dataset, tmp_path):
    lab, val = data.split(tiny_dataset, tmp_path / "lab", shots=2, seed=3, val_per_class=3, val_out=tmp_path / "val", shard_size=4)
    assert lab.num_samples == 6 and np.bincount(lab.labels).tolist() == [2, 2, 2]
    assert val.num_samples == 9 and np.bincount(val.labels).tolist() == [3, 3, 3]
    assert not set(lab.keys) & set(val.keys)
    rows = [tiny_dataset.keys.index(k) for k in lab.keys]
    assert rows == sorted(rows)  # source global order
    src_bytes = {s.key: s.data for s in _all_samples(tiny_dataset)}
    for s in _all_samples(lab) + _all_samples(val):
        assert s.data == src_bytes[s.key] and s.label == tiny_dataset.labels[tiny_dataset.keys.index(s.key)]
    assert [s.count for s in lab.shards] == [4, 2]
    source_files = [f for s in tiny_dataset.shards for f in s.files]
    assert [f for s in lab.shards for f in s.files] == [source_files[r] for r in rows]
    p = lab.manifest["provenance"]
    assert (p["command"], p["method"], p["shots"], p["seed"], p["role"]) == ("split", "shots", 2, 3, "labeled")
    assert p["source_fingerprint"] == tiny_dataset.fingerprint and val.manifest["provenance"]["role"] == "validation"
    # the labeled split does not depend on the validation size; it does on the seed
    alone, none = data.split(tiny_dataset, tmp_path / "alone", shots=2, seed=3, shard_size=4)
    assert none is None and alone.keys == lab.keys
    other, _ = data.split(tiny_dataset, tmp_path / "other", shots=2, seed=4, shard_size=4)
    assert other.keys != lab.keys


def test_split_is_deterministic(tiny_dataset, tmp_path):
    for name in ("a", "b"):
        data.split(tiny_dataset, tmp_path / name / "lab", percent=25, seed=0, val_per_class=1, val_out=tmp_path / name / "val")
    assert _sha_tree(tmp_path / "a") == _sha_tree(tmp_path / "b")
    lab = data.Dataset.open(tmp_path / "a" / "lab")
    assert np.bincount(lab.labels).tolist() == [2, 2, 2]  # 25% of 24 = 6, balanced
    assert lab.manifest["provenance"]["percent"] == 25


def test_percent_allocation_largest_remainder():
    assert data.percent_allocation([10, 5, 1], 25) == [2, 1, 1]
    assert data.percent_allocation([7, 7, 7], 50) == [4, 4, 3]  # 10.5 rounds half up to 11
    assert data.percent_allocation([1000, 10], 1) == [9, 1]  # at least one per class, total kept
    assert data.percent_allocation([1, 1, 1, 100], 1) == [1, 1, 1, 1]  # at least one each beats P%
    assert data.percent_allocation([1300] * 10, 1) == [13] * 10
    assert data.percent_allocation([3, 3], 100) == [3, 3]
    alloc = data.percent_allocation([13, 29, 58, 7, 93], 10)
    assert sum(alloc) == 20 and alloc == [1, 3, 6, 1, 9]


def _reference_counts(sizes: list[int], percent: float) -> list[int]:
    """The DHO reference's per-class counts (imagenet_percent.py, balanced), restated with plain floats and loops."""
    n, c, frac = sum(sizes), len(sizes), percent / 100.0
    q = [max(min(n / c * frac - 1.0, m), 1.0) for m in sizes]

    def cascade(q):
        out, running = [], 0.0
        for x, m in zip(q, sizes):
            running += x
            out.append(min(math.ceil(x) if running - running // 1 > 0.5 else math.floor(x), m))
        return out

    counts = cascade(q)
    while sum(counts) < n * frac:
        q = [min(x + 1 / c, m) for x, m in zip(q, sizes)]
        counts = cascade(q)
    return counts


def test_reference_percent_counts_are_the_references():
    rng = np.random.default_rng(0)
    cases = [([10, 5, 1], 25), ([7, 7, 7], 50), ([1000, 10], 1), ([1, 1, 1, 100], 1), ([13, 29, 58, 7, 93], 10), ([3, 3], 99)]
    cases += [(rng.integers(1, 40, size=int(rng.integers(1, 9))).tolist(), float(rng.choice([1, 5, 10, 12.5, 50]))) for _ in range(20)]
    for sizes, percent in cases:
        assert data.reference_percent_counts(sizes, percent) == _reference_counts(sizes, percent), (sizes, percent)
    assert data.reference_percent_counts([3, 0, 5], 100) == [3, 0, 5]  # P = 100: everything, as the reference
    assert data.reference_percent_counts([0, 6, 6], 50) == [0] + _reference_counts([6, 6], 50)  # empty classes do not count
    # ImageNet-1k train: 1,281,167 images in 1000 classes of 732..1300. The counts depend on the sizes only through
    # N, C and the caps n_c, which no class reaches here, so any such class sizes give ImageNet's counts.
    sizes = np.full(1000, 1300)
    sizes[:38] = 1300 - np.array([568] + [500] * 36 + [265])  # 18,833 fewer images, the smallest class 732
    assert sizes.sum() == 1_281_167 and sizes.min() == 732
    one, ten = data.reference_percent_counts(sizes, 1), data.reference_percent_counts(sizes, 10)
    assert sum(one) == 13_000 and set(one) == {13}  # dho's proportional rule: 12,812 (7..13 per class)
    assert sum(ten) == 128_286 and np.bincount(ten)[128:].tolist() == [714, 286]  # proportional: 128,117
    assert one == data.reference_percent_counts(sizes[::-1], 1) and ten == data.reference_percent_counts(np.roll(sizes, 7), 10)
    assert sum(data.percent_allocation(sizes, 1)) == 12_812 and sum(data.percent_allocation(sizes, 10)) == 128_117


def test_split_per_class_equal_draws_the_references_samples(tmp_path):
    """--per-class equal takes the samples the DHO reference's subset_npercent_dataset takes from the same
    torchvision ImageFolder listing and seed, from a prepared dataset (shuffled shards) and from its index."""
    import torchvision

    src = make_image_folder(tmp_path / "src", num_classes=3, per_class=8, imagenet_names=True)
    for name in ["class_1/class_1_0002.JPEG", "class_1/class_1_0005.JPEG", *(f"class_2/class_2_000{j}.JPEG" for j in range(4))]:
        (src / name).unlink()  # class sizes 8, 6, 4
    ds = data.prepare(src, tmp_path / "ds", shard_size=4)
    (tmp_path / "classes.txt").write_text("\n".join(ds.classnames) + "\n")
    indexed = data.index(sorted((tmp_path / "ds").glob("*.tar")), tmp_path / "classes.txt", tmp_path / "idx")
    assert indexed.columns.files is None  # keys stand in for the file names

    samples = torchvision.datasets.ImageFolder(str(src)).samples  # the reference's list: (path, label)
    labels = np.array([y for _, y in samples])
    for percent, seed in ((40, 13), (25, 13), (50, 2)):
        counts = _reference_counts(np.bincount(labels).tolist(), percent)
        np.random.seed(seed)  # the reference's draw, on the global numpy state
        idx = np.hstack([np.random.choice(np.where(labels == c)[0], counts[c], replace=False) for c in range(3)])
        expected = sorted(Path(samples[i][0]).relative_to(src).as_posix() for i in idx)
        for source in (ds, indexed):
            lab, val = data.split(source, tmp_path / f"lab-{percent}-{seed}-{source.root.name}", percent=percent,
                                  per_class="equal", seed=seed, val_per_class=1, val_out=tmp_path / f"val-{percent}-{seed}-{source.root.name}")
            assert sorted(f"{k}.JPEG" for k in lab.keys) == expected, (percent, seed, source.root.name)
            assert np.bincount(lab.labels).tolist() == counts and np.bincount(val.labels).tolist() == [1, 1, 1]
            assert not set(lab.keys) & set(val.keys)
            p = lab.manifest["provenance"]
            assert (p["method"], p["per_class"], p["seed"]) == ("percent", "equal", seed)
    assert counts == [3, 3, 3] and data.percent_allocation(np.bincount(labels), 50) == [4, 3, 2]  # 50% of 18


def test_split_by_simclr_style_file_list(tmp_path):
    src = make_image_folder(tmp_path / "src", num_classes=3, per_class=5, imagenet_names=True)
    ds = data.prepare(src, tmp_path / "ds", shard_size=4, shuffle=False)
    assert ds.keys[0] == "class_0/class_0_0000" and ds.shards[0].files[0] == "class_0/class_0_0000.JPEG"
    listing = tmp_path / "1percent.txt"
    listing.write_text("# SimCLR-style list\nclass_2_0004.JPEG\n\nclass_0_0001.JPEG\nclass_1/class_1_0003\nclass_0/class_0_0001.JPEG\n")
    lab, val = data.split(ds, tmp_path / "lab", keys_file=listing, val_per_class=2, val_out=tmp_path / "val")
    assert lab.keys == ["class_0/class_0_0001", "class_1/class_1_0003", "class_2/class_2_0004"]
    assert lab.labels.tolist() == [0, 1, 2] and [s.ext for s in _all_samples(lab)] == ["jpeg"] * 3
    assert np.bincount(val.labels).tolist() == [2, 2, 2] and not set(val.keys) & set(lab.keys)
    p = lab.manifest["provenance"]
    assert p["method"] == "keys" and p["keys_file"] == "1percent.txt" and len(p["keys_sha256"]) == 64
    listing.write_text("class_0_0001.JPEG\nnope_1.JPEG\nnope_2\n")
    with pytest.raises(DatasetError, match=r"2 of 3 entries match no sample .*\['nope_1.JPEG', 'nope_2'\]"):
        data.split(ds, tmp_path / "lab2", keys_file=listing)


def test_ambiguous_basename_is_refused(tiny_dataset, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("img_001.jpg\n")  # in every class folder
    with pytest.raises(DatasetError, match="'img_001.jpg' matches several samples"):
        data.split(tiny_dataset, tmp_path / "lab", keys_file=listing)


def test_split_refusals(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of"):
        data.split(tiny_dataset, tmp_path / "a", shots=2, percent=10)
    with pytest.raises(ConfigError, match="exactly one of"):
        data.split(tiny_dataset, tmp_path / "a")
    with pytest.raises(DatasetError, match=r"'class_0' has 8, 'class_1' has 8, 'class_2' has 8"):
        data.split(tiny_dataset, tmp_path / "a", shots=6, val_per_class=3, val_out=tmp_path / "v")
    with pytest.raises(ConfigError, match="--val-per-class needs --val-out"):
        data.split(tiny_dataset, tmp_path / "a", shots=1, val_per_class=1)
    with pytest.raises(ConfigError, match=r"--percent must be a number in \(0, 100\]"):
        data.split(tiny_dataset, tmp_path / "a", percent=0)
    with pytest.raises(ConfigError, match="is the source"):
        data.split(tiny_dataset, tiny_dataset.root, shots=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        data.split(tiny_dataset, tmp_path / "full", shots=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written


# --------------------------------------------------------------------------------------------
# augmented views
# --------------------------------------------------------------------------------------------


def test_stable_seed_numbers_stay_those_of_view_seed_and_the_stream_seeds():
    """One 63-bit seed from sha256 of the "|"-joined items; the numbers are stored (caches hold boxes drawn
    from view_seed; big-endian as view_seed always was, little-endian as stream._seed_of draws its orders)."""
    key = "class_1/čaj_ünï"
    assert data.view_seed(7, key, 2) == data.stable_seed(7, key, 2, byteorder="big") == 4323056653568732928
    assert data.view_seed(0, "n01440764/x", 0) == 860899572560083462
    assert data.stable_seed(0, 1, "pass", 3, byteorder="little") == 8748180536400573909
    assert data.stable_seed(5, key, 2, "view", byteorder="little") == 1826889143102170420
    assert all(0 <= data.stable_seed(i, byteorder=order) < 2**63 for i in range(100) for order in ("big", "little"))


def test_view_params_match_torchvision_with_the_same_generator():
    for i in range(60):
        key, view, (w, h) = f"n01440764/img_{i}", i % 4, [(500, 375), (64, 640), (33, 31), (300, 10)][i % 4]
        torch.manual_seed(data.view_seed(7, key, view))  # the global RNG seeded as view_params seeds its own
        box = T.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.5, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        assert data.view_params(key, view, 7, w, h) == (*box, flip)


def test_view_params_are_order_independent_and_in_bounds():
    calls = [(f"k{i}", v) for i in range(50) for v in range(3)]
    forward = {c: data.view_params(c[0], c[1], 0, 400, 300) for c in calls}
    torch.manual_seed(123)
    torch.rand(17)  # global RNG state must not matter
    backward = {c: data.view_params(c[0], c[1], 0, 400, 300) for c in reversed(calls)}
    assert forward == backward
    assert data.view_params("k0", 0, 1, 400, 300) != forward[("k0", 0)]
    assert len(set(forward.values())) == len(calls)
    for top, left, h, w, flip in forward.values():
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.49 <= h * w / (400 * 300) <= 1.0 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert 50 <= sum(f for *_, f in forward.values()) <= 100  # p = 0.5 of 150
    # no box fits a 300x10 strip: central fallback, ratio clamped to 4/3
    assert data.view_params("strip", 0, 0, 300, 10)[:4] == (0, 143, 10, 13)


def test_center_view_params():
    assert data.center_view_params(50, 30, "squash") == (0, 0, 30, 50, False)
    assert data.center_view_params(50, 30, "longest") == (0, 0, 30, 50, False)
    assert data.center_view_params(50, 30, "shortest") == (0, 10, 30, 30, False)
    assert data.center_view_params(20, 33, "shortest") == (6, 0, 20, 20, False)
    with pytest.raises(ConfigError, match="resize_mode 'crop'"):
        data.center_view_params(20, 33, "crop")


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("width,height,size", [(53, 37, 24), (37, 53, 24), (500, 375, 224), (333, 500, 378), (20, 31, 32)])
def test_eval_view_is_open_clips_eval_transform_pixel_for_pixel(resize_mode, interpolation, width, height, size):
    """Non-square images, down- and upsampling: the evaluation view equals open_clip's eval preprocess exactly."""
    from open_clip.transform import image_transform

    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    theirs = image_transform(size, is_train=False, mean=mean, std=std, resize_mode=resize_mode, interpolation=interpolation)(image)
    ours = data.normalize(data.eval_view_uint8(image, size, interpolation, resize_mode), mean, std)
    assert ours.shape == (3, size, size)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    if resize_mode == "shortest" and (width, height) == (500, 375):  # the old crop-then-resize view differs
        box = data.center_view_params(width, height, "shortest")
        old = data.replay_view(image, box, size, interpolation, mean, std)
        assert (old - theirs).abs().max() > 0.05


@pytest.mark.parametrize("interpolation,flip", [("bicubic", True), ("bilinear", False)])
def test_replay_view_equals_torchvision(interpolation, flip):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    top, left, h, w, _ = data.view_params("a", 0, 0, 53, 37)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    x = data.replay_view(image, (top, left, h, w, flip), 24, interpolation, mean, std)
    y = TF.resized_crop(image, top, left, h, w, [24, 24], InterpolationMode(interpolation), antialias=True)
    y = TF.normalize(TF.to_tensor(TF.hflip(y) if flip else y), mean, std)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert torch.equal(x, y)
    gray = data.replay_view(image.convert("L"), (top, left, h, w, flip), 24, interpolation, (0.5,) * 3, (0.5,) * 3)
    assert gray.shape == (3, 24, 24) and torch.equal(gray[0], gray[1])


def _smooth_photo(width: int, height: int, fmt: str) -> bytes:
    """A smooth random image (so a downscaled decode is close to a full one), encoded as `fmt`."""
    rng = np.random.default_rng(1)
    low = Image.fromarray(rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    low.resize((width, height), Image.Resampling.BICUBIC).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def test_decode_view_keeps_small_boxes_exact():
    """A box that cannot lose a factor 2 decodes at full size: the view equals replay_view's."""
    blob = _smooth_photo(400, 300, "JPEG")
    params = (10, 20, 250, 300, True)
    image, box = data.decode_view(blob, "jpg", "shard 0 key 'a'", np.array(params, dtype=np.int32), 160)
    assert image.size == (400, 300) and image.mode == "RGB" and box == params
    full = data.decode_image(blob, "jpg", "x")
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    x = data.replay_view_uint8(image, box, 160, "bicubic")
    assert x.dtype == torch.uint8 and x.shape == (3, 160, 160)
    assert torch.equal(data.normalize(x, mean, std), data.replay_view(full, params, 160, "bicubic", mean, std))
    assert torch.equal(data.normalize(x[None], mean, std)[0], data.normalize(x, mean, std))  # batched too


def test_decode_view_downscales_large_jpegs_only():
    blob = _smooth_photo(1600, 1200, "JPEG")
    params = (100, 200, 900, 1000, False)  # short side 900 -> 32 px: libjpeg can decode at 1/8
    image, box = data.decode_view(blob, "jpg", "k", params, 32)
    assert image.size == (200, 150) and box == (12.5, 25.0, 112.5, 125.0, False)  # 1/8, sub-pixel
    drafted = data.replay_view_uint8(image, box, 32, "bicubic").float()
    exact = data.replay_view_uint8(data.decode_image(blob, "jpg", "k"), params, 32, "bicubic").float()
    assert (drafted - exact).abs().mean() < 1.5  # the same region: resampling noise only (of 255)
    # no more reduction than the box allows: 900/112 = 8.04 -> 1/8, 900/113 = 7.96 -> 1/4 (400x300)
    assert data.decode_view(blob, "jpg", "k", params, 113)[0].size == (400, 300)
    # PNGs (no DCT scaling) decode at full size with the box unchanged
    image, box = data.decode_view(_smooth_photo(1600, 1200, "PNG"), "png", "k", params, 32)
    assert image.size == (1600, 1200) and box == params


def test_decode_view_errors_name_the_sample():
    blob = _smooth_photo(80, 40, "JPEG")
    with pytest.raises(DatasetError, match=r"shard 3 key 'k1': view box .* outside the 80x40 image"):
        data.decode_view(blob, "jpg", "shard 3 key 'k1'", (0, 0, 41, 10, 0), 8)
    with pytest.raises(DatasetError, match=r"shard 3 key 'k1': cannot decode the jpg image"):
        data.decode_view(blob[:50], "jpg", "shard 3 key 'k1'", (0, 0, 10, 10, 0), 8)


def test_replay_view_refuses_bad_boxes_and_interpolations():
    image = Image.new("RGB", (20, 10))
    with pytest.raises(DatasetError, match="outside the 20x10 image"):
        data.replay_view(image, (5, 0, 10, 10, 0), 8, "bicubic", (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match="unknown interpolation 'cubic'"):
        data.replay_view(image, (0, 0, 10, 10, 0), 8, "cubic", (0.5,) * 3, (0.5,) * 3)


# --------------------------------------------------------------------------------------------
# the command line, end to end
# --------------------------------------------------------------------------------------------


def _dho(*args, cwd):
    exe = Path(sys.executable).parent / "dho"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_prepare_index_split(odd_image_folder, tmp_path):
    bad = _dho("prepare", odd_image_folder, "--out", "ds", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    error = bad.stderr.splitlines()[-1]  # progress lines come first
    assert error.startswith("error: ") and "broken.jpg" in error and "notes.jpg" in error and "--skip-bad" in error
    ok = _dho("prepare", odd_image_folder, "--out", "ds", "--shard-size", "5", "--skip-bad", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 18 samples in 4 shards, 3 classes" in ok.stdout
    ds = data.Dataset.open(tmp_path / "ds")
    (tmp_path / "classes.txt").write_text("\n".join(ds.classnames) + "\n")
    shards = sorted((tmp_path / "ds").glob("shard-*.tar"))
    idx = _dho("index", *shards, "--classnames", "classes.txt", "--out", "idx", cwd=tmp_path)
    assert idx.returncode == 0, idx.stderr
    assert "indexed 18 samples in 4 shards" in idx.stdout
    assert data.Dataset.open(tmp_path / "idx").fingerprint == ds.fingerprint
    sp = _dho("split", "ds", "--out", "lab", "--shots", "1", "--val-per-class", "1", "--val-out", "val", "--seed", "5", cwd=tmp_path)
    assert sp.returncode == 0, sp.stderr
    assert "labeled split: 3 samples" in sp.stdout and "validation split: 3 samples" in sp.stdout
    lab = data.Dataset.open(tmp_path / "lab", verify=True)
    assert sorted(lab.labels.tolist()) == [0, 1, 2] and lab.manifest["provenance"]["seed"] == 5


def test_split_copies_the_chosen_samples_bytes_and_matches_the_rewriting_path(tiny_dataset, tmp_path):
    """With byte spans in the manifest, split reads only the chosen samples and copies their tar members:
    the same shards, byte for byte, as decoding every shard and re-writing the samples; a shard that
    changed under the manifest is a one-line error."""
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(tiny_dataset.keys[::3]) + "\n")
    copied, _ = data.split(tiny_dataset, tmp_path / "copied", keys_file=keys, shard_size=3)
    assert tiny_dataset.columns.spans is not None and copied.columns.spans is not None
    plain = _without_spans(tiny_dataset.root, tmp_path / "nospans")
    assert data.Dataset.open(plain).columns.spans is None
    rewritten, _ = data.split(plain, tmp_path / "rewritten", keys_file=keys, shard_size=3)
    assert [s.sha256 for s in copied.shards] == [s.sha256 for s in rewritten.shards]
    assert copied.keys == rewritten.keys == tiny_dataset.keys[::3] and copied.fingerprint == rewritten.fingerprint
    assert np.array_equal(copied.columns.spans, rewritten.columns.spans)
    for s in copied.shards:  # plain tarfile and the spans agree on where each sample starts
        with tarfile.open(s.path) as tf:
            starts = [t.offset for t in tf.getmembers() if t.name.endswith(".cls")]
        assert starts == copied.columns.spans[s.offset:s.offset + s.count, 0].tolist()
    moved = shutil.copytree(tiny_dataset.root, tmp_path / "moved")
    first = data.Dataset.open(moved).shards[0].path
    first.write_bytes(b"\0" * 512 + first.read_bytes()[:-512])  # every sample shifted by one block (same size: padding cut)
    with pytest.raises(DatasetError, match=r"shard 0 .*: sample '[^']+' is not at bytes 0-\d+ where the manifest puts it"):
        data.split(moved, tmp_path / "bad", keys_file=keys)


V2_DATASET = Path(__file__).parent / "assets" / "v2-dataset"


def test_a_v2_dataset_reads_with_the_checks_its_manifest_allows(tmp_path):
    """tests/assets/v2-dataset (written by dho 0.1.0: no digests, no shard sizes, no column checks) opens and reads;
    a split of it is version 3, its digests computed from the copied members (the rewriting path gives the same);
    a label edited in its labels column is refused by split (the copied sample's label member contradicts it),
    and a shard rewritten without one label member by every reader."""
    root = shutil.copytree(V2_DATASET, tmp_path / "v2")
    ds = data.Dataset.open(root, verify=True)
    assert ds.version == 2 and ds.columns.digests is None and ds.shards[0].size is None
    assert [s.key for s in _all_samples(ds, decode=True)] == ds.keys
    copied, _ = data.split(ds, tmp_path / "copied", percent=100)
    rewritten, _ = data.split(_without_spans(root, tmp_path / "nospans"), tmp_path / "rewritten", percent=100)
    members = [data.sample_digest(m) for s in copied.shards for m in data.tar_samples(s.path)]
    assert copied.version == 3 and copied.columns.digests.tolist() == members == rewritten.columns.digests.tolist()
    assert [s.size for s in copied.shards] == [s.path.stat().st_size for s in copied.shards]
    labels = root / ds.manifest["columns"]["labels"]
    original = np.load(labels)
    edited = original.copy()
    edited[2] = 1 - edited[2]
    np.save(labels, edited)
    sp = _dho("split", root, "--out", tmp_path / "bad", "--percent", "100", cwd=tmp_path)
    assert sp.returncode == 2 and not (tmp_path / "bad").exists(), sp.stderr
    assert re.fullmatch(rf"error: shard 0 \(.*shard-000000\.tar\): sample '{ds.keys[2]}' has label b'{1 - edited[2]}' but the manifest "
                        rf"says {edited[2]}; the shard changed since the manifest was written: [^\n]*\n", sp.stderr), sp.stderr
    np.save(labels, 1 - original)  # another dataset's labels column of the same length: every label contradicts
    with pytest.raises(DatasetError, match=r"has label b'\d' but the manifest says \d"):
        data.split(root, tmp_path / "bad", percent=100)
    np.save(labels, original)
    shard = ds.shards[1].path
    with tarfile.open(shard) as tf:  # shard 1 without the label member of its first sample
        kept = [(t, tf.extractfile(t).read()) for t in tf.getmembers()][1:]
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tf:
        for t, payload in kept:
            tf.addfile(t, io.BytesIO(payload))
    with pytest.raises(DatasetError, match=rf"^shard 1 \(.*\): sample '{ds.keys[4]}' has no 'cls' member but the manifest says label \d"):
        list(data.iter_shard(data.Dataset.open(root), 1, decode=False))


def test_text_files_with_a_bom_read_as_without(tiny_dataset, tmp_path):
    """A class names file, a keys file and a template file saved with a UTF-8 byte-order mark (and CRLF) read as
    the same file without one; a file that is not UTF-8 is a one-line error naming it."""
    from dho.templates import resolve_templates

    bom = b"\xef\xbb\xbf"
    (tmp_path / "classes.txt").write_bytes(bom + b"class_0\r\nclass_1\r\nclass_2\r\n")
    assert data.read_class_file(tmp_path / "classes.txt") == (["class_0", "class_1", "class_2"], None)
    indexed = data.index([s.path for s in tiny_dataset.shards], tmp_path / "classes.txt", tmp_path / "idx")
    assert indexed.classnames == tiny_dataset.classnames and indexed.fingerprint == tiny_dataset.fingerprint
    (tmp_path / "keys.txt").write_bytes(bom + "\r\n".join(tiny_dataset.keys[:4]).encode())
    lab, _ = data.split(tiny_dataset, tmp_path / "lab", keys_file=tmp_path / "keys.txt")
    assert sorted(lab.keys) == sorted(tiny_dataset.keys[:4])
    (tmp_path / "templates.txt").write_bytes(bom + b"a photo of a {}.\r\nart of a {}.\r\n")
    assert resolve_templates(str(tmp_path / "templates.txt")) == ["a photo of a {}.", "art of a {}."]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"^class names file .*latin1\.txt: not UTF-8 text \(byte 3 is b'\\xe9'\); save it as UTF-8$"):
        data.read_class_file(tmp_path / "latin1.txt")


def test_a_tar_with_a_samples_members_apart_names_the_cause(tmp_path):
    """i0.cls, i1.cls, i0.jpg, i1.jpg: webdataset would see four samples; index says the members are not adjacent."""
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(jpg, format="JPEG")
    with tarfile.open(tmp_path / "mixed.tar", "w") as tf:
        for name, payload in (("i0.cls", b"0"), ("i1.cls", b"1"), ("i0.jpg", jpg.getvalue()), ("i1.jpg", jpg.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match=r"mixed\.tar: the members of sample 'i0' are not adjacent \('i0\.jpg' comes after "
                                           r"members of 'i1'\); a sample's members must follow one another"):
        data.index([str(tmp_path / "mixed.tar")], tmp_path / "classes.txt", tmp_path / "out")


def test_prepare_lists_a_dangling_symlink_in_ignored(tmp_path):
    src = make_image_folder(tmp_path / "images", num_classes=2, per_class=2)
    os.symlink(tmp_path / "gone.jpg", src / "class_0" / "link.jpg")
    ds = data.prepare(src, tmp_path / "ds", shard_size=4)
    assert ds.num_samples == 4
    assert {"file": "class_0/link.jpg", "reason": f"a symbolic link to {tmp_path / 'gone.jpg'}, which does not exist; "
            "fix or remove the link"} in ds.manifest["ignored"]
