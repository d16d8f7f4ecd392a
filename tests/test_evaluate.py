"""The evaluation tally: masked rows (padding, unreadable samples) count for nothing, and the
figures equal those computed directly from the unmasked rows."""

import torch
import torch.nn.functional as F

from pipeline.train.evaluation import ECE_BINS, Tally


def test_masked_rows_weigh_nothing_and_figures_match_a_direct_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g)
    labels = torch.randint(0, 7, (12,), generator=g)
    mask = torch.tensor([True] * 9 + [False] * 3)
    labels[10:] = -1  # padding rows carry label -1
    tally = Tally(7, torch.device("cpu"))
    tally.add(logits, labels, mask)
    report = tally.report([str(c) for c in range(7)])

    kept, truth = logits[:9], labels[:9]
    predicted = kept.argmax(-1)
    assert report["num_samples"] == 9
    assert report["top1"] == (predicted == truth).double().mean().item()
    top5 = kept.topk(5, -1).indices.eq(truth[:, None]).any(-1).double().mean().item()
    assert abs(report["top5"] - top5) < 1e-12
    assert abs(report["loss"] - F.cross_entropy(kept, truth).item()) < 1e-6
    assert tally.per_class[1].sum() == 9 and tally.confusion.sum() == 9
    assert torch.equal(tally.confusion[truth, predicted] > 0, torch.ones(9, dtype=torch.bool))
    assert tally.bins[0].sum() == 9 and tally.bins.shape == (3, ECE_BINS)
