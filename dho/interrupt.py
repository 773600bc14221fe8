"""Graceful stops on a shared cluster: SIGTERM / SIGINT / SIGUSR1 become a flag that long loops check.

SIGUSR1 is the warning a scheduler sends before its kill (SLURM's `--signal=USR1@90`, or `B:USR1@90` to the
batch script, which forwards it: pipelines/slurm/distill.sbatch); it stops the run as SIGTERM does.

`distill` checks it after every step (across ranks at its sync points), saves a checkpoint and
raises `errors.Interrupted`; `precompute-teacher` checks it between batches, so no unit is left
half-written, and raises the same. The CLI exits with status 3 (`Interrupted.EXIT_CODE`) and a
one-line message saying how to continue.

DataLoader workers ignore SIGINT and SIGUSR1 (`ignore_interrupt` as `worker_init_fn`: Ctrl-C reaches the whole
foreground process group, SLURM's warning every process of a job step, and the main process decides). They keep SIGTERM's default: the
DataLoader itself stops a stuck worker with SIGTERM, and a cluster that sends SIGTERM to every
process of a job kills them; the main process then sees its workers gone while its own stop flag
is set, and stops the same way (`workers_gone`).
"""

from __future__ import annotations

import signal
import threading


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    """Context manager: while active, SIGTERM, SIGINT and SIGUSR1 set `signum` instead of killing the process."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if first and hasattr(signal, "SIGCHLD"):
            # torch's DataLoader raises from its SIGCHLD handler, at whatever line the main process is on,
            # when a worker dies; after a stop signal that is expected (the workers got it too), and the
            # loop is left to stop at the end of its step, where the state is whole
            chld = signal.getsignal(signal.SIGCHLD)
            self._previous.setdefault(signal.SIGCHLD, chld)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop signal on another rank"

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def ignore_interrupt(worker_id: int) -> None:
    """`worker_init_fn` of DataLoaders: leave SIGINT (Ctrl-C) and SIGUSR1 (a scheduler's warning) to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def workers_gone(error: BaseException, stop: StopSignal) -> bool:
    """Whether `error`, raised while fetching a batch, is the DataLoader losing workers to the stop signal."""
    return stop.signum is not None and isinstance(error, RuntimeError) and "DataLoader worker" in str(error)
