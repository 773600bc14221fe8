"""Bad inputs through the real CLI: one line on stderr naming the problem, exit 2, no traceback, no output
that looks complete, and nothing of the user's touched.

Most cases call `dho.cli.main()` in this process with the arguments a user would type (the console
script is exactly that call); a few go through the installed `dho` executable, to cover the process
itself (worker errors, the exit status).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder

from dho import cli, data
from dho.precompute import precompute

DHO = str(Path(sys.executable).parent / "dho")


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_teacher_ckpt) -> dict:
    """src images, a dataset, its labeled split + val split, caches, a finished run, an unlabeled-only and an
    other-class dataset. Read-only: cases write only under their own fresh output paths."""
    root = tmp_path_factory.mktemp("bad")
    src = make_image_folder(root / "src", num_classes=3, per_class=6)
    ds = data.prepare(src, root / "ds", shard_size=6)
    lab, val = data.split(ds, root / "lab", shots=2, seed=0, val_per_class=2, val_out=root / "val", shard_size=6)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0, batch_size=16)
    precompute(ds.root, root / "ds.zarr", **teacher)
    precompute(lab.root, root / "lab.zarr", **teacher)
    other_src = make_image_folder(root / "other_src", num_classes=2, per_class=3, seed=1)
    (other_src / "class_1").rename(other_src / "zebra")  # class_0 alone would be a subset, which evaluate scores
    other = data.prepare(other_src, root / "other", shard_size=6)
    shards = sorted(str(p) for p in ds.root.glob("*.tar"))
    unl = root / "unl"
    unl.mkdir()
    (root / "classes.txt").write_text("\n".join(ds.classnames) + "\n")
    for i, shard in enumerate(shards):  # the same shards without labels: an all-unlabeled dataset
        import tarfile

        with tarfile.open(shard) as tin, tarfile.open(unl / f"u-{i}.tar", "w") as tout:
            for m in tin.getmembers():
                if not m.name.endswith(".cls"):
                    tout.addfile(m, tin.extractfile(m))
    data.index(sorted(unl.glob("*.tar")), root / "classes.txt", unl)
    run = root / "run"
    base = ["--labeled", str(lab.root), "--labeled-cache", str(root / "lab.zarr"), "--unlabeled", str(ds.root),
            "--unlabeled-cache", str(root / "ds.zarr"), "--student", "resnet-tiny", "--epochs", "1", "--batch-size", "6",
            "--workers", "0", "--device", "cpu", "--log-every", "1"]
    code, err = _cli(["distill", *base, "--out", str(run)])
    assert code == 0, err
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("precious")
    teacher_args = ["--model", str(TINY_CLIP_CONFIG), "--pretrained", str(tiny_teacher_ckpt), "--device", "cpu", "--workers", "0"]
    return {"root": root, "src": src, "ds": ds.root, "lab": lab.root, "val": val.root, "other": other.root, "unl": unl,
            "run": run, "base": base, "teacher": teacher_args, "shards": shards}


def _cli(args: list[str]) -> tuple[int, str]:
    """Run `dho ARGS` in this process as the console script does -> (exit status, stderr)."""
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["dho", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, err.getvalue()


# (id, arguments with {placeholders}, a regex the one error line must match)
CASES = [
    # --- data layer: prepare / index / split
    ("prepare-out-is-src", "prepare {src} --out {src} --overwrite", r"--out .* is the source"),
    ("prepare-out-inside-src", "prepare {src} --out {src}/sub", r"is inside the source"),
    ("prepare-out-contains-src", "prepare {src} --out {root} --overwrite", r"contains the source"),
    ("prepare-overwrite-foreign", "prepare {src} --out {root}/mine --overwrite", r"does not hold a dataset .* left alone"),
    ("prepare-not-empty", "prepare {src} --out {root}/mine", r"is not empty; .* --overwrite"),
    ("prepare-shard-size-0", "prepare {src} --out {new} --shard-size 0", r"--shard-size must be an integer >= 1; got 0"),
    ("prepare-shard-size-neg", "prepare {src} --out {new} --shard-size -3", r"--shard-size must be an integer >= 1"),
    ("prepare-seed-neg", "prepare {src} --out {new} --seed -1", r"--seed must be an integer in \[0, 4294967295\]"),
    ("prepare-no-src", "prepare {root}/nothing --out {new}", r"is not a folder"),
    ("prepare-bad-type", "prepare {src} --out {new} --shard-size ten", r"Invalid value for '--shard-size'"),
    ("prepare-class-folders-alone", "prepare {src} --out {new} --class-folders index", r"--class-folders index says what a folder names in the --classes-of list; give --classes-of"),
    ("import-coop-shard-size-0", "import-coop oxford_pets {root}/nothing --out {new} --shard-size 0", r"--shard-size must be an integer >= 1; got 0"),
    ("index-no-classnames", "index {shard0} --classnames {root}/none.txt --out {new}", r"class names file .* not found"),
    ("index-foreign-manifest", "index {shard0} --classnames {root}/classes.txt --out {root}/foreign --overwrite",
     r"is not a dho manifest; it is left alone"),
    ("index-pipe-fails", "index pipe:false --classnames {root}/classes.txt --out {new}",
     r"shard pipe:false: the command exited with status 1; run it in a shell"),
    ("index-bad-range", "index {root}/s-{{1..x}}.tar --classnames {root}/classes.txt --out {new}",
     r"shard pattern '.*/s-\{1\.\.x\}\.tar': \{1\.\.x\} is not a range of integers"),
    ("index-bare-s3-url", "index s3://bucket/s-0.tar --classnames {root}/classes.txt --out {new}",
     r"s3:// URLs are read through a command .* 'pipe:aws s3 cp s3://bucket/s-0\.tar -'"),
    ("split-shots-0", "split {ds} --out {new} --shots 0", r"--shots must be an integer >= 1"),
    ("split-percent-0", "split {ds} --out {new} --percent 0", r"--percent must be a number in \(0, 100\]"),
    ("split-percent-150", "split {ds} --out {new} --percent 150", r"--percent must be a number in \(0, 100\]"),
    ("split-percent-nan", "split {ds} --out {new} --percent nan", r"--percent must be a number"),
    ("split-val-neg", "split {ds} --out {new} --shots 1 --val-per-class -1", r"--val-per-class must be an integer >= 0"),
    ("split-into-source", "split {ds} --out {ds}/lab --shots 1", r"is inside the source"),
    ("split-sampler-unknown", "split {ds} --out {new} --shots 1 --sampler torch", r"--sampler must be one of numpy, coop; got 'torch'"),
    ("split-coop-percent", "split {ds} --out {new} --percent 10 --sampler coop", r"--sampler coop draws K shots .* give --shots K"),
    ("split-per-class-shots", "split {ds} --out {new} --shots 1 --per-class equal", r"--per-class sets how --percent P .*; give --percent P"),
    ("split-after-numpy", "split {ds} --out {new} --shots 1 --after {lab}", r"--after continues .*; give it with --sampler coop"),
    ("split-after-not-coop", "split {ds} --out {new} --shots 1 --sampler coop --after {lab}", r"--after .*: not a labeled split made by"),
    ("split-overwrite-foreign", "split {ds} --out {root}/mine --shots 1 --overwrite", r"does not hold a dataset"),
    # --- teacher cache
    ("pre-views-0", "precompute-teacher {ds} --out {new} {teacher} --views 0", r"--views must be an integer >= 1; got 0"),
    ("pre-batch-0", "precompute-teacher {ds} --out {new} {teacher} --batch-size 0", r"--batch-size must be an integer >= 1"),
    ("pre-eta-0", "precompute-teacher {ds} --out {new} {teacher} --eta 0", r"--eta must be a number > 0; got 0"),
    ("pre-eta-nan", "precompute-teacher {ds} --out {new} {teacher} --eta nan", r"--eta must be a number > 0; got nan"),
    ("pre-zeta-neg", "precompute-teacher {ds} --out {new} {teacher} --zeta -1", r"--zeta must be a number > 0"),
    ("pre-topk-neg", "precompute-teacher {ds} --out {new} {teacher} --topk -1", r"--topk must be an integer >= 1"),
    ("pre-workers-neg", "precompute-teacher {ds} --out {new} {teacher} --workers -1", r"--workers must be an integer >= 0"),
    ("pre-seed-neg", "precompute-teacher {ds} --out {new} {teacher} --seed -1", r"--seed must be an integer in"),
    ("pre-device-gpu7", "precompute-teacher {ds} --out {new} {teacher} --device gpu7", r"--device must be auto .*; got 'gpu7'"),
    ("pre-device-tpu", "precompute-teacher {ds} --out {new} {teacher} --device tpu", r"--device must be auto"),
    ("pre-device-cuda", "precompute-teacher {ds} --out {new} {teacher} --device cuda", r"no CUDA device is visible"),
    ("pre-garbage-weights", "precompute-teacher {ds} --out {new} --model {tiny} --pretrained {root}/garbage.pt --device cpu",
     r"could not build teacher .*garbage.pt"),
    ("pre-missing-weights", "precompute-teacher {ds} --out {new} --model {tiny} --pretrained {root}/missing.pt --device cpu",
     r"checkpoint file not found"),
    ("pre-precision", "precompute-teacher {ds} --out {new} {teacher} --precision fp8", r"--precision must be one of"),
    ("pre-std-0", "precompute-teacher {ds} --out {new} {teacher} --std 0,1,1", r"--std must be a number > 0"),
    ("pre-into-foreign-folder", "precompute-teacher {ds} --out {root}/mine {teacher}", r"no teacher cache here"),
    ("pre-classifier-norm", "precompute-teacher {ds} --out {new} {teacher} --text-classifier-norm unit",
     r"--text-classifier-norm must be one of renormalize, mean"),
    # --- students
    ("dist-epochs-0", "distill {base} --out {new} --epochs 0", r"--epochs must be an integer >= 1; got 0"),
    ("dist-epochs-neg", "distill {base} --out {new} --epochs -2", r"--epochs must be an integer >= 1"),
    ("dist-max-steps-neg", "distill {base} --out {new} --max-steps -1", r"--max-steps must be an integer >= 1"),
    ("dist-lambda-2", "distill {base} --out {new} --lambda 2", r"--lambda must be a number in \[0, 1\]"),
    ("dist-alpha-5", "distill {base} --out {new} --alpha 5", r"--alpha must be a number in \[0, 1\]"),
    ("dist-beta-0", "distill {base} --out {new} --beta 0", r"--beta must be a number > 0"),
    ("dist-batch-0", "distill {base} --out {new} --batch-size 0", r"--batch-size must be an integer >= 1"),
    ("dist-accum-0", "distill {base} --out {new} --accum-steps 0", r"--accum-steps must be an integer >= 1"),
    ("dist-ckpt-every-0", "distill {base} --out {new} --checkpoint-every 0", r"--checkpoint-every must be an integer >= 1"),
    ("dist-log-every-0", "distill {base} --out {new} --log-every 0", r"--log-every must be an integer >= 1"),
    ("dist-window-0", "distill {base} --out {new} --window 0", r"--window must be an integer >= 1"),
    ("dist-lr-neg", "distill {base} --out {new} --lr -1", r"--lr must be a number > 0"),
    ("dist-lr-nan", "distill {base} --out {new} --lr nan", r"--lr must be a number > 0; got nan"),
    ("dist-wd-neg", "distill {base} --out {new} --weight-decay -5", r"--weight-decay must be a number >= 0"),
    ("dist-eta-0", "distill {base} --out {new} --eta 0", r"--eta must be a number > 0"),
    ("dist-workers-neg", "distill {base} --out {new} --workers -1", r"--workers must be an integer >= 0"),
    ("dist-seed-neg", "distill {base} --out {new} --seed -1", r"--seed must be an integer in"),
    ("dist-device-gpu7", "distill {base} --out {new} --device gpu7", r"--device must be auto"),
    ("dist-method", "distill {base} --out {new} --method sho", r"--method must be one of"),
    ("dist-val-other-classes", "distill {base} --out {new} --val {other}", r"--val .* 1 class name\(s\) the model does not know \(first: 'zebra'"),
    ("dist-val-no-labels", "distill {base} --out {new} --val {unl}", r"--val .* no labeled samples"),
    ("dist-config-malformed", "distill {base} --out {new} --config {root}/malformed.yaml", r"not valid YAML at line"),
    ("dist-config-ill-typed", "distill {base} --out {new} --config {root}/ill-typed.yaml", r"--lr must be a number; got 'many'"),
    ("dist-config-unknown", "distill {base} --out {new} --config {root}/unknown.yaml", r"unknown option keys \['epochz'\]"),
    ("dist-config-twice", "distill {base} --out {new} --config {root}/twice.yaml", r"option 'lr' is given twice \(lines 1 and 3\); keep one"),
    ("dist-config-spellings", "distill {base} --out {new} --config {root}/spellings.yaml", r"'batch-size' and 'batch_size' are one option; keep one"),
    ("dist-into-foreign", "distill {base} --out {root}/mine", r"holds files but no dho run"),
    ("dist-finished-run", "distill {base} --out {run}", r"already holds a finished run"),
    ("dist-resume-nothing", "distill --resume {root}/nothing", r"no run there"),
    ("dist-resume-workers", "distill {base} --out {run} --resume --workers 1", r"changed options \(workers: 0 -> 1\)"),
    ("dist-student", "distill {base} --out {new} --student resnet9000", r"unknown student 'resnet9000'"),
    # --- evaluate / predict / export / cache-info
    ("eval-alpha-5", "evaluate {run} --data {val} --alpha 5", r"--alpha must be a number in \[0, 1\]"),
    ("eval-beta-0", "evaluate {run} --data {val} --beta 0", r"--beta must be a number > 0"),
    ("eval-batch-0", "evaluate {run} --data {val} --batch-size 0", r"--batch-size must be an integer >= 1"),
    ("eval-workers-neg", "evaluate {run} --data {val} --workers -1", r"--workers must be an integer >= 0"),
    ("eval-device-tpu", "evaluate {run} --data {val} --device tpu", r"--device must be auto"),
    ("eval-other-classes", "evaluate {run} --data {other}", r"1 class name\(s\) the model does not know \(first: 'zebra'"),
    ("predict-topk-0", "predict {run} {src}/class_0 --topk 0", r"--topk must be an integer >= 1"),
    ("predict-missing", "predict {run} {root}/nothing.jpg", r"image .*nothing.jpg not found"),
    ("predict-empty-folder", "predict {run} {root}/empty", r"folder without image files"),
    ("export-into-folder", "export {run} --out {root}/mine", r"is a folder; give the file"),
    ("cache-info-not-a-cache", "cache-info {root}/mine", r"no teacher cache here"),
    ("unknown-option", "distill {base} --out {new} --epocs 3", r"No such option: --epocs"),
]


def _expand(template: str, w: dict, new: Path) -> list[str]:
    values = {k: str(v) for k, v in w.items() if isinstance(v, (str, Path))}
    values.update(new=str(new), shard0=w["shards"][0], tiny=str(TINY_CLIP_CONFIG))
    args = []
    for token in template.split():
        if token == "{base}":
            args += w["base"]
        elif token == "{teacher}":
            args += w["teacher"]
        else:
            args.append(token.format(**values))
    return args


@pytest.fixture(scope="module")
def prepared(w) -> dict:
    root = w["root"]
    (root / "malformed.yaml").write_text("epochs: [1\n lr: :\n")
    (root / "ill-typed.yaml").write_text("lr: many\n")
    (root / "unknown.yaml").write_text("epochz: 3\n")
    (root / "twice.yaml").write_text("lr: 0.001\nepochs: 1\nlr: 0.5\n")
    (root / "spellings.yaml").write_text("batch-size: 4\nbatch_size: 8\n")
    (root / "empty").mkdir(exist_ok=True)
    (root / "foreign").mkdir(exist_ok=True)
    (root / "foreign" / "manifest.json").write_text('{"name": "someone else\'s manifest"}')
    return w


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_the_table_has_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,template,expected", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_exit_2_and_leaves_nothing(prepared, tmp_path, name, template, expected):
    import re

    w = prepared
    before = _snapshot(w["root"])
    new = tmp_path / "out"
    code, err = _cli(_expand(template, w, new))
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert re.search(expected, lines[0]), lines[0]
    # nothing half-made that looks complete, nothing of the fixture (the user's files) changed
    assert not any(new.rglob("manifest.json")) and not any(new.rglob("zarr.json")) and not any(new.rglob("model.pt"))
    assert _snapshot(w["root"]) == before
    assert (w["root"] / "mine" / "thesis.tex").read_text() == "precious"


def test_the_installed_command_prints_one_line_and_exits_2(prepared, tmp_path):
    w = prepared
    for args in (["prepare", str(w["src"]), "--out", str(w["src"]), "--overwrite"],
                 ["distill", *w["base"], "--out", str(tmp_path / "x"), "--lr", "nan"],
                 ["distill", "--epochs", "abc"]):
        proc = subprocess.run([DHO, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_an_error_in_a_dataloader_worker_is_one_line(prepared, tmp_path):
    """A damaged cache read inside a DataLoader worker reaches the user as the cache's own message."""
    w = prepared
    damaged = tmp_path / "ds.zarr"
    shutil.copytree(w["root"] / "ds.zarr", damaged)
    chunk = damaged / "probs" / "c" / "0" / "0" / "0"  # view 0's Zarr shard (all shards of this tiny set)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    args = [*w["base"], "--unlabeled-cache", str(damaged), "--workers", "2", "--out", str(tmp_path / "run")]
    proc = subprocess.run([DHO, "distill", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr, proc.stderr
    assert re.search(r"array 'probs', view 0, shard \d", err[0]) and "damaged" in err[0] and "lower --lr" not in err[0]
    assert not (tmp_path / "run" / "model.pt").exists()


def test_worker_unwrapping_keeps_the_message():
    e = RuntimeError("Caught CacheError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                     "  File \"x.py\", line 1\nbuiltins.RuntimeError: the cache is damaged")
    assert cli.one_line(e) == "the cache is damaged"
    assert cli.one_line(ValueError("two\nlines")) == "two lines"


def test_disk_full_and_read_only_outputs_are_one_line(prepared, tmp_path, monkeypatch):
    import errno

    w = prepared
    for err_no in (errno.ENOSPC, errno.EROFS):
        def boom(*a, **k):
            raise OSError(err_no, {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}[err_no],
                          str(tmp_path / "full" / "shard-000000.tar"))

        monkeypatch.setattr(data, "prepare", boom)
        code, err = _cli(["prepare", str(w["src"]), "--out", str(tmp_path / "full")])
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"cannot write {tmp_path / 'full' / 'shard-000000.tar'}" in err and "free disk space or choose a writable" in err


def _damaged_copy(w: dict, out: Path, how: str) -> Path:
    """A copy of the fixture's dataset with every shard (or its labels column) damaged as `how` says."""
    import json
    import tarfile

    import numpy as np

    shutil.copytree(w["ds"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    if how == "column":  # another labels column of the right size (each label moved one row)
        labels = out / manifest["columns"]["labels"]
        np.save(labels, np.roll(np.load(labels), 1))
        return out
    for entry in manifest["shards"]:
        shard = out / entry["path"]
        if how == "append":
            with open(shard, "ab") as f:
                f.write(b"\0")
            continue
        with tarfile.open(shard) as tf:  # one bit of the first image member's bytes
            image = next(t for t in tf.getmembers() if t.name.endswith(".jpg"))
        raw = bytearray(shard.read_bytes())
        raw[image.offset_data + image.size // 2] ^= 0x01
        shard.write_bytes(bytes(raw))
    return out


DAMAGE = {"flip": r"shard \d+ \(.*shard-\d+\.tar\): sample '[^']+' does not match its digest in the manifest",
          "append": r"shard \d+ \(.*shard-\d+\.tar\): is \d+ bytes but the manifest says \d+; the shard changed",
          "column": r"manifest\.json: its labels column manifest\.\w+\.labels\.npy does not match the manifest's crc32"}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_dataset_changed_after_it_was_written_is_refused_by_every_reader(prepared, tmp_path, how):
    """One flipped bit in an image, one byte appended to a shard, a column file replaced: split, precompute-teacher,
    distill (the unlabeled stream; the dataset's cache still matches its stored fingerprint) and evaluate each
    stop with one line naming the shard and sample (or the column); no output looks complete."""
    w = prepared
    bad = _damaged_copy(w, tmp_path / "bad", how)
    distill = [*w["base"], "--out", str(tmp_path / "run")]
    distill[distill.index("--unlabeled") + 1] = str(bad)
    commands = {"split": ["split", bad, "--out", tmp_path / "lab", "--percent", "100"],
                "precompute-teacher": ["precompute-teacher", bad, "--out", tmp_path / "c.zarr", *w["teacher"], "--views", "1"],
                "distill": ["distill", *distill],
                "evaluate": ["evaluate", w["run"], "--data", bad, "--workers", "0", "--device", "cpu"]}
    for name, args in commands.items():
        code, err = _cli(args)
        errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]  # after the commands' notes
        assert code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, (name, code, err)
        assert re.search(DAMAGE[how], errors[0]), (name, errors[0])
    assert not (tmp_path / "lab" / "manifest.json").exists() and not (tmp_path / "run" / "model.pt").exists()
    if (tmp_path / "c.zarr").exists():  # a store the next run resumes, never a complete one
        from dho.cache import TeacherCache

        assert not TeacherCache.open(tmp_path / "c.zarr").is_complete()
