"""Where DataLoader workers start: a fork server, never a fork of the training process.

The trainer runs threads (tracker, progress bar, queue feeders, process group); a fork while one
of them holds an interpreter lock can deadlock the child before it runs (seen under CPython
3.11). Every worker is a fork of one single-threaded server started per process, with torch and
the streams imported.

Signals: SLURM's USR1 and TERM reach every process of the job step. The server and its resource
tracker start with both blocked; each worker ignores USR1 (the trainer acts on it) and dies of
TERM, as a forked worker would. A worker's parent is the server, not the trainer, so each worker
watches its trainer and exits when it has gone.
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
