"""Devices and ranks, for every command: `--device`, the process group, the CPU threads beside workers.

`resolve_device(spec)` is the one reading of `--device`:

    auto     cuda if a GPU is visible, else cpu
    cpu      the CPU
    cuda     the GPU of this process: cuda:LOCAL_RANK under torchrun, else cuda:0
    cuda:N   GPU N (one process only: under torchrun every rank takes its own LOCAL_RANK)

Anything else, a GPU that is not visible, or an index past the visible GPUs is a ConfigError with
the allowed values. `setup_ranks` is the one rank set-up of `precompute-teacher` and `distill`:
torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on CUDA), an explicit
rank of a job array (no process group), or one process. `cpu_threads_beside_workers` is the one
thread rule for DataLoader workers that decode on the same cores; `default_workers` the default number of
those workers where a command takes it from the machine (`precompute-teacher`).

torch is imported where it is used, so the command line can show DEVICE_HELP without loading it.
Out of scope: MPS, XLA and other accelerators.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from dho.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (cuda if available), cpu, cuda or cuda:N"  # the --device help of every command


def resolve_device(spec: "str | torch.device") -> "torch.device":
    """`--device` -> torch.device of this process (see the module docstring)."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = str(spec).strip().lower()
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", spec)
    if match is None:
        raise ConfigError(f"--device must be {DEVICE_HELP}; got {spec!r}")
    _, world, local_rank = torchrun_env(group=False)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} was asked for but no CUDA device is visible; use --device cpu or auto")
    if match.group(1) is None:  # auto or cuda
        return torch.device("cuda", local_rank if world > 1 else 0)
    index = int(match.group(1))
    if world > 1:
        raise ConfigError(f"--device {spec} under torchrun would put every rank on one GPU; use --device cuda "
                          "(each rank takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0 .. "
                          f"cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def torchrun_env(group: bool = True) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) of torchrun's environment (0, 1, 0 without it), checked where they enter:
    a stray or half-set variable is one line, not torch's traceback from deep inside init_process_group.
    `group=False` checks only what the device choice reads (WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ

    def whole(name: str, default: str, least: int) -> int:
        text = env.get(name, default).strip()
        if not re.fullmatch(r"\d+", text) or int(text) < least:
            raise ConfigError(f"{name}={env.get(name)!r} in the environment is not a whole number >= {least}; torchrun sets "
                              "RANK, WORLD_SIZE and LOCAL_RANK itself: unset them to run one process")
        return int(text)

    world = whole("WORLD_SIZE", "1", 1)
    local_rank = whole("LOCAL_RANK", "0", 0)
    if not group:
        return 0, world, local_rank
    rank = whole("RANK", "0", 0)
    if rank >= world:
        raise ConfigError(f"RANK={rank} in the environment is not below WORLD_SIZE={world}; torchrun sets both itself: "
                          "unset them to run one process")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} in the environment but {' and '.join(missing)} not set; start several ranks "
                          "with torchrun (it sets them all), or unset WORLD_SIZE and RANK to run one process")
    return rank, world, local_rank


@dataclass(frozen=True)
class Ranks:
    """This process among the ranks: `group` is "" (no process group), "joined" (one that existed) or
    "own" (created by `setup_ranks`; its caller may destroy it at the end)."""

    rank: int
    world_size: int
    group: str
    device: "torch.device"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_ranks(device: "torch.device", rank: Optional[int] = None, world_size: Optional[int] = None) -> Ranks:
    """The ranks of this run, with `device` made the current CUDA device (DataLoader pinning and kernels without
    an explicit device then stay on it, never on cuda:0 of a shared machine). Explicit `rank`/`world_size` (a job
    array; both or neither, never under torchrun) need no process group; under torchrun (WORLD_SIZE > 1) or inside
    a process group someone initialised, the group is joined or created."""
    import torch

    if device.type == "cuda":  # resolve_device gave this rank cuda:LOCAL_RANK under torchrun
        torch.cuda.set_device(device)
    env_world = torchrun_env()[1]
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ConfigError("give both --rank and --world-size (job arrays), or neither")
        if env_world > 1:
            raise ConfigError("--rank/--world-size are for job arrays; under torchrun the ranks come from the environment")
        if not 0 <= rank < world_size:
            raise ConfigError(f"--rank {rank} is not in [0, --world-size {world_size})")
        return Ranks(rank, world_size, "", device)
    dist = torch.distributed
    if env_world > 1 or (dist.is_available() and dist.is_initialized()):
        group = "joined"
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            group = "own"
        return Ranks(dist.get_rank(), dist.get_world_size(), group, device)
    return Ranks(0, 1, "", device)


MAX_DEFAULT_WORKERS = 16  # a cap on the default: each worker is a process with its own memory (--workers gives more)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what SLURM, a cgroup or taskset gives it), else
    os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def default_workers(device_type: str) -> int:
    """DataLoader workers per rank when --workers is not given: the rank's share of `usable_cores` (torchrun's
    LOCAL_WORLD_SIZE ranks share a node) less one core for the rank's own process, at most MAX_DEFAULT_WORKERS.
    On the CPU the model's forward needs cores too and `cpu_threads_beside_workers` leaves one core per worker,
    so half the share goes to workers, half to the forward's threads."""
    share = max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    workers = share // 2 if device_type == "cpu" else share - 1
    return max(0, min(workers, MAX_DEFAULT_WORKERS))


def default_workers_help() -> str:
    """The --workers default as `--help` shows it, with this machine's numbers (no torch import)."""
    return (f"Default: auto, from the cores this process may use ({usable_cores()} here, shared by torchrun's ranks "
            f"on a node): one per core less one for the rank's own process on CUDA ({default_workers('cuda')} here, "
            f"at most {MAX_DEFAULT_WORKERS}), half of them on the CPU, where the others run the model "
            f"({default_workers('cpu')} here).")


def cpu_threads_beside_workers(device: "torch.device", workers: int, world_size: int) -> None:
    """On the CPU, leave one core per DataLoader worker: they decode on the same cores, and an OpenMP pool
    as wide as the machine spins while they wait and starves them (measured 60x slower on 2 cores)."""
    import torch

    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size - workers))


def any_rank(flag: bool, device: "torch.device") -> bool:
    """True on every rank if `flag` is True on any rank (one all-reduce)."""
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, float], device: "torch.device", world_size: int) -> dict[str, float]:
    """Each key's value averaged over the ranks (each rank computed it on its share of the batch)."""
    import torch

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float32)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, (t / world_size).tolist()))
