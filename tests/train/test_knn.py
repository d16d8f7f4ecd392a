"""k-NN monitoring: the sharded bank gives the same top-1 on 1 and 2 ranks, and that top-1 is
the plain single-process vote."""

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.data import EvalStream, EvalTransform, Normalize, eval_batches, resolve_shards
from pipeline.model import create_vit
from pipeline.train.distributed import free_port, init_local_group
from pipeline.train.knn import knn_top1

K, TEMPERATURE = 20, 0.07


def model():
    torch.manual_seed(0)
    return create_vit("pico/2", num_classes=10, image_size=8).init_weights().eval()


def stream(shards: Path, split: str, rank: int = 0, world: int = 1) -> EvalStream:
    return EvalStream(resolve_shards(str(shards / f"{split}.json")), EvalTransform(8, 1.0), batch_size=16, rank=rank,
                      world_size=world, image_size=8, num_classes=10)


def _worker(rank, world, shards, out):
    init_local_group(rank, world, int(os.environ["TEST_KNN_PORT"]))
    top1 = knn_top1(model(), stream(Path(shards), "train", rank, world), stream(Path(shards), "val", rank, world),
                    Normalize((0.5,) * 3, (0.5,) * 3), torch.float32, k=K, temperature=TEMPERATURE, num_classes=10,
                    zero3=False, show=False)
    torch.save(top1, Path(out) / f"top1-{world}-{rank}.pt")
    torch.distributed.destroy_process_group()


def reference(shards: Path) -> float:
    """The vote in one process, over every sample at once."""
    net, normalize = model(), Normalize((0.5,) * 3, (0.5,) * 3)

    def features(split):
        feats, labels = [], []
        for batch in eval_batches(stream(shards, split)):
            with torch.no_grad():
                feats.append(F.normalize(net(normalize(batch.images), pre_logits=True), dim=-1)[batch.mask])
            labels.append(batch.labels[batch.mask])
        return torch.cat(feats), torch.cat(labels)

    bank, bank_labels = features("train")
    queries, labels = features("val")
    sims, at = (queries @ bank.T).topk(K, dim=1)
    votes = torch.zeros(len(queries), 10).scatter_add_(1, bank_labels[at], (sims / TEMPERATURE).exp())
    return (votes.argmax(1) == labels).double().mean().item()


def test_knn_top1_is_the_same_on_one_and_two_ranks(digits_shards, tmp_path):
    results = {}
    for world in (1, 2):
        os.environ["TEST_KNN_PORT"] = str(free_port())
        mp.spawn(_worker, args=(world, str(digits_shards), str(tmp_path)), nprocs=world, join=True)
        results[world] = [torch.load(tmp_path / f"top1-{world}-{r}.pt") for r in range(world)]
    assert results[1][0] == results[2][0] == results[2][1]  # exactly, on every rank
    assert results[1][0] == reference(digits_shards)
    assert 0.2 < results[1][0] <= 1.0  # random features of digits already cluster above chance (0.1)
