"""A preemptible `dho distill` as a SLURM user meets it: pipelines/slurm/distill.sbatch, run with a stand-in
`scontrol` on PATH, stopped (SIGUSR1 to the batch script, SIGTERM to every process), requeued and rerun with the
same command line until it finishes bit-identical to an uninterrupted run; and what `--resume auto` decides for
each state of a run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dho import data
from dho.cli import app
from dho.distill import DistillConfig, distill
from dho.errors import ConfigError
from dho.precompute import precompute
from dho.students import load_student
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder

SBATCH = Path(__file__).resolve().parents[1] / "pipelines" / "slurm" / "distill.sbatch"
JOB_ID = "4242"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher_ckpt):  # noqa: F811
    """A 4-class dataset (24 images), its 2-shot labeled split and their caches (tiny-clip teacher, 2 views)."""
    root = tmp_path_factory.mktemp("requeue")
    full = data.prepare(make_image_folder(root / "images", num_classes=4, per_class=6), root / "full", shard_size=6)
    labeled, _ = data.split(full, root / "labeled", shots=2, seed=0, shard_size=4)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0, batch_size=16)
    precompute(full.root, root / "full.zarr", **teacher)
    precompute(labeled.root, root / "labeled.zarr", **teacher)
    return root


def _options(world: Path, run: Path) -> list[str]:
    """The job's `dho distill` options: 3 epochs of 6 steps, a checkpoint every 2, two DataLoader workers."""
    return ["--labeled", str(world / "labeled"), "--labeled-cache", str(world / "labeled.zarr"),
            "--unlabeled", str(world / "full"), "--unlabeled-cache", str(world / "full.zarr"), "--student", "resnet-tiny",
            "--out", str(run), "--epochs", "3", "--batch-size", "4", "--lr", "3e-3", "--device", "cpu", "--seed", "0",
            "--workers", "2", "--checkpoint-every", "2", "--log-every", "1"]


def _cfg(world: Path, run: Path, **kw) -> DistillConfig:
    base = dict(labeled=str(world / "labeled"), labeled_cache=str(world / "labeled.zarr"), unlabeled=str(world / "full"),
                unlabeled_cache=str(world / "full.zarr"), student="resnet-tiny", out=str(run), epochs=1, batch_size=4,
                lr=3e-3, workers=0, device="cpu", log_every=1, checkpoint_every=2)
    return DistillConfig(**{**base, **kw})


def _job_env(tmp_path: Path, **kw) -> dict:
    """SLURM's environment of a batch job, with `scontrol` a stand-in that records its arguments."""
    stubs = tmp_path / "bin"
    stubs.mkdir(parents=True, exist_ok=True)
    (stubs / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (stubs / "scontrol").chmod(0o755)
    path = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, SLURM_JOB_ID=JOB_ID, SCONTROL_LOG=str(tmp_path / "scontrol.log"),
                HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)


