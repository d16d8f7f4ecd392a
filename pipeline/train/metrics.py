"""Training metrics: throughput, MFU and memory; one JSON line per log step, MLflow, progress bar."""

from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def max_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak RSS on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def window_mean(sums: dict[str, float], key: str) -> float:
    """A log window's mean of ``key`` over its finite micro-batches (NaN without any)."""
    return sums[key] / sums["finite"] if sums["finite"] else float("nan")


class Meter:
    """Accumulates a log window: step time and data wait on the host; the objective's named sums
    (loss, finite micro-batches, ...) on the device, read only when the window is logged."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.sums: torch.Tensor | None = None  # float64, in the order of ``names``
        self.count = 0  # images

    @contextmanager
    def timing_data(self):
        start = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - start

    def add(self, images: int, sums: dict[str, torch.Tensor]) -> None:
        """A micro-batch of ``images`` and its named 0-d sums (every name of ``names``). No host read."""
        step = torch.stack([sums[name].double() for name in self.names])
        self.sums = step if self.sums is None else self.sums + step
        self.count += images

    def totals(self, device: torch.device) -> torch.Tensor:
        """The window's sums in the order of ``names`` (zeros for an empty window)."""
        return torch.zeros(len(self.names), dtype=torch.float64, device=device) if self.sums is None else self.sums

    def mean(self, name: str = "loss") -> float:
        """The window's mean of ``name`` over this rank's finite micro-batches (a host read)."""
        return window_mean(dict(zip(self.names, self.sums.tolist())), name)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a validation) out of the window's time."""
        self.start += seconds

    def window(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return elapsed, self.data_wait / elapsed


class MetricsWriter:
    """Rank 0 appends each record to ``metrics.jsonl`` and sends it to the tracker."""

    def __init__(self, path: Path, tracker, enabled: bool):
        self.path, self.tracker, self.enabled = Path(path), tracker, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=record["step"])
