import itertools
import logging
import os
import signal
import subprocess
import sys
from multiprocessing import forkserver
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import (
    EvalStream, EvalTransform, TrainLoader, TrainStream, TrainTransform, eval_batches, resolve_shards,
)
from pipeline.data.writer import index_shards
from pipeline.train.distributed import free_port, init_local_group
from tests.helpers import ROOT


def train_loader(spec, num_workers=0, batch_size=4, counts=None, **kw):
    shards = resolve_shards(spec)
    shards.counts = counts  # as a manifest would give them
    stream = TrainStream(shards, TrainTransform(16, hflip=0.5), batch_size=batch_size, seed=7,
                         num_workers=num_workers, shuffle_buffer=16, **kw)
    return TrainLoader(stream)


def take(loader, n):
    return [(b.images.clone(), b.labels.clone()) for b in itertools.islice(loader, n)]


@pytest.mark.parametrize("counted", [False, True], ids=["read-to-resume", "replay-handles"])
@pytest.mark.parametrize("num_workers, first", [(0, 5), (2, 5), (2, 4)])
def test_resume_yields_the_same_batches(make_shards, num_workers, first, counted):
    # 3 shards of 10 samples, 30 per epoch: 11 batches of 4 cross epoch boundaries in each worker.
    # With manifest counts a resume replays the shuffle over handles and reads only its buffer.
    spec, _ = make_shards([10, 10, 10])
    counts = [10, 10, 10] if counted else None
    straight = take(train_loader(spec, num_workers, samples_per_epoch=30, counts=counts), 11)

    before = train_loader(spec, num_workers, samples_per_epoch=30, counts=counts)
    head = take(before, first)
    state = before.state_dict()
    after = train_loader(spec, num_workers, samples_per_epoch=30, counts=counts)
    assert after.stream.replayable == counted
    after.load_state_dict(state)
    tail = take(after, 11 - first)
    for i, ((a_images, a_labels), (b_images, b_labels)) in enumerate(zip(straight, head + tail)):
        torch.testing.assert_close(a_images, b_images, rtol=0, atol=0, msg=f"batch {i}")
        torch.testing.assert_close(a_labels, b_labels, rtol=0, atol=0, msg=f"batch {i}")
    assert after.batches == 11


@pytest.mark.parametrize("indexed", [False, True], ids=["header-walk", "sidecar"])
def test_deep_resume_reads_only_the_shuffle_buffer(make_shards, monkeypatch, indexed):
    """Resumed at 80% of a 200-sample worker epoch (buffer 16): the replay over handles reads the
    16 buffered samples and what the next batches need, where reading up to the position would
    read 160 first. The batches equal the uninterrupted run's, a shard failure in the epoch
    falls back to reading, and a pre-existing 3-field position too. With sample index sidecars
    no tar header is walked."""
    import pipeline.data.stream as stream_module
    from pipeline.data import tarindex

    spec, _ = make_shards([10] * 20)
    if indexed:
        for url in resolve_shards(spec).urls:
            tarindex.write_sidecar(url)
    walks = []
    original_walk = tarindex.ShardIndex.walk
    monkeypatch.setattr(tarindex.ShardIndex, "walk", classmethod(
        lambda cls, path: walks.append(path) or original_walk(path)))
    counts = [10] * 20
    straight = take(train_loader(spec, samples_per_epoch=200, counts=counts), 44)
    before = train_loader(spec, samples_per_epoch=200, counts=counts)
    take(before, 40)
    state = before.state_dict()
    assert state["positions"]["0"][:2] == [0, 160] and state["positions"]["0"][3] == 1

    read = []
    for name in ("shard_samples", "shard_members"):
        original = getattr(stream_module, name)

        def counting(*args, _original=original, **kw):
            for item in _original(*args, **kw):
                read.append(item)
                yield item

        monkeypatch.setattr(stream_module, name, counting)
    original_tar = stream_module.wds.tarfile_samples
    monkeypatch.setattr(stream_module.wds, "tarfile_samples",
                        lambda *a, **kw: (read.append(s) or s for s in original_tar(*a, **kw)))

    def resumed(position):
        read.clear()
        after = train_loader(spec, samples_per_epoch=200, counts=counts)
        after.load_state_dict(dict(state, positions={"0": position}))
        tail = take(after, 4)
        for i, ((a, _), (b, _)) in enumerate(zip(straight[40:], tail)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"batch {40 + i}")
        return len(read)

    tarindex._cached_index.cache_clear()
    replayed = resumed(state["positions"]["0"])
    assert replayed <= 16 + 4 * 4 + 10, replayed
    assert (len(walks) == 0) == indexed, walks
    assert resumed(state["positions"]["0"][:3] + [0]) >= 160  # a shard failed in this epoch: read to resume
    assert resumed(state["positions"]["0"][:3]) >= 160  # saved before positions said


