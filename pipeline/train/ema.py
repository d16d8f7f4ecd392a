"""An exponential moving average of the weights, partitioned as ZeRO partitions the fp32 weights.

The EMA follows the fp32 master weights, not the bf16 parameters: a decay of 0.9999 moves a bf16
weight by less than its rounding step, so an EMA of bf16 values (or kept in bf16) silently drops
most updates. Each rank averages only the fp32 fragment that its optimizer owns, found through
DeepSpeed's tensor-fragment links (ZeRO-1/2, and the BF16 optimizer that ZeRO-1 with fp32
accumulation uses: ``param._hp_mapping``) or ZeRO-3's ``safe_get_local_fp32_param``. So the EMA
costs 4 bytes per parameter divided by the data-parallel ranks, and one fused ``lerp`` per step
with no collective and no host read.

Each fragment is a contiguous range of the flattened parameter: ``(start, values)``. A checkpoint
holds one ``ema/rankNNNNN.safetensors`` per rank with those ranges, so a resume at the same world
size reads only its own file, another world size re-slices them, and :func:`read_ema_state`
assembles whole tensors (export, fine-tuning from the EMA, evaluation of the EMA).

Evaluating the EMA in the training process (:meth:`ShardedEma.swapped_in`) writes it into the
bf16 parameters and afterwards rewrites them from the fp32 weights, which is exactly what they
held (the optimizer writes ``bf16(fp32 weight)`` after each step), so training goes on unchanged.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.model.weights import LazyTensor

EMA_DIR = "ema"
BUCKET_ELEMENTS = 1 << 27  # ZeRO-1/2: parameters all-reduced in buckets of this many elements


def ema_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / EMA_DIR / f"rank{rank:05d}.safetensors"


def decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay applied by the update after optimizer step ``step`` (1-based): timm's
    ModelEmaV3 rule (power 2/3, gamma 1): the first update copies the weights."""
    t = step - 1
    if t <= 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + t) ** (-2.0 / 3.0)) if warmup else decay


def local_fragment(param: torch.nn.Parameter) -> tuple[int, torch.Tensor] | None:
    """(start in the flattened parameter, the fp32 values this rank's optimizer owns there), a
    view that the optimizer updates in place; None where this rank owns none of it."""
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition, padded at the end of the last rank
        # safe_get_local_fp32_param returns a copy on the device where the optimizer is offloaded
        # to the CPU; its accessor returns the partition itself, wherever it lives.
        values, _ = param._z3_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        start = dist.get_rank() * values.numel()
        count = min(values.numel(), param.ds_numel - start)
        return (start, values[:count]) if count > 0 else None
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        if not hasattr(param, "_hp_mapping"):
            raise RuntimeError("train.ema_decay: the optimizer keeps no fp32 partitions that DeepSpeed links to the "
                               "parameters (ZeRO stage 0?); use deepspeed.zero_stage 1, 2 or 3")
        return None  # ZeRO-1/2: the parameter lies wholly in other ranks' partitions
    return mapping.lp_fragment_address.start, mapping.get_hp_fragment()


