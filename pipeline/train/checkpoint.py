"""Checkpoints: their layout and completion marker (the one definition every reader and writer
uses), DeepSpeed's ``save_checkpoint`` on every rank, keep-last-K, and resume (same world size,
or another one through DeepSpeed's universal checkpoints).

A checkpoint is ``RUN_DIR/checkpoints/stepNNNNNNNN/``. Rank 0 writes ``complete.json`` into it
only after every rank has saved, so a crash, a full disk or a signal mid-save leaves an
incomplete directory that resume ignores, and the previous checkpoint as it was. Old checkpoints
are pruned only after a new one is complete. The marker records the step, the world size, the
ZeRO stage and the model (:func:`model_signature`); :func:`checkpoint_dir` finds the complete
checkpoint a run, checkpoints or step directory names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import MissingInput, UserError, WrongInput
from pipeline.train.distributed import on_rank0

log = logging.getLogger(__name__)
COMPLETE = "complete.json"
TAG = re.compile(r"^step(\d{8})$")
WRITE_FAILURES = ("iostream error", "failed writing", "No space left", "Disk quota")


def _write_failure(error: BaseException | None) -> str | None:
    """The first line of a torch.save error (or of one it was raised from) that says a write
    failed: its C++ writer raises RuntimeError, not OSError, on a full disk."""
    while error is not None:
        line = str(error).splitlines()[0] if str(error) else ""
        if any(sign in line for sign in WRITE_FAILURES):
            return line
        error = error.__cause__ or error.__context__
    return None
UNIVERSAL = "_universal"  # suffix of a checkpoint converted for another world size


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint directories under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(TAG.match(p.name).group(1)))


def read_marker(checkpoint: Path) -> dict:
    """The completion marker: step, time, world size, ZeRO stage and the model (:func:`model_signature`)."""
    return json.loads((checkpoint / COMPLETE).read_text())


def model_signature(config) -> dict:
    """The architecture, as the completion marker records it (export rebuilds the model from it)."""
    return architecture(config.model)


def architecture(model_config) -> dict:
    """A model's settings that shape its weights (not its regularisation or compilation)."""
    return model_config.model_dump(mode="json", exclude={"drop_path_rate", "dropout", "patch_dropout", "compile"})


def checkpoint_dir(source: str | Path) -> Path:
    """The complete checkpoint that a run, checkpoints or stepNNNNNNNN directory names."""
    source = Path(source)
    if not source.exists():
        raise MissingInput(f"checkpoint '{source}' does not exist")
    if (source / COMPLETE).is_file():
        return source
    folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    found = complete_checkpoints(folder)
    if not found:
        raise MissingInput(f"'{source}' holds no complete checkpoint (a run directory, its checkpoints/ or a "
                           f"stepNNNNNNNN directory with {COMPLETE})")
    return found[-1]