def test_a_shard_longer_than_its_manifest_is_named_and_not_replayed(make_shards, caplog):
    spec, _ = make_shards([10, 10])
    loader = train_loader(spec, samples_per_epoch=40, counts=[8, 8])  # shards rewritten since indexed
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        take(loader, 8)
    assert "holds at least 9 samples, its manifest says 8: re-run make_shards.py --index" in caplog.text
    assert loader.positions[0].clean == 0  # a resume of this epoch reads up to its position


def test_shuffle_draws_as_webdatasets_does():
    import random

    import webdataset as wds

    from pipeline.data.stream import shuffled

    ours = list(shuffled(iter(range(500)), [], 64, 10, random.Random(3)))
    theirs = list(wds.filters._shuffle(iter(range(500)), 64, 10, rng=random.Random(3)))
    assert ours == theirs[:len(ours)] and len(ours) > 400


def test_ranks_and_seeds_give_different_streams(make_shards):
    spec, _ = make_shards([10, 10])
    a = take(train_loader(spec, rank=0, world_size=2, samples_per_epoch=20), 2)
    b = take(train_loader(spec, rank=1, world_size=2, samples_per_epoch=20), 2)
    assert not torch.equal(a[0][0], b[0][0])


def test_length_does_not_depend_on_workers(make_shards):
    spec, _ = make_shards([10, 10])
    steps = {w: train_loader(spec, w, world_size=2, rank=1, samples_per_epoch=1000).steps_per_epoch for w in (0, 1, 3)}
    assert set(steps.values()) == {1000 // (4 * 2)}
    loader = train_loader(spec, 3, samples_per_epoch=1000)
    batches = take(loader, 7)
    assert [len(labels) for _, labels in batches] == [4] * 7


def test_restore_with_other_worker_count_warns_and_continues(make_shards, caplog):
    spec, _ = make_shards([10, 10])
    loader = train_loader(spec, 2, samples_per_epoch=20)
    take(loader, 3)
    other = train_loader(spec, 0, samples_per_epoch=20)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(loader.state_dict())
    assert "restarts at epoch" in caplog.text
    assert len(take(other, 2)) == 2


def test_bad_samples_are_skipped_counted_and_named(make_shards, caplog):
    bad = {3: "corrupt", 9: "nolabel", 15: "empty"}
    spec, keys = make_shards([23], bad=bad)
    loader = train_loader(spec, 0, batch_size=1, samples_per_epoch=23)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        for _ in itertools.islice(loader, 40):
            pass
    # Replay the raw (undecoded) order up to the saved position and count the bad keys in it.
    epoch, index, skipped, _ = loader.positions[0]
    stream = loader.stream
    raw = [s["__key__"] for e in range(epoch + 1)
           for s in itertools.islice(stream.epoch_samples(0, e, errors=None), index if e == epoch else None)]
    expected = sum(raw.count(keys[i]) for i in bad)
    assert expected >= 3 and skipped == expected == loader.skipped
    assert len(raw) - expected == 40
    for i in bad:
        assert f"key '{keys[i]}' in shard '{spec.split('{')[0]}000000.tar'" in caplog.text
    assert "no label (.cls)" in caplog.text and "empty image" in caplog.text


def test_truncated_shard_is_reported_and_training_goes_on(make_shards, caplog):
    spec, _ = make_shards([20, 20])
    first = resolve_shards(spec).urls[0]
    data = Path(first).read_bytes()
    Path(first).write_bytes(data[: len(data) // 2])
    loader = train_loader(spec, 0, samples_per_epoch=40, counts=[20, 20])
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        batches = take(loader, 25)
    assert len(batches) == 25
    assert "s-000000.tar' gave" in caplog.text and "truncated" in caplog.text
    assert loader.skipped > 0


def test_no_samples_per_epoch_is_a_clear_error(make_shards):
    spec, _ = make_shards([4])
    with pytest.raises(ValueError, match=r"samples_per_epoch is unknown.*make_shards.py --index DIR"):
        train_loader(spec)


def test_shuffle_buffer_in_bytes_holds_that_many_bytes_of_the_manifests_samples(make_shards, tmp_path):
    spec, _ = make_shards([10, 10, 10])
    index_shards(tmp_path, progress=False)  # a manifest with the shards' sizes, from their headers
    shards = resolve_shards(str(tmp_path / "s.json"))
    sample = sum((tmp_path / f"s-{i:06d}.tar").stat().st_size for i in range(3)) / 30
    assert shards.sample_bytes == sample
    budget = DataConfig(shuffle_buffer=f"{sample * 12.5 / 1000}kB").shuffle_buffer  # as a config gives it
    by_size = TrainStream(shards, TrainTransform(16), batch_size=4, seed=7, shuffle_buffer=budget)
    assert by_size.shuffle_buffer == 12  # whole samples within the budget
    by_count = TrainStream(shards, TrainTransform(16), batch_size=4, seed=7, shuffle_buffer=12)
    for i, (a, b) in enumerate(zip(take(TrainLoader(by_size), 8), take(TrainLoader(by_count), 8))):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0, msg=f"batch {i}")
    bare = resolve_shards(spec)  # no manifest: a size cannot become a sample count
    with pytest.raises(ValueError, match=r"data.shuffle_buffer is a size .* --index"):
        TrainStream(bare, TrainTransform(16), batch_size=4, seed=7, samples_per_epoch=30, shuffle_buffer=budget)


def eval_indices(spec, world_size, num_workers, batch_size=4, transform=None):
    shards = resolve_shards(spec)
    per_rank, counts = [], []
    for rank in range(world_size):
        stream = EvalStream(shards, transform or EvalTransform(16), batch_size=batch_size, rank=rank,
                            world_size=world_size, num_workers=num_workers, image_size=16)
        batches = list(eval_batches(stream))
        counts.append(len(batches))
        per_rank.append(batches)
    return per_rank, counts


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 0), (2, 2), (3, 4)])
def test_eval_sees_every_sample_exactly_once(make_shards, world_size, num_workers):
    spec, keys = make_shards([5, 1, 9])  # uneven, and fewer shards than ranks x workers
    per_rank, counts = eval_indices(spec, world_size, num_workers)
    assert len(set(counts)) == 1, f"ranks run different batch counts: {counts}"
    seen = sorted(int(i) for batches in per_rank for b in batches for i in b.index[b.mask])
    assert seen == list(range(len(keys)))
    for batches in per_rank:
        for b in batches:
            assert b.images.shape == (4, 3, 16, 16) and (b.labels[~b.mask] == -1).all()
            torch.testing.assert_close(b.labels[b.mask], b.index[b.mask] % 10)


