"""Preemption signals (SIGUSR1 from SLURM's --signal, SIGTERM from a preempting scheduler),
caught from a launcher's first line: one that arrives during start-up must not kill the rank."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: str | None = None


def install() -> None:
    """Catch the preemption signals in this process (idempotent)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _on_signal)


def received() -> str | None:
    """The name of the preemption signal received, if any."""
    return _received


def _on_signal(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name
    log.warning("received %s: saving at the next step, then exiting", _received)