class ShardedEma:
    """The EMA of the trainable parameters of ``engine.module``, as this rank's fragments."""

    def __init__(self, engine, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.zero3 = engine.zero_optimization_stage() == 3
        self.params: dict[str, torch.nn.Parameter] = {}
        self.starts: dict[str, int] = {}
        masters: list[torch.Tensor] = []
        for name, param in engine.module.named_parameters():
            if not param.requires_grad:
                continue  # frozen: its EMA is itself
            self.params[name] = param
            found = local_fragment(param)
            if found is not None:
                self.starts[name] = found[0]
                masters.append(found[1].detach())  # a view: the optimizer's updates show through
        self.names = list(self.starts)
        self.masters = masters
        self.shadow = [m.clone() for m in masters]

    def update(self, step: int) -> None:
        """After optimizer step ``step``: shadow <- shadow + (1 - decay) * (fp32 weights - shadow)."""
        weight = 1.0 - decay_at(step, self.decay, self.warmup)
        if self.shadow:
            torch._foreach_lerp_(self.shadow, self.masters, weight)

    # -- evaluating the EMA in place ----------------------------------------------------------

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The module holds the EMA weights inside the block, its own weights after it (collective)."""
        self._write(self.shadow)
        try:
            yield
        finally:
            self._write(self.masters)

    @torch.no_grad()
    def _write(self, fragments: list[torch.Tensor]) -> None:
        values = dict(zip(self.names, fragments))
        if self.zero3:
            self._write_zero3(values)
        else:
            self._write_replicated(values)

    def _write_zero3(self, values: dict[str, torch.Tensor]) -> None:
        """Each rank writes its partitions; parameters ZeRO-3 keeps gathered (below its persistence
        threshold) are released first and gathered again after, as DeepSpeed does at a load."""
        params = list(self.params.values())
        persistent = [p for p in params if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].partition(persistent)
        for name, param in self.params.items():
            if name in values:
                part = param.ds_tensor.data.view(-1)
                part[: values[name].numel()].copy_(values[name])
        if persistent:
            persistent[0].all_gather(persistent)

    def _write_replicated(self, values: dict[str, torch.Tensor]) -> None:
        """ZeRO-1/2: every rank holds whole bf16 parameters but owns fragments of them: each writes
        its fragments into zeroed parameters and a sum over ranks completes them (exact: one rank
        contributes each element), in buckets."""
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for name, param in self.params.items():
            param.data.zero_()
            if name in values:
                param.data.view(-1)[self.starts[name]:self.starts[name] + values[name].numel()].copy_(values[name])
            bucket.append(param)
            size += param.numel()
            if size >= BUCKET_ELEMENTS:
                _all_reduce_params(bucket)
                bucket, size = [], 0
        _all_reduce_params(bucket)

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, checkpoint: Path, step: int) -> None:
        """This rank's fragments as ``checkpoint/ema/rankNNNNN.safetensors`` (every rank calls it)."""
        path = ema_file(checkpoint, dist.get_rank())
        path.parent.mkdir(parents=True, exist_ok=True)
        layout = {name: [self.starts[name], list(self.params[name].ds_shape if self.zero3 else self.params[name].shape)]
                  for name in self.names}
        tensors = {name: t.detach().cpu().contiguous() for name, t in zip(self.names, self.shadow)}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"layout": json.dumps(layout), "step": str(step),
                                               "decay": repr(self.decay), "world_size": str(dist.get_world_size())})
        tmp.replace(path)

    def load(self, checkpoint: Path) -> None:
        """This rank's fragments from a checkpoint saved at any world size and ZeRO stage."""
        own = ema_file(checkpoint, dist.get_rank())
        if own.is_file():
            with safe_open(str(own), framework="pt") as f:
                layout = json.loads(f.metadata()["layout"])
                if all(layout.get(n, [None])[0] == self.starts[n] and f.get_slice(n).get_shape() == [t.numel()]
                       for n, t in zip(self.names, self.shadow)):
                    for name, shadow in zip(self.names, self.shadow):
                        shadow.copy_(f.get_tensor(name))
                    return
        entries = read_ema_state(checkpoint)  # another layout: each fragment from the files that hold it
        missing = [n for n, t in zip(self.names, self.shadow)
                   if n not in entries or entries[n].read_into(t, self.starts[n]) != t.numel()]
        if missing:
            raise ValueError(f"checkpoint {checkpoint}: its EMA lacks parameters of this model: {missing[:5]}")


def _all_reduce_params(params: list[torch.nn.Parameter]) -> None:
    if not params:
        return
    flat = torch._utils._flatten_dense_tensors([p.data for p in params])
    dist.all_reduce(flat)
    for param, value in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.data for p in params])):
        param.data.copy_(value)


def has_ema(checkpoint: Path) -> bool:
    return any((Path(checkpoint) / EMA_DIR).glob("rank*.safetensors"))


class _EmaEntry(LazyTensor):
    """One whole EMA tensor of a checkpoint, assembled from the ranks' files on ``contiguous()``."""

    def __init__(self, key: str, shape: list[int]):
        super().__init__(shape, self._assemble)
        self.key = key
        self.pieces: list[tuple[Path, int, int]] = []  # (rank file, start in the flattened tensor, length)

    def read_into(self, out: torch.Tensor, start: int) -> int:
        """Copy what the files hold of the flattened tensor's ``[start, start + len(out))`` into
        ``out``, opening only the files that overlap it; returns how many values were found."""
        filled = 0
        for path, first, length in self.pieces:
            lo, hi = max(first, start), min(first + length, start + out.numel())
            if lo < hi:
                with safe_open(str(path), framework="pt") as f:
                    out[lo - start:hi - start].copy_(f.get_slice(self.key)[lo - first:hi - first])
                filled += hi - lo
        return filled

    def _assemble(self) -> torch.Tensor:
        out = torch.empty(self.shape.numel(), dtype=torch.float32)
        filled = self.read_into(out, 0)
        if filled != out.numel():
            raise ValueError(f"the EMA of {self.key} covers {filled} of its {out.numel()} values")
        return out.view(self.shape)


def read_ema_state(checkpoint: Path) -> dict[str, _EmaEntry]:
    """The EMA of every trainable parameter of a checkpoint, each read when it is asked for."""
    files = sorted((Path(checkpoint) / EMA_DIR).glob("rank*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {checkpoint} holds no EMA weights ({EMA_DIR}/): its run did not set "
                                f"train.ema_decay")
    entries: dict[str, _EmaEntry] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name, (start, shape) in json.loads(f.metadata()["layout"]).items():
                length = f.get_slice(name).get_shape()[0]
                entries.setdefault(name, _EmaEntry(name, shape)).pieces.append((path, start, length))
    return entries
