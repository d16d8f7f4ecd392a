"""k-NN monitoring of a representation (DINO's protocol, Caron et al. 2021): the model's pooled,
L2-normalised features of a labelled bank (``knn.train_shards``) classify the features of
``knn.eval_shards`` by a vote of the k most cosine-similar bank samples, each weighted by
exp(similarity / temperature). It needs no training of its own, so a self-supervised run can
show ``knn/top1`` every ``train.eval_every`` steps.

The bank stays sharded: each rank keeps the features of its share of the bank shards. Queries
are taken a batch at a time from every rank, gathered, scored against each rank's bank, and each
rank's k best candidates gathered and merged (ties broken by the bank sample's index), so every
rank holds the same votes, and the result is the same on any number of ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data import EvalStream, Normalize, eval_batches


@torch.no_grad()
def bank_features(model, stream: EvalStream, normalize: Normalize, dtype: torch.dtype, *, zero3: bool,
                  show: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of the bank: (normalised features (n, d), labels (n,), index in the shards (n,))."""
    device, width = normalize.mean.device, getattr(model, "module", model).num_features
    none = torch.zeros(0, dtype=torch.long, device=device)
    features, labels, index = [torch.zeros(0, width, device=device)], [none], [none]  # a rank may hold none
    for batch, feats in _features(model, stream, normalize, dtype, zero3=zero3, show=show, desc="knn bank"):
        if feats.shape[1] == 0:
            continue  # padding this rank did not run
        keep = batch.mask.to(feats.device)
        features.append(feats[keep])
        labels.append(batch.labels.to(feats.device)[keep])
        index.append(batch.index.to(feats.device)[keep])
    return torch.cat(features), torch.cat(labels), torch.cat(index)


def _features(model, stream, normalize, dtype, *, zero3: bool, show: bool, desc: str):
    """(batch, its L2-normalised pooled features in fp32) for every batch of the rank; a ZeRO-3
    model runs every (padded) batch, since each forward gathers parameters collectively."""
    device = normalize.mean.device
    for batch in tqdm(eval_batches(stream), total=stream.batches_per_rank, disable=not show, desc=desc,
                      unit="batch", leave=False, dynamic_ncols=True):
        if not zero3 and not batch.mask.any():
            yield batch, torch.zeros(len(batch.mask), 0, device=device)
            continue
        images = normalize(batch.images.to(device)).to(dtype)
        yield batch, F.normalize(model(images, pre_logits=True).float(), dim=-1)


@torch.no_grad()
def knn_top1(model, bank: EvalStream, queries: EvalStream, normalize: Normalize, dtype: torch.dtype, *,
             k: int, temperature: float, num_classes: int, zero3: bool, show: bool) -> float:
    """Top-1 of the weighted k-NN vote over every sample of ``queries`` (the same value on every rank)."""
    world = dist.get_world_size()
    features, labels, index = bank_features(model, bank, normalize, dtype, zero3=zero3, show=show)
    correct = total = 0
    for batch, feats in _features(model, queries, normalize, dtype, zero3=zero3, show=show, desc="knn"):
        device = features.device
        if feats.shape[1] == 0:  # a padding batch this rank did not run
            feats = torch.zeros(len(batch.mask), features.shape[1], device=device)
        q = _gather(feats.contiguous(), world)
        q_labels = _gather(batch.labels.to(device), world)
        q_mask = _gather(batch.mask.to(device), world)
        # this rank's k best bank samples for every query of every rank
        sims = q @ features.T
        take = min(k, sims.shape[1])
        top, at = sims.topk(take, dim=1)
        cand = torch.full((len(q), k), float("-inf"), device=device)
        cand_label = torch.zeros((len(q), k), dtype=torch.long, device=device)
        cand_index = torch.full((len(q), k), -1, dtype=torch.long, device=device)
        cand[:, :take], cand_label[:, :take], cand_index[:, :take] = top, labels[at], index[at]
        # every rank's candidates -> the k best overall, in an order that does not depend on the ranks
        sims_all = torch.cat(_gather_list(cand, world), dim=1)
        labels_all = torch.cat(_gather_list(cand_label, world), dim=1)
        index_all = torch.cat(_gather_list(cand_index, world), dim=1)
        order = index_all.argsort(dim=1, stable=True)
        order = order.gather(1, sims_all.gather(1, order).argsort(dim=1, descending=True, stable=True))[:, :k]
        best, best_labels = sims_all.gather(1, order), labels_all.gather(1, order)
        weights = torch.where(torch.isfinite(best), (best / temperature).exp(), 0.0)
        votes = torch.zeros(len(q), num_classes, device=device).scatter_add_(1, best_labels, weights)
        hit = (votes.argmax(1) == q_labels) & q_mask
        correct += int(hit.sum())
        total += int(q_mask.sum())
    return correct / max(total, 1)


def _gather_list(tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return parts


def _gather(tensor: torch.Tensor, world: int) -> torch.Tensor:
    return torch.cat(_gather_list(tensor, world))
