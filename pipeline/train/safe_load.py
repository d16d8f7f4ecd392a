"""Reading DeepSpeed ``.pt`` files without running their pickles.

``torch.load(weights_only=True)`` unpickles tensors, containers and the types allowlisted here:
those that DeepSpeed's checkpoints (ZeRO 0-3, the BF16 optimizer) and our client state really
contain. A file that names any other global (a function, a class of someone's code) is refused
before it is unpickled, with the file and the type named. DeepSpeed's own readers
(``zero_to_fp32``) load with ``weights_only=False``: :func:`check_checkpoint` inspects every file
of a checkpoint first. Resuming one's own run goes through ``engine.load_checkpoint`` as before.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from pipeline.errors import UserError

# What a DeepSpeed 0.19 checkpoint of this pipeline holds besides tensors and containers (found
# with torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3 checkpoints): the loss
# scaler, ZeRO's stage enum and the BF16 optimizer's fragment addresses in the optimizer states,
# numpy arrays in the client state (numpy's RNG state: a uint32 array, whose dtype class the
# unpickler builds without naming it as a global).
ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)


class UntrustedCheckpoint(UserError, ValueError):
    """A checkpoint file whose pickle names a global that no DeepSpeed checkpoint holds."""


def _resolve(name: str):
    module, _, attribute = name.rpartition(".")
    target = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def check_file(path: str | Path) -> None:
    """Refuse ``path`` if its pickle names a global outside torch's allowlist and :data:`ALLOWED`."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except RuntimeError as e:  # not torch.save's zip format: its pickle cannot be inspected
        raise UntrustedCheckpoint(f"checkpoint file '{path}' cannot be inspected ({e}): it is not unpickled") from None
    foreign = sorted(set(names) - set(ALLOWED))
    if foreign:
        raise UntrustedCheckpoint(
            f"checkpoint file '{path}' holds {', '.join(foreign)}, which no DeepSpeed checkpoint holds: it is not "
            f"unpickled, since a pickle runs code. If you trust its author, convert it once where you trust it: "
            f"load it with torch.load(weights_only=False) and save the weights with safetensors")


def check_checkpoint(directory: str | Path) -> None:
    """:func:`check_file` for every ``.pt`` file of a checkpoint directory."""
    for path in sorted(Path(directory).glob("*.pt")):
        check_file(path)


def load(path: str | Path, **kwargs):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's checkpoint types allowed; a file
    that holds anything else raises :class:`UntrustedCheckpoint` before it is unpickled."""
    check_file(path)
    with torch.serialization.safe_globals([_resolve(name) for name in ALLOWED]):
        return torch.load(path, weights_only=True, **kwargs)
