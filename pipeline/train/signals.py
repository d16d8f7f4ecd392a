"""Preemption signals (SIGUSR1 from SLURM's --signal, SIGTERM from a preempting scheduler),
caught from a launcher's first line: one that arrives during start-up must not kill the rank."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal (after a save); the SLURM scripts requeue on it
_received: str | None = None


def install() -> None:
    """Catch the preemption signals in this process (idempotent)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _on_signal)


def received() -> str | None:
    """The name of the preemption signal received, if any."""
    return _received


def mark_preempted(where: str) -> None:
    """Tell the SLURM scripts to requeue: they look for this file because srun's exit status is
    unreliable once one rank's exit has made it cancel the others. Call on rank 0 only, after
    everything worth keeping is saved."""
    marker = os.environ.get("VIT_PREEMPTED_FILE")
    if marker:
        Path(marker).write_text(f"{where}\n")


def _on_signal(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name
    log.warning("received %s: stopping at the next agreed point, then exiting", _received)