def resolve_resume(resume: str, directory: Path) -> Path | None:
    """``never`` -> None; ``auto`` -> the newest complete checkpoint in ``directory`` (or
    None); a path -> that checkpoint, or the newest complete one in that folder."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise MissingInput(f"train.resume='{resume}': no complete checkpoint there (looked for {COMPLETE})")
    return found[-1]


def agree_on_resume(resume: str, directory: Path, signature: dict, world_size: int,
                    objective: str = "classification") -> Path | None:
    """The checkpoint every rank resumes (see :func:`resolve_resume`), decided by rank 0 alone and
    told to the others, so no rank loads another step from a stale listing of a shared
    filesystem. A checkpoint of another model is refused; one of another world size is
    converted to a universal checkpoint, once, by rank 0."""

    def decide() -> str | None:
        found = resolve_resume(resume, directory)
        if found is None:
            return None
        check_model(found, signature, objective)
        if read_marker(found)["world_size"] != world_size:
            found = convert_to_universal(found)
        return str(found)

    decided = on_rank0(decide, share=True)
    return Path(decided) if decided is not None else None


def trained_objective(checkpoint: Path) -> str:
    """The objective a checkpoint of ours was trained with (``classification`` before they were named)."""
    return read_marker(checkpoint).get("objective", "classification")


def check_model(checkpoint: Path, model_signature: dict, objective: str = "classification") -> None:
    """Refuse a checkpoint of another model, or of a masked autoencoder to a classifier's run (or
    the reverse), naming what differs."""
    saved_objective = trained_objective(checkpoint)
    if (saved_objective == "mae") != (objective == "mae"):
        raise WrongInput(f"checkpoint {checkpoint} was trained with objective={saved_objective}, this run has "
                         f"objective={objective}: start a new run (another run.name); a classifier starts from a "
                         f"masked autoencoder with run.stage=finetune and finetune.init_from={checkpoint}")
    saved = read_marker(checkpoint).get("model", {})
    differ = {k: (saved.get(k), v) for k, v in model_signature.items() if k in saved and saved[k] != v}
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in differ.items())
        raise WrongInput(f"checkpoint {checkpoint} is of another model ({details})")


def is_universal(checkpoint: Path) -> bool:
    return checkpoint.name.endswith(UNIVERSAL)


def universal_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + UNIVERSAL)


def convert_to_universal(checkpoint: Path) -> Path:
    """DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``), run once; the result
    loads on any world size with ``checkpoint.load_universal``."""
    out = universal_path(checkpoint)
    if (out / COMPLETE).is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a universal checkpoint (another world size)", checkpoint)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {checkpoint}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    shutil.copy(checkpoint / COMPLETE, tmp / COMPLETE)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class CheckpointNotWritten(UserError, OSError):
    """A checkpoint that could not be written (a full disk, a quota): the job stops, nothing is lost."""


class Checkpointer:
    def __init__(self, directory: Path, keep: int, rank: int):
        self.directory, self.keep, self.rank = Path(directory), keep, rank

    def save(self, engine, step: int, client_state: dict, model_signature: dict, extra=None,
             run_id: str | None = None, objective: str = "classification") -> Path:
        """Collective: every rank calls it. ``model_signature`` goes into the completion marker,
        so a checkpoint of another model is refused before DeepSpeed reads it, and the MLflow
        ``run_id`` that wrote it (a student distilled from it links to that run). ``extra(path,
        step)``, if given, writes more of the rank's state into the checkpoint before it is marked
        complete."""
        tag = tag_for(step)
        path = self.directory / tag
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an incomplete leftover of an earlier crash at this step
        _barrier()
        error = None
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=True)
            if extra is not None:
                extra(path, step)
        except OSError as e:  # a full disk, a quota: the rank says so below, every rank stops
            error = e
        except RuntimeError as e:  # torch.save's C++ writer reports a full disk so
            if not _write_failure(e):
                raise
            error = OSError(_write_failure(e))
        self._agree_written(path, error, engine.device)
        if self.rank == 0:
            marker = {"step": step, "time": time.time(), "world_size": _world_size(),
                      "zero_stage": engine.zero_optimization_stage(), "model": model_signature,
                      "objective": objective, "mlflow_run_id": run_id}
            tmp = path / (COMPLETE + ".tmp")
            try:
                tmp.write_text(json.dumps(marker))
                os.replace(tmp, path / COMPLETE)  # atomic: the checkpoint is complete, or not
            except OSError as e:
                error = e
        self._agree_written(path, error, engine.device)
        if self.rank == 0:
            self._prune()
        _barrier()
        return path

    def _agree_written(self, path: Path, error: OSError | None, device) -> None:
        """Collective: raise :class:`CheckpointNotWritten` on every rank if any rank failed to
        write its part of ``path``, naming the failure and the free space. The checkpoint then
        has no completion marker, so no resume ever picks it; the previous one is untouched."""
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(failed)
        if not failed.item():
            return
        previous = complete_checkpoints(self.directory)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
        free = shutil.disk_usage(self.directory).free
        cause = str(error.strerror or error) if error is not None else "another rank failed to write its part"
        raise CheckpointNotWritten(f"saving checkpoint {path} failed: {cause} ({free / 2**20:,.1f} MiB free on its "
                                   f"filesystem); it is incomplete and never resumed, {kept}")

    def _prune(self) -> None:
        complete = complete_checkpoints(self.directory)
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_path(old), ignore_errors=True)
        newest = int(TAG.match(complete[-1].name).group(1))
        for stale in self.directory.iterdir():  # incomplete saves older than the newest complete one
            match = TAG.match(stale.name)
            if match and int(match.group(1)) < newest and not (stale / COMPLETE).is_file():
                shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, checkpoint: Path) -> dict:
        """Load a checkpoint into ``engine`` (module, optimizer, scheduler); returns its client state."""
        path, client_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint}")
        return client_state or {}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
