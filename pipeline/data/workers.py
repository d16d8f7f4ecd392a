"""Where DataLoader workers start: a fork server, never a fork of the training process.

The trainer runs threads (the tracker's, tqdm's monitor, the queues' feeders, the process
group's). A fork while one of them holds an interpreter lock leaves the child deadlocked before
it runs: seen under CPython 3.11, an evaluation worker stuck in ``PyOS_AfterFork_Child`` waiting
on the thread-state lock an exiting feeder thread held at the fork, its rank waiting on it and
the other rank timing out in the next collective (the demo, twice in one CI run). The fork server
is started once per process from a clean interpreter (torch and the streams imported); every
worker is a fork of that single-threaded process.

Signals: a scheduler's signals (SLURM's ``--signal=USR1``, a preemption's or a time limit's
SIGTERM) reach every process of the job step. The trainer acts on them and stops its workers
itself; a worker that died of one first would take the trainer's next batch, and the save, with
it. So the server, its resource tracker and every worker start with them blocked (a signal mask
is inherited across fork and exec); a forked worker got the same effect by inheriting the
trainer's handlers.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from multiprocessing import forkserver, resource_tracker

SCHEDULER_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM})
PRELOAD = ["torch", "pipeline.data.stream"]
_lock = threading.Lock()


def worker_context() -> multiprocessing.context.BaseContext:
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
