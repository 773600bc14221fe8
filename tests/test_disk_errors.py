"""Writes on a full or read-only disk, and a stray torchrun environment: exit 2 with one `error:` line naming the
output and the reason, no traceback, nothing half-written left (each disk is a tmpfs mounted for the test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_student import make_trained_run

from dho import tip_adapter
from dho.atomic import write_atomic
from dho.errors import ConfigError

DHO = str(Path(sys.executable).parent / "dho")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
    return make_trained_run(tmp_path_factory.mktemp("disk_runs") / "run", tiny_dataset)


def _dho(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([DHO, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env))


def _one_error_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr
    return done.stderr


def _left(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if p.name != "filler")


def test_prepare_features_and_exports_on_a_full_disk(small_disk, tiny_dataset, trained_run):
    disk = small_disk("1m", full=True)
    _one_error_line(_dho("prepare", tiny_dataset.root.parent / "images", "--out", disk / "ds"),
                    f"cannot write {disk / 'ds'}: no space left on the device")
    _one_error_line(_dho("features", trained_run, "--data", tiny_dataset.root, "--out", disk / "f.npy", "--device", "cpu",
                         "--workers", "0"), f"cannot write {disk / 'f.npy'}: no space left on the device")
    for fmt, name in (("pt2", "m.pt2"), ("torchscript", "m.ts")):  # torch's writers used to abort (exit 134)
        _one_error_line(_dho("export", trained_run, "--out", disk / name, "--format", fmt),
                        f"cannot write {disk / name}: no space left on the device")
    assert _left(disk) == []  # no output, no staging folder


def test_a_read_only_disk_is_named(small_disk, trained_run):
    disk = small_disk("1m", read_only=True)
    _one_error_line(_dho("export", trained_run, "--out", disk / "m.pt2"), f"cannot write {disk / 'm.pt2'}: read-only file system")
    with pytest.raises(ConfigError, match=rf"^cannot write {disk}/t\.pt: read-only file system; write to a folder you can write to$"):
        tip_adapter.save({"alpha": 1.0}, disk / "t.pt")  # what `dho tip-adapter --out` calls


def test_a_writer_that_hides_the_os_error_is_diagnosed(small_disk):
    """torch.save says 'unexpected pos' when the disk fills: the folder is asked, and the old file stays."""
    disk = small_disk("1m")
    write_atomic(disk / "c.pt", lambda part: torch.save({"w": torch.zeros(10)}, part))
    before = (disk / "c.pt").read_bytes()
    with pytest.raises(ConfigError, match=rf"^cannot write {disk}/c\.pt: no space left on the device \(0\.0 MiB free there\)"):
        write_atomic(disk / "c.pt", lambda part: torch.save({"w": torch.zeros(300_000)}, part))
    assert (disk / "c.pt").read_bytes() == before and _left(disk) == ["c.pt"]


@pytest.mark.parametrize("env, said", [
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 in the environment is not below WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 in the environment but MASTER_ADDR and MASTER_PORT not set"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' in the environment is not a whole number >= 1"),
    ({"RANK": "abc"}, "RANK='abc' in the environment is not a whole number >= 0"),
])
def test_a_stray_torchrun_environment_is_one_line(env, said, monkeypatch):
    from dho.devices import resolve_device, setup_ranks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"^{said.replace('(', '[(]')}"):
        setup_ranks(resolve_device("cpu"))
