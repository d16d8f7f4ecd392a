"""Rank discovery in one place: the ``deepspeed`` launcher, torchrun, and SLURM's srun."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "deepspeed/torchrun", "srun" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover(local_rank_arg: int | None = None) -> DistEnv:
    """Read rank and world size from the environment; under srun, also export what torch needs.

    The ``deepspeed`` launcher and torchrun set RANK, WORLD_SIZE and LOCAL_RANK (the deepspeed
    launcher also passes ``--local_rank``); srun sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), local, "deepspeed/torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        return DistEnv(rank, world, local, "srun")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    # A process group of one meets no one: any free port, so that runs side by side never collide
    env.setdefault("MASTER_PORT", str(free_port()))
    return DistEnv(0, 1, 0, "single")


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of a local process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_before_process_group() -> None:
    """Import the modules that capture the default process group at import time, while there is
    none. ``deepspeed.comm`` and ``torch.distributed.nn`` take ``group=WORLD`` as a default
    argument, evaluated on import; torch imports the latter lazily (with torch._dynamo: the first
    compile, DeepSpeed's ZeRO code). Imported after ``init_process_group`` they hold the group for
    ever, ``destroy_process_group`` cannot free it, and gloo's worker threads outlive the
    interpreter: a collective's tensor released on one of them during exit aborts the process
    (``terminate called without an active exception``, SIGABRT, about 1 in 7 two-rank CPU runs,
    after all the work was done). Call this before creating any process group."""
    import deepspeed  # noqa: F401
    import torch.distributed.nn  # noqa: F401


def init_local_group(rank: int, world_size: int, port: int, timeout_s: float = 60) -> None:
    """A gloo group of ``world_size`` processes on this host, for tests and benchmarks."""
    import datetime

    import_before_process_group()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def rank_device(env: DistEnv) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on GPUs (DeepSpeed's accelerator), else the CPU."""
    import deepspeed

    return torch.device(deepspeed.get_accelerator().device_name(env.local_rank))


def init_process_group(env: DistEnv) -> torch.device:
    """Make this rank's device current, then ``deepspeed.init_distributed()``; returns the device.
    The device comes first, before any collective: NCCL stages ``all_gather_object``'s tensors on
    the current device, and DeepSpeed binds its process group to ``LOCAL_RANK``'s device
    (``device_id``, multi-rank CUDA jobs). Left to ``deepspeed.initialize``, every rank of a node
    would meet in cuda:0 before step 1. Train, evaluation and the benchmarks all start here.

    On the CPU, every rank then removes the name of its DeepSpeed shared-memory all-reduce buffer
    (``/dev/shm/deepspeed_allreduce_buffer_*``, 66 MB a rank), which DeepSpeed never unlinks:
    after the barrier every rank has mapped every buffer, so the memory lives exactly as long as
    the processes instead of piling up in /dev/shm, one set per run, until the node runs out of
    RAM."""
    import deepspeed

    import_before_process_group()
    device = rank_device(env)
    deepspeed.get_accelerator().set_device(env.local_rank)
    deepspeed.init_distributed()
    if device.type != "cpu":
        return device
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    dist.barrier()
    name.unlink(missing_ok=True)
    return device


def rank_cores() -> int:
    """The cores this rank may count on: its affinity (srun's ``--cpus-per-task`` and
    ``--cpu-bind``); where it is not bound (every core of the machine), its share among the
    launcher's local ranks (``LOCAL_WORLD_SIZE`` from torchrun, ``LOCAL_SIZE`` from deepspeed)."""
    cores = len(os.sched_getaffinity(0))
    if cores == os.cpu_count():
        cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1))
    return max(cores, 1)


def set_cpu_threads(num_workers: int, *, warn: bool) -> int:
    """Intra-op threads for this rank: ``OMP_NUM_THREADS`` where the user set it, else its cores
    (:func:`rank_cores`) less one per DataLoader worker, at least 1. The workers inherit the same
    cores. With ``warn``, says so when the workers alone take every core."""
    cores = rank_cores()
    if warn and num_workers >= cores:
        log.warning("data.num_workers=%d: this rank has %d core(s), so its decode workers and its training "
                    "thread share them. Ask for more (sbatch --cpus-per-task=%d) or set data.num_workers=%d.",
                    num_workers, cores, num_workers + 1, max(cores - 1, 0))
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, cores - num_workers))
    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class Placement:
    """Where one rank runs: what a multi-node job is checked by, and what to read when one hangs."""
    rank: int
    local_rank: int
    host: str
    master: str        # MASTER_ADDR:MASTER_PORT as this rank saw them
    master_ip: str     # MASTER_ADDR as this rank's resolver answers
    cpus: list[int]    # the cores this rank's threads and workers may run on
    threads: int       # intra-op threads
    device: str

    @classmethod
    def here(cls, env: DistEnv, device: torch.device) -> "Placement":
        addr = os.environ.get("MASTER_ADDR", "")
        try:
            ip = socket.gethostbyname(addr) if addr else ""
        except OSError:
            ip = "unresolved"
        return cls(env.rank, env.local_rank, socket.gethostname(), f"{addr}:{os.environ.get('MASTER_PORT', '')}", ip,
                   sorted(os.sched_getaffinity(0)), torch.get_num_threads(), str(device))