def test_eval_masks_and_counts_bad_samples(make_shards):
    spec, keys = make_shards([6, 6], bad={1: "corrupt", 7: "nolabel"})
    per_rank, _ = eval_indices(spec, 2, 1)
    batches = [b for rank in per_rank for b in rank]
    assert sum(int(b.skipped) for b in batches) == 2
    assert sorted(int(i) for b in batches for i in b.index[b.mask]) == [i for i in range(12) if i not in (1, 7)]


def test_eval_survives_a_truncated_shard(make_shards):
    spec, keys = make_shards([10, 10])
    first = resolve_shards(spec).urls[0]
    data = Path(first).read_bytes()
    Path(first).write_bytes(data[: len(data) // 2])
    shards = resolve_shards(spec)
    shards.counts = [10, 10]  # as a manifest written before the damage would say
    batches = list(eval_batches(EvalStream(shards, EvalTransform(16), batch_size=4, image_size=16)))
    good = sum(int(b.mask.sum()) for b in batches)
    assert 10 <= good < 20
    assert good + sum(int(b.skipped) for b in batches) == 20


def _eval_worker(rank, world_size, spec, out_dir):
    import torch.distributed as dist

    init_local_group(rank, world_size, int(os.environ["TEST_EVAL_PORT"]))
    stream = EvalStream(resolve_shards(spec), EvalTransform(16), batch_size=2, rank=rank, world_size=world_size,
                        num_workers=2, image_size=16)
    indices, batches = [], 0
    for batch in eval_batches(stream):
        count = torch.tensor([int(batch.mask.sum())])
        dist.all_reduce(count)  # a collective per batch, as a ZeRO-3 forward is: a mismatch would hang
        batches += 1
        indices += batch.index[batch.mask].tolist()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (indices, batches))
    if rank == 0:
        torch.save(gathered, Path(out_dir) / "result.pt")
    dist.destroy_process_group()
    threads = [Path(t, "comm").read_text().strip() for t in Path("/proc/self/task").iterdir()]
    assert not [t for t in threads if "gloo" in t], "gloo threads outlive the group"


def test_eval_exact_on_two_processes(make_shards, tmp_path):

    import torch.multiprocessing as mp

    spec, keys = make_shards([7, 2, 12])  # 3 uneven shards
    os.environ["TEST_EVAL_PORT"] = str(free_port())
    mp.spawn(_eval_worker, args=(2, spec, str(tmp_path)), nprocs=2, join=True)
    gathered = torch.load(tmp_path / "result.pt")
    assert gathered[0][1] == gathered[1][1]  # same number of batches on both ranks
    everything = sorted(gathered[0][0] + gathered[1][0])
    assert everything == list(range(len(keys)))


def test_starting_the_loader_leaves_the_global_rng_alone(make_shards):
    spec, _ = make_shards([10, 10])
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    take(train_loader(spec, 2, samples_per_epoch=20), 1)
    assert torch.rand(1) == expected


def test_labels_outside_the_classes_are_skipped_counted_and_named(make_shards, caplog):
    spec, keys = make_shards([10, 10])  # labels are index % 10
    loader = train_loader(spec, samples_per_epoch=20, num_classes=8)  # 8 and 9 are out of range
    with caplog.at_level(logging.WARNING):
        batches = take(loader, 4)
    assert all(int(labels.max()) < 8 for _, labels in batches)
    assert loader.skipped >= 2
    assert "label 8 outside [0, 8)" in caplog.text or "label 9 outside [0, 8)" in caplog.text
    assert "in shard '" in caplog.text
    shards = resolve_shards(spec)
    batches = list(eval_batches(EvalStream(shards, EvalTransform(16), batch_size=4, image_size=16, num_classes=8)))
    assert sum(int(b.skipped) for b in batches) == 4  # indices 8, 9, 18, 19
    assert all(int(b.labels[b.mask].max()) < 8 for b in batches if b.mask.any())


def _bytes_read() -> int:
    """Bytes this process has read through read() calls (Linux /proc/self/io 'rchar')."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar")).split()[1])


@pytest.mark.parametrize("sizes, streams", [([12, 12], (2, 4)), ([3, 5, 4, 6, 2, 4, 3, 5], (2, 2))],
                         ids=["fewer-shards-than-streams", "more-shards-than-streams"])
def test_eval_reads_each_shard_once_across_all_streams(make_shards, sizes, streams):
    """Every (rank, worker) stream of a job reads its range; together they read the shards'
    bytes once, plus tar headers where a stream starts inside a shard."""
    spec, keys = make_shards(sizes, size=(192, 256))  # ~40 kB JPEGs, as photos dwarf their tar headers
    shards = resolve_shards(spec)
    shards.counts = sizes
    total = sum(Path(u).stat().st_size for u in shards.urls)
    world_size, workers = streams
    seen, read = [], 0
    for rank in range(world_size):
        stream = EvalStream(shards, EvalTransform(16), batch_size=4, rank=rank, world_size=world_size,
                            num_workers=workers, image_size=16)
        for lo, hi in stream.ranges[rank]:
            before = _bytes_read()
            seen += [index for index, sample in stream._samples(lo, hi) if sample is not None]
            read += _bytes_read() - before
    assert sorted(seen) == list(range(len(keys)))
    # Reading each shard from byte 0 up to a stream's range would read ~2.5x here.
    assert read < 1.15 * total, (read, total)
    if len(sizes) >= world_size * workers:  # whole shards: no stream starts inside a shard
        assert all(lo in set(itertools.accumulate(sizes, initial=0)) for r in stream.ranges for lo, _ in r)


def test_workers_fork_from_the_server_and_outlive_the_schedulers_signals(make_shards):
    # A worker forked from this (threaded) process can deadlock before it runs; a worker killed by
    # the SIGUSR1 that SLURM sends the whole step would take the trainer with it.
    spec, _ = make_shards([10, 10, 10])
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    batches = iter(train_loader(spec, num_workers=2, samples_per_epoch=30))
    next(batches)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # this process's mask is untouched
    assert forkserver._forkserver._forkserver_pid is not None
    workers = psutil.Process(forkserver._forkserver._forkserver_pid).children()
    assert len(workers) == 2
    helpers = psutil.Process().children()  # the fork server and its resource tracker
    for worker in workers:
        worker.send_signal(signal.SIGUSR1)
    for helper in helpers:
        helper.send_signal(signal.SIGUSR1)
        helper.send_signal(signal.SIGTERM)
    assert len(list(itertools.islice(batches, 20))) == 20
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers + helpers)


TRAINER = """
import sys, time
import psutil
from multiprocessing import forkserver
from tests.data.test_stream import train_loader
batches = iter(train_loader(sys.argv[1], num_workers=2, samples_per_epoch=30))
next(batches)
print(*(p.pid for p in psutil.Process(forkserver._forkserver._forkserver_pid).children()), flush=True)
if sys.argv[2] == "exit":
    sys.exit(3)
time.sleep(600)
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_a_trainer_that_ends_with_its_loader_open_leaves_no_worker(make_shards, end):
    # Exiting with a loader open (an error mid-epoch): multiprocessing joins the workers at exit,
    # so they must take the SIGTERM it sends. Killed outright: the workers see it themselves.
    spec, _ = make_shards([10, 10, 10])
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, spec, end], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        workers = [psutil.Process(int(pid)) for pid in trainer.stdout.readline().split()]
        assert len(workers) == 2
        if end == "kill":
            trainer.kill()
        assert trainer.wait(timeout=60) == (3 if end == "exit" else -signal.SIGKILL)
    finally:
        trainer.kill()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
