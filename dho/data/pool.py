"""The process pools of the data commands: the per-file and per-shard work of prepare, index and split.

`pool_map(fn, tasks, processes)` runs fn(*task) for every task in a forked pool, one process per core
(`pool_size`), results in task order, at most two tasks per process in flight; `processes=1` runs every
task in place. An error, Ctrl-C or a caller that stops reading ends the pool without the queued tasks.
Out of scope: the DataLoader workers of training (torch's own pools).
"""

from __future__ import annotations

import collections
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Optional, Sequence


def pool_size(tasks: int, processes: Optional[int]) -> int:
    """One process per core this process may use (`processes` overrides), never more than there are tasks."""
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(tasks, processes))


_stopping = None  # in a pool worker: the caller's Event, set when it stops early; queued tasks then do nothing


def _pool_worker_init(stopping) -> None:
    global _stopping
    _stopping = stopping
    # Ctrl-C reaches the whole process group and the main process decides. A handler that does nothing, not
    # SIG_IGN: the commands of pipe: shards a worker starts get the default back (exec resets handlers) and stop
    signal.signal(signal.SIGINT, lambda signum, frame: None)


def _pool_task(fn: Callable, task: tuple):
    return None if _stopping.is_set() else fn(*task)


def pool_map(fn: Callable, tasks: Sequence[tuple], processes: Optional[int] = None) -> Iterator:
    """fn(*task) for every task, results in task order. Several tasks run in a process pool (tar parsing,
    hashing and image decoding are CPU-bound); at most two tasks per process are in flight, so finished
    results wait in memory only that long. processes=1 runs every task here, one by one. An error raised
    by a task (a one-line DatasetError) reaches the caller as it is."""
    workers = pool_size(len(tasks), processes)
    if workers == 1:
        yield from (fn(*task) for task in tasks)
        return
    import multiprocessing

    # fork is cheap and the pool only runs the data commands' functions (no torch, no threads of ours)
    context = multiprocessing.get_context("fork")
    stopping = context.Event()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_pool_worker_init, initargs=(stopping,))
    finished = False
    try:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.submit(_pool_task, fn, task))
            if len(pending) == 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        finished = True
    finally:
        if not finished:  # an error, Ctrl-C or a caller that stopped reading: end without the queued tasks
            stopping.set()
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# writing: shards + manifest, atomically
# --------------------------------------------------------------------------------------------