def _submit(options: list[str], env: dict) -> subprocess.Popen:
    """The job as SLURM starts it (and restarts it when requeued): the script with the arguments given to sbatch."""
    return subprocess.Popen(["bash", str(SBATCH), *options], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _checkpoint_step(run: Path) -> int:
    last = run / "checkpoints" / "last.pt"
    try:
        return torch.load(last, map_location="cpu", weights_only=False)["step"] if last.is_file() else 0
    except (EOFError, RuntimeError):  # never half-written (atomic), but a reader can race the rename's old file
        return 0


def _wait_for_checkpoint(job: subprocess.Popen, run: Path, after: int) -> int:
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        step = _checkpoint_step(run)
        if step > after:
            return step
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint after step {after} (job ended: {job.poll()}): {job.communicate()}")


def _requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.is_file() else []


def _losses(run: Path) -> dict[int, dict]:
    """step -> the logged training terms of that step (the rate, the data wait and the peak memory, wall-clock and
    device measures, left out)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), steps  # every step logged once, also across the restarts
    return {r["step"]: {k: v for k, v in r.items() if k not in ("samples_per_s", "data_wait_s", "peak_memory_gib")} for r in records if "loss" in r}


def test_the_sbatch_script_stopped_twice_and_requeued_ends_bit_identical(world, tmp_path):
    """SIGUSR1 to the batch script (SLURM's --signal=B:USR1@90) is passed on to dho, which saves a checkpoint and
    exits 3, and the script requeues the job; the requeued job (the same script, the same arguments) continues
    with --resume auto, is preempted (SIGTERM to every process, DataLoader workers included), requeued again, and
    the third start finishes: the same losses at every step and the same weights as a job never stopped."""
    full, run = tmp_path / "full", tmp_path / "run"
    baseline = _submit(_options(world, full), _job_env(tmp_path / "alone"))  # the job never stopped, started alongside
    slow = _job_env(tmp_path, DHO_TEST_STEP_SLEEP="0.3")

    first = _submit(_options(world, run), slow)  # a new run folder: --resume auto starts it
    stopped_at = _wait_for_checkpoint(first, run, after=0)
    os.kill(first.pid, signal.SIGUSR1)  # to the batch shell only, as B:USR1 does
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err  # the job requeued itself
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"]
    s1 = _checkpoint_step(run)
    assert f"error: stopped by SIGUSR1 at step {s1}/18 with a checkpoint" in err and s1 >= stopped_at, err
    assert not (run / "model.pt").exists()

    second = _submit(_options(world, run), slow)
    _wait_for_checkpoint(second, run, after=s1 + 1)
    os.killpg(second.pid, signal.SIGTERM)  # preemption: every process of the job
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert f"resuming at step {s1}" in out, out
    s2 = _checkpoint_step(run)
    assert f"error: stopped by SIGTERM at step {s2}/18 with a checkpoint" in err and s1 < s2 < 18, err
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"] * 2 and not (run / "model.pt").exists()

    third = _submit(_options(world, run), _job_env(tmp_path))
    out, err = third.communicate(timeout=180)
    assert third.returncode == 0, err
    assert f"resuming at step {s2}" in out and "done:" in out, out
    assert _requeues(tmp_path) == [f"requeue {JOB_ID}"] * 2  # finished: not requeued

    out, err = baseline.communicate(timeout=180)
    assert baseline.returncode == 0, err
    assert not _requeues(tmp_path / "alone")
    expected, got = _losses(full), _losses(run)
    assert list(got) == list(range(1, 19)) and got == expected
    a, b = load_student(full / "model.pt")[0].state_dict(), load_student(run / "model.pt")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_script_keeps_dhos_exit_status_and_requeues_only_on_3(world, tmp_path):
    """A job that fails (here: options that do not parse) ends with dho's status and one error line; no requeue."""
    job = _submit(["--out", str(tmp_path / "run"), "--epochs", "many"], _job_env(tmp_path))
    out, err = job.communicate(timeout=120)
    assert job.returncode == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not _requeues(tmp_path)


def test_resume_auto_starts_continues_finishes_and_refuses(world, tmp_path, capsys):
    """--resume auto in each state of --out: new or empty (start), a checkpoint (continue), finished (exit quietly,
    nothing touched), a run of other options (one line naming them), someone else's files (refused)."""
    run = tmp_path / "run"
    run.mkdir()  # empty: started
    distill(_cfg(world, run, max_steps=2), resume="auto")
    assert (run / "model.pt").is_file() and json.loads((run / "config.json").read_text())["max_steps"] == 2
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    distill(_cfg(world, run, max_steps=2, log_every=5), resume="auto")  # finished with these options: nothing to do
    assert capsys.readouterr().out == (f"{run} holds the finished run ({run / 'model.pt'}); nothing to do "
                                       f"(`dho distill --resume {run}` reruns its end)\n")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigError, match=r"^--resume auto: .* holds a run made with other options \(lr: 0\.003 -> 0\.001\); "
                                          r"they change the data order or the numerics"):
        distill(_cfg(world, run, lr=1e-3), resume="auto")
    distill(_cfg(world, run), resume="auto")  # a new --max-steps: continues to the end of the schedule, as --resume does
    assert "resuming at step 2" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == list(range(1, 7))
    # a run with a checkpoint but no model: continued; with other options: refused before anything is written
    (run / "model.pt").unlink()
    with pytest.raises(ConfigError, match=r"holds a run made with other options \(seed: 0 -> 1\)"):
        distill(_cfg(world, run, seed=1), resume="auto")
    distill(_cfg(world, run), resume="auto")
    assert "resuming at step 6" in capsys.readouterr().out and (run / "model.pt").is_file()

    died = tmp_path / "died"  # killed before its first checkpoint: config.json only, started again
    died.mkdir()
    (died / "config.json").write_text(json.dumps(replace(_cfg(world, died), lr=1e-3).to_dict()))
    distill(_cfg(world, died, max_steps=1), resume="auto")
    assert "has no checkpoint yet" in capsys.readouterr().out and (died / "model.pt").is_file()

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files but no dho run"):
        distill(_cfg(world, theirs), resume="auto")
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


def test_resume_auto_on_the_command_line(tmp_path, monkeypatch):
    """`--resume auto` is the word; `--resume ./auto` the folder named auto; auto needs --out and no second run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "auto").mkdir()
    with pytest.raises(ConfigError, match=r"^--resume auto needs --out RUN, .*write `--resume ./auto`$"):
        app(["distill", "--resume", "auto"], standalone_mode=False)
    with pytest.raises(ConfigError, match=r"no run there \(no config.json\)"):
        app(["distill", "--resume", "./auto"], standalone_mode=False)
    with pytest.raises(ConfigError, match=r"^a run folder \(auto\) is given without --resume"):
        app(["distill", "auto", "--out", "x"], standalone_mode=False)
