"""The run folder of `dho distill --out RUN`: every file name, the start-or-resume decision, checkpoints
with every RNG, the kept checkpoints, the best epoch, and the finished model for the commands that read
a run (evaluate, predict, export, analyze, features, bench-inference).

    RUN/config.json                   the resolved DistillConfig (dho.distill.config), what --resume reads
    RUN/config.yaml                   the same keyed by the flags (text-init: true), what `dho distill --config` reads back
    RUN/metrics.jsonl, RUN/log.txt    one JSON record per logged step and validation; the console output
    RUN/summary.csv                   one row per epoch: lr, mean loss terms, validation top-1 per head (timm's summary.csv)
    RUN/checkpoints/last.pt           model, optimiser, scheduler, scaler, RNG states, step, ... (plain torch.load)
    RUN/checkpoints/step-S.pt         the newest N with --keep-checkpoints N > 1 (hard links of last.pt)
    RUN/checkpoints/best/             the best epoch on --val: model.pt, best.json (+ alpha_beta.json and its heatmap
                                      with --select-best-on-val, copied into RUN when the schedule ends)
    RUN/model.pt                      the finished student; written last, so its presence means the run is done
    RUN/alpha_beta.json               Eq. 11's alpha/beta searched on a validation set, alpha_beta_heatmap.png beside it,
                                      alpha_beta.previous.json the choice a new search replaced
    RUN/grad_cosine.png               the gradient-conflict diagnostics (--log-grad-cosine)
    RUN/tensorboard/, RUN/wandb/, RUN/wandb_id.txt    the optional metric sinks (--report-to)
    RUN/analysis/<data>/, RUN/inference_cost.json     written by `dho analyze` and `dho bench-inference`
    RUN/.lock                         held by the `dho distill` writing the folder (its pid and host inside)

Every file is written whole or not at all (`dho.atomic.write_atomic`); checkpoints are also fsynced.
Out of scope: what the files hold beyond their names (the loop, the metrics and evaluate own that) and
run folders on object stores.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from dho.atomic import check_space, write_atomic
from dho.devices import resolve_device
from dho.errors import ConfigError

CONFIG = "config.json"
CONFIG_YAML = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.csv"
LOG = "log.txt"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best"
BEST_JSON = "best.json"
MODEL = "model.pt"
ALPHA_BETA = "alpha_beta.json"
ALPHA_BETA_PREVIOUS = "alpha_beta.previous.json"
HEATMAP = "alpha_beta_heatmap.png"
GRAD_PLOT = "grad_cosine.png"
TENSORBOARD = "tensorboard"
WANDB_ID = "wandb_id.txt"
ANALYSIS = "analysis"
INFERENCE_COST = "inference_cost.json"
SELECTION = ".select"  # scratch folder of the alpha/beta search of --select-best-on-val
LOCK = ".lock"  # one `dho distill` at a time per run folder (`RunDir.held`)


def write_json(path: Path, obj: dict) -> Path:
    """A JSON file (indent 2), written whole or not at all."""
    return write_atomic(path, lambda part: part.write_text(json.dumps(obj, indent=2) + "\n"))


class RunDir:
    """The paths of one run folder and what is done with them (see the module docstring)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.config_yaml = self.path / CONFIG_YAML
        self.metrics = self.path / METRICS
        self.summary = self.path / SUMMARY
        self.log = self.path / LOG
        self.checkpoints = self.path / CHECKPOINTS
        self.last = self.checkpoints / LAST
        self.best = self.checkpoints / BEST
        self.model = self.path / MODEL
        self.alpha_beta = self.path / ALPHA_BETA
        self.heatmap = self.path / HEATMAP
        self.grad_plot = self.path / GRAD_PLOT
        self.tensorboard = self.path / TENSORBOARD
        self.wandb_id = self.path / WANDB_ID
        self.selection = self.path / SELECTION
        self.inference_cost = self.path / INFERENCE_COST
        self.lock = self.path / LOCK

    def analysis(self, name: str) -> Path:
        """RUN/analysis/<name>/ of `dho analyze`."""
        return self.path / ANALYSIS / name

    # ------------------------------------------------------------------ starting and resuming

    @contextlib.contextmanager
    def held(self, enabled: bool = True) -> Iterator[None]:
        """Hold RUN/.lock while the block runs (rank 0 under torchrun: the ranks of one job write through it), so a
        second `dho distill` on the same --out is refused instead of racing the first for its files.

        A POSIX record lock (fcntl.lockf), not flock: the kernel drops it when the process ends however it ends
        (a run killed with -9 leaves no stale lock), and forked DataLoader workers do not inherit it (an flock
        would stay held by orphaned workers until they notice). The file names the holder's pid and host, for
        the refusal; it stays in the folder (removing a lock file races the next locker)."""
        if not enabled:
            yield
            return
        self._check_folder()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode("utf-8", "replace").split() if e.errno in (errno.EACCES, errno.EAGAIN) else None
            os.close(fd)
            if holder is None:
                raise
            who = f"pid {holder[1]} on host {holder[3]}" if len(holder) == 4 else "another process"
            raise ConfigError(f"--out {self.path} is in use by another dho distill ({who}, see {self.lock}); wait for "
                              "it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    def _check_folder(self) -> None:
        """--out must be a folder that is new, empty or a dho run: nothing of the user's is touched."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a run folder")
        if out.is_dir() and not self.config.is_file() and any(p.name != LOCK for p in out.iterdir()):
            raise ConfigError(f"--out {out} holds files but no dho run (no {CONFIG}); choose a new or empty folder")

    def start(self, resume: Union[bool, str]) -> tuple[bool, str]:
        """Decide what `--out` holds and what `dho distill` does with it -> (resume?, note for the log).

        A folder with files but no config.json is not a run: refused, nothing of the user's is touched.
        A finished run (model.pt) or a run with a checkpoint needs --resume. A run that died before its
        first checkpoint is started again by the same command, with or without --resume. `resume="auto"`
        (`--resume auto`, the one command of a requeued job) continues a run that has a checkpoint and
        starts any other (a new or empty folder, a run that died before its first checkpoint). (Whether the
        options may change on --resume is the config's to say: `dho.distill.config.check_resume`; a finished
        run under --resume auto is `finished`.)
        """
        out, is_run = self.path, self.config.is_file()
        self._check_folder()
        note = ""
        if resume == "auto":
            if self.last.is_file():
                return True, ""
            if is_run:
                note = f"{out} has no checkpoint yet (the run stopped before its first one): starting it again"
            return False, note
        if resume and not self.last.is_file():
            if not is_run:
                raise ConfigError(f"--resume: {out} holds no run to resume; start it without --resume")
            resume, note = False, f"{out} has no checkpoint yet (the run stopped before its first one): starting it again"
        elif not resume and is_run:
            if self.model.is_file():
                raise ConfigError(f"{out} already holds a finished run; choose another --out (or --resume to rerun its end)")
            if self.last.is_file():
                step = torch.load(self.last, map_location="cpu", weights_only=False).get("step", "?")
                raise ConfigError(f"{out} holds a run stopped at step {step}; pass --resume to continue it, or choose another --out")
            note = f"{out} holds a run that stopped before its first checkpoint: starting it again"
        return resume, note

    def finished(self) -> bool:
        """Whether the folder holds a finished run: model.pt is written last."""
        return self.config.is_file() and self.model.is_file()

    def create(self, config: dict, resume: bool, config_yaml: Optional[str] = None) -> None:
        """The folder's skeleton and its resolved config, as config.json and (`config_yaml`, the text) config.yaml
        (rank 0, after every rank has read the old state); a fresh start drops the metrics of the attempt that died
        before its first checkpoint. config.json comes first: it makes the folder a run, so config.yaml is ours."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if not resume:
            self.metrics.unlink(missing_ok=True)  # the failed attempt's own logs, not the user's
            self.summary.unlink(missing_ok=True)
        write_atomic(self.config, lambda part: part.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
        if config_yaml is not None:
            write_atomic(self.config_yaml, lambda part: part.write_text(config_yaml))

    def read_config(self) -> dict:
        return json.loads(self.config.read_text())

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, state: dict, keep: int = 1) -> None:
        """checkpoints/last.pt (fsynced); with keep > 1 also step-S.pt of the newest `keep` (a hard link where the
        file system allows, else a copy). `state` holds plain tensors and Python values (`rng_state()`)."""
        check_space(self.last, _tensor_bytes(state))  # before a write that would fail half-way (last.pt stays as it was)
        write_atomic(self.last, lambda part: torch.save(state, part), durable=True)
        if keep > 1:
            kept = self.last.with_name(f"step-{state['step']:09d}.pt")
            kept.unlink(missing_ok=True)
            try:
                os.link(self.last, kept)
            except OSError:
                shutil.copyfile(self.last, kept)
            for old in sorted(self.checkpoints.glob("step-*.pt"))[:-keep]:
                old.unlink()

    def load_checkpoint(self) -> dict:
        return torch.load(self.last, map_location="cpu", weights_only=False)

    # ------------------------------------------------------------------ the best epoch

    def keep_best(self, student, classnames: list[str], alpha: float, beta: float, extra: dict, record: dict,
                  searched: Optional[Path] = None, raw=None) -> None:
        """This epoch as checkpoints/best/: model.pt with its alpha/beta (and `raw`, the trained weights beside an EMA
        `student`), best.json (`record`: top1, epoch, step, ...), and the alpha_beta.json + heatmap that a search
        wrote into the folder `searched`, if any."""
        from dho.students import save_student

        self.best.mkdir(parents=True, exist_ok=True)
        save_student(self.best / MODEL, student, classnames, alpha=alpha, beta=beta, extra=extra, raw=raw)
        write_json(self.best / BEST_JSON, record)
        for name in (ALPHA_BETA, HEATMAP) if searched is not None else ():
            os.replace(searched / name, self.best / name)

    def publish_best(self) -> None:
        """Copy checkpoints/best/ into RUN (each file atomically, model.pt last: its presence means done)."""
        names = [n for n in (ALPHA_BETA, HEATMAP) if (self.best / n).is_file()] + [MODEL]
        for name in names:
            write_atomic(self.path / name, lambda part, name=name: shutil.copyfile(self.best / name, part))

    # ------------------------------------------------------------------ a finished run

    def load_student(self, device: Union[str, torch.device] = "cpu", weights: Optional[str] = None):
        """The finished student (RUN/model.pt) in eval mode on `device`, and its meta (`dho.students.load_student`;
        `weights`: ema | raw | None, the run's model)."""
        from dho.students import load_student

        if not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} not found")
        if not self.model.is_file():
            what = ("a dataset (it holds manifest.json)" if (self.path / "manifest.json").is_file() else
                    "a teacher cache (it holds zarr.json)" if (self.path / "zarr.json").is_file() else None)
            if what is not None:
                raise ConfigError(f"{self.path} is {what}, not a run: pass the run folder that `dho distill --out` wrote "
                                  "(it holds model.pt) first, and the dataset with --data")
            if not self.last.is_file() and not self.config.is_file():
                raise ConfigError(f"{self.path} holds no dho run (no model.pt, config.json or {CHECKPOINTS}/); pass the run "
                                  "folder that `dho distill --out` wrote")
            hint = f" (only {CHECKPOINTS}/{LAST} is there)" if self.last.is_file() else ""
            raise ConfigError(f"{self.model} not found: the run is not finished{hint}; run `dho distill ... --out "
                              f"{self.path} --resume` to finish it")
        return load_student(self.model, map_location=resolve_device(device), weights=weights)

    def read_alpha_beta(self) -> Optional[dict]:
        """RUN/alpha_beta.json (written by a search), or None."""
        if not self.alpha_beta.is_file():
            return None
        try:
            stored = json.loads(self.alpha_beta.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{self.alpha_beta} is not valid JSON ({e}); delete it and re-run `dho evaluate --search-on VAL`") from e
        if not isinstance(stored, dict) or "alpha" not in stored or "beta" not in stored:
            raise ConfigError(f"{self.alpha_beta} lacks alpha/beta; delete it and re-run `dho evaluate --search-on VAL`")
        return stored

    def alpha_beta_of(self, meta: dict) -> tuple[float, float, str]:
        """The run's (alpha, beta, source): RUN/alpha_beta.json if a search wrote one, else model.pt's."""
        stored = self.read_alpha_beta()
        if stored is not None:
            return float(stored["alpha"]), float(stored["beta"]), ALPHA_BETA
        return float(meta["alpha"]), float(meta["beta"]), MODEL


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in a (nested) state: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values, so a checkpoint loads with plain
    `torch.load(path)` (weights_only: no numpy objects, no pickled classes)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (also the numpy tuples of checkpoints of dho <= 0.1)."""
    torch.set_rng_state(state["torch"])
    n, py = state["numpy"], state["python"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    else:  # checkpoints of dho <= 0.1 (numpy's own tuple; they need torch.load(weights_only=False))
        np.random.set_state(n)
        random.setstate(py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
