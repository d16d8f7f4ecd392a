"""Where DataLoader workers start: a fork server, never a fork of the training process.

The trainer runs threads (the tracker's, tqdm's monitor, the queues' feeders, the process
group's). A fork while one of them holds an interpreter lock leaves the child deadlocked before
it runs: seen under CPython 3.11, an evaluation worker stuck in ``PyOS_AfterFork_Child`` waiting
on the thread-state lock an exiting feeder thread held at the fork, its rank waiting on it and
the other rank timing out in the next collective (twice in one CI run: the demo, and the demo
configs' chain). The fork server is started once per process from a clean interpreter (torch and
the streams imported); every worker is a fork of that single-threaded process.

Signals: a scheduler's signals (SLURM's ``--signal=USR1``, a preemption's or a time limit's
SIGTERM) reach every process of the job step. The trainer acts on them; a worker must not die of
SIGUSR1, nor the server or its resource tracker of either. So those start with both blocked (a
signal mask is inherited across fork and exec), and each worker ignores SIGUSR1 and takes SIGTERM
as a forked worker did (torch's handler: it dies of one, so the trainer can stop it).

A forked worker noticed its trainer's death by its parent changing; this one's parent is the
server, which lives as long as any worker does. So each worker watches the trainer's process and
exits when it has gone: a trainer killed outright, or exiting with a loader still open, leaves no
worker behind (nor, then, the server).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from functools import partial
from multiprocessing import forkserver, resource_tracker

SCHEDULER_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM})
PRELOAD = ["torch", "pipeline.data.stream"]
WATCH_INTERVAL_S = 1.0
_lock = threading.Lock()


def worker_options(num_workers: int) -> dict:
    """The DataLoader arguments that start ``num_workers`` workers this way (none for 0)."""
    if not num_workers:
        return {}
    return {"multiprocessing_context": _context(), "worker_init_fn": partial(_start_worker, os.getpid())}


def _context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context for DataLoader workers. Its server (and the resource tracker)
    is started here on first use, and again should it have died, so never without the mask."""
    with _lock:
        forkserver.set_forkserver_preload(PRELOAD)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SCHEDULER_SIGNALS)
        try:
            resource_tracker.ensure_running()
            # starting the tracker unblocks SIGINT and SIGTERM on its way out: block them again
            signal.pthread_sigmask(signal.SIG_BLOCK, SCHEDULER_SIGNALS)
            forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return multiprocessing.get_context("forkserver")


def _start_worker(trainer: int, worker_id: int) -> None:
    """A worker's first step (its ``worker_init_fn``): its signals, and its watch on ``trainer``."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SCHEDULER_SIGNALS)
    threading.Thread(target=_exit_with, args=(trainer,), name="trainer-watch", daemon=True).start()


def _exit_with(trainer: int) -> None:
    while _running(trainer):
        time.sleep(WATCH_INTERVAL_S)
    os._exit(0)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