def gather_placements(env: DistEnv, device: torch.device) -> list[dict]:
    """Every rank's :class:`Placement`, in rank order, on every rank (one all-gather of a few
    hundred bytes a rank), checked by :func:`check_placements`."""
    mine = asdict(Placement.here(env, device))
    placements = [mine]
    if env.world_size > 1:
        placements = [None] * env.world_size
        dist.all_gather_object(placements, mine)
    check_placements(placements)
    return placements


def check_placements(placements: list[dict]) -> None:
    """Refuse a job whose launcher gave two ranks of one host the same ``LOCAL_RANK``, or whose
    ranks resolve the master to different addresses: the mix-ups of global and local ranks and of
    rendezvous hosts that a one-node run never shows."""
    seen: dict[tuple[str, int], int] = {}
    for p in placements:
        other = seen.setdefault((p["host"], p["local_rank"]), p["rank"])
        if other != p["rank"]:
            raise RuntimeError(f"ranks {other} and {p['rank']} both run on {p['host']} with LOCAL_RANK "
                               f"{p['local_rank']}: the launcher's local ranks are wrong (they would share a device)")
    masters = {p["master_ip"] for p in placements}
    if len(masters) > 1:
        raise RuntimeError(f"ranks resolve MASTER_ADDR to different addresses {sorted(masters)}: "
                           + ", ".join(f"rank {p['rank']} on {p['host']}: {p['master']} -> {p['master_ip']}"
                                       for p in placements[:8]))


def describe_placements(placements: list[dict]) -> str:
    """'4 ranks on 2 hosts (vnode1: 0-1, vnode2: 2-3), master vnode1:29500 (10.0.0.2), 1 core(s) and 1
    thread(s) a rank'."""
    hosts: dict[str, list[int]] = {}
    for p in placements:
        hosts.setdefault(p["host"], []).append(p["rank"])
    spans = ", ".join(f"{h}: {r[0]}-{r[-1]}" if r == list(range(r[0], r[-1] + 1)) else f"{h}: {r}"
                      for h, r in hosts.items())
    shown = spans if len(hosts) <= 8 else f"{spans.split(', ')[0]}, ..."
    cores = sorted({len(p["cpus"]) for p in placements})
    threads = sorted({p["threads"] for p in placements})
    first = placements[0]
    return (f"{len(placements)} ranks on {len(hosts)} host(s) ({shown}), master {first['master']} "
            f"({first['master_ip']}), {'/'.join(map(str, cores))} core(s) and {'/'.join(map(str, threads))} "
            f"thread(s) a rank")


def _slurm_master_addr() -> str:
    """The first host of the job's node list (``scontrol show hostnames``)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def on_rank0(fn: Callable[[], T], *, share: bool = False) -> T | None:
    """Run ``fn`` on rank 0 only and return its result there; elsewhere None, or with ``share``
    rank 0's (picklable) result. Rank 0 decides, the others are told, so ranks cannot act on
    different readings of a shared filesystem. An exception on rank 0 is raised on every rank,
    so none is left waiting in a collective. Without a process group, just calls ``fn``."""
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    shared = [f"{type(error).__name__}: {error}" if error is not None else None, result if share else None,
              isinstance(error, UserError)]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[0] is not None:  # the user's mistake stays one (rank 0 tells it), a bug stays a bug
        raise (UserError if shared[2] else RuntimeError)(f"failed on rank 0: {shared[0]}")
    return result if dist.get_rank() == 0 else shared[1]


class StepAgreement:
    """Once per step, all ranks agree on whether to stop (any rank asked to) and whether any
    rank saw a non-finite loss. The all-reduce and the copy to pinned host memory are queued
    behind the step and read one step later, when they have long finished: the hot loop never
    waits on the device for them. :meth:`collect` right after :meth:`post` reads the step just
    taken (then the host does wait: before a checkpoint)."""

    def __init__(self, device: torch.device):
        self.device, self.pending = device, None
        self.cuda = device.type == "cuda"

    def post(self, step: int, stop: bool, nonfinite: torch.Tensor | None = None) -> None:
        flags = torch.zeros(2, device=self.device)  # [ranks that stop, non-finite losses]
        flags[0].fill_(float(stop))  # a kernel argument, not a host-to-device copy
        if nonfinite is not None:
            flags[1].copy_(nonfinite)
        dist.all_reduce(flags)  # NCCL: queued on the stream, the host goes on
        host = torch.empty(2, pin_memory=self.cuda)
        host.copy_(flags, non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (step, host, event)

    def collect(self) -> tuple[int, bool, bool] | None:
        """(step, stop, non-finite) as agreed for the last posted step, or None if read already."""
        if self.pending is None:
            return None
        (step, host, event), self.pending = self.pending, None
        if event is not None:
            event.synchronize()
        return step, bool(host[0] > 0), bool(host[1] > 0)
