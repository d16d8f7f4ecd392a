#!/usr/bin/env python
"""Decode + RandomResizedCrop(224) + flip throughput: the plain PIL path against our fast path.

Input: 7 real photos from scikit-image at 500x375 (ImageNet-like) and 1600x1200 (web originals),
JPEG q=90, written into WebDataset shards. Measures images/s in one process with one thread (what
one DataLoader worker gets), alternating the paths round by round (with data.decode=gpu's share
of the worker: header, box and flip); a worker's other work per image (tar read, sample RNG,
batch stacking, the batch's move to shared memory); the end-to-end training loader with 1 and 2
workers; on CUDA, BatchFinisher's images/s per GPU; then the time to a worker's first batch when
it resumes at 90% of a 100,000-sample epoch, against a fresh start (`resume_deep_vs_start`,
target <= 2.0). Prints a table, then one JSON line.

    python benchmarks/data_throughput.py            # needs the bench extra: pip install -e '.[bench]'
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data import TrainLoader, TrainStream, TrainTransform, resolve_shards
from pipeline.data.stream import _ShardErrors, read_shards, seed_of
from pipeline.data.transforms import DeviceTrainTransform, baseline_train_transform, stack_images

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"]
SIZES = {"500x375": (500, 375), "1600x1200": (1600, 1200)}


def photos_as_jpeg(width: int, height: int) -> list[bytes]:
    import skimage.data

    out = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        buffer = io.BytesIO()
        image.resize((width, height), Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_shard(images: list[bytes], path: Path, copies: int) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i, data in enumerate(images * copies):
            sink.write({"__key__": f"img{i:05d}", "jpg": data, "cls": str(i % len(images)).encode()})


def alternating(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds each run takes in each of ``rounds``, the runs alternating within a round (so a
    drift in the machine's speed reaches them all alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def per_process_rates(images: list[bytes], rounds: int, passes: int) -> dict[str, float]:
    """Median images/s per path over ``rounds``, the paths alternating within each round."""
    baseline, fast, deferred = baseline_train_transform(224), TrainTransform(224), DeviceTrainTransform(224)
    rng = random.Random(0)
    paths = {"baseline": lambda data: baseline(data), "fast": lambda data: fast(data, rng),
             "gpu_worker": lambda data: deferred(data, rng)}
    times = alternating({name: lambda fn=fn: [fn(data) for data in images * passes] for name, fn in paths.items()},
                        rounds)
    return {name: statistics.median(len(images) * passes / t for t in values) for name, values in times.items()}


def loader_rate(shard: Path, workers: int, seconds: float, batch_size: int = 64) -> float:
    shards = resolve_shards(str(shard))
    stream = TrainStream(shards, TrainTransform(224), batch_size=batch_size, seed=0, num_workers=workers,
                         samples_per_epoch=10_000, shuffle_buffer=256)
    batches = iter(TrainLoader(stream))
    next(batches)  # workers started and warmed up
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(batches)
        count += batch_size
    return count / (time.perf_counter() - start)


def worker_overheads(shard: Path, rounds: int, batch_size: int = 64, batches: int = 8) -> dict[str, float]:
    """Microseconds per image of a training worker's work besides the transform, in one process
    (medians over ``rounds``): reading samples from the tar (webdataset), seeding each sample's
    RNG, stacking a batch, and moving the batch into shared memory, which DataLoader's pickling
    does to every batch a worker sends (a fresh segment each time)."""
    count = batch_size * batches

    def samples():
        return itertools.islice(read_shards(((str(shard), 0) for _ in itertools.count()), {}, _ShardErrors()), count)

    transform, rng = TrainTransform(224), random.Random(0)
    images = [transform(sample["jpg"], rng) for sample in itertools.islice(samples(), batch_size)]
    labels = [0] * batch_size
    times = alternating({
        "tar_read": lambda: list(samples()),
        "sample_rng": lambda: [random.Random(seed_of(0, 0, 0, 0, i)) for i in range(count)],
        "stack": lambda: [stack_images(images, labels) for _ in range(batches)],
        "stack_and_share": lambda: [stack_images(images, labels).images.share_memory_() for _ in range(batches)],
    }, rounds)
    us = {name: statistics.median(t / count * 1e6 for t in values) for name, values in times.items()}
    us["to_shared_memory"] = us.pop("stack_and_share") - us["stack"]
    return us


def time_to_first_batch(spec: str, samples: int, position: list[int] | None, batch_size: int = 64,
                        shuffle_buffer: int = 5000) -> float:
    """Seconds from a loader's start (one worker, as each worker resumes on its own) to its first
    batch, fresh or from a saved ``position`` (epoch, index, skipped, clean)."""
    shards = resolve_shards(spec)
    stream = TrainStream(shards, TrainTransform(224), batch_size=batch_size, seed=0, num_workers=1,
                         samples_per_epoch=samples, shuffle_buffer=shuffle_buffer)
    loader = TrainLoader(stream)
    if position is not None:
        loader.load_state_dict({"batches": 0, "positions": {"0": position}, "num_workers": 1, "world_size": 1,
                                "seed": 0})
    start = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - start


def resume_cost(tmp: Path, samples: int, rounds: int) -> dict[str, float]:
    """A worker epoch of ``samples`` 500x375 JPEGs in shards of the make_shards default size
    (with manifest counts); time to the first batch fresh, resumed at 90% (the replay over
    handles), and resumed at 90% by reading up to the position (what a shard failure in the
    epoch falls back to). Medians over alternating rounds; the read-to-resume path once."""
    from pipeline.data.shards import DEFAULT_MAX_COUNT
    from pipeline.data.writer import index_shards

    images, folder = photos_as_jpeg(500, 375), tmp / "resume"
    folder.mkdir()
    copies = -(-DEFAULT_MAX_COUNT // len(images))
    for i in range(-(-samples // (copies * len(images)))):
        write_shard(images, folder / f"train-{i:06d}.tar", copies=copies)
    index_shards(folder, progress=False)  # the manifest counts, from the tar headers
    spec, deep = str(folder / "train.json"), int(samples * 0.9)
    times: dict[str, list[float]] = {"start": [], "deep": []}
    for _ in range(rounds):
        times["start"].append(time_to_first_batch(spec, samples, None))
        times["deep"].append(time_to_first_batch(spec, samples, [0, deep, 0, 1]))
    figures = {name: statistics.median(values) for name, values in times.items()}
    figures["deep_by_reading"] = time_to_first_batch(spec, samples, [0, deep, 0, 0])
    figures["shard_bytes"] = sum(p.stat().st_size for p in folder.glob("*.tar"))
    return figures


def gpu_decode_rate(images: list[bytes], passes: int) -> float | None:
    """data.decode=gpu on CUDA: batches of 64 JPEGs left encoded by DeviceTrainTransform, finished
    by BatchFinisher (nvJPEG batch decode, crop, resize, flip on the GPU), images/s."""
    if not torch.cuda.is_available():
        return None
    from pipeline.data.device import BatchFinisher
    from pipeline.data.transforms import DeviceTrainTransform, stack_images

    transform, decoder, rng = DeviceTrainTransform(224), BatchFinisher(224, "cuda"), random.Random(0)
    crops = [transform(data, rng) for data in images * passes]
    batches = [stack_images(crops[i:i + 64], [0] * len(crops[i:i + 64])) for i in range(0, len(crops), 64)]
    decoder(batches[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        decoder(batch)
    torch.cuda.synchronize()
    return len(crops) / (time.perf_counter() - start)


def decode_candidates(images: list[bytes], size: tuple[int, int], rounds: int) -> list[tuple[str, str, float, float]]:
    """Ways to decode a JPEG and resample its RandomResizedCrop box to 224, side by side on the
    same boxes (alternating, median images/s over ``rounds``), each with the mean absolute
    difference (0-255 levels) from the exact crop: a full PIL decode, the box resampled by PIL."""
    import math

    import simplejpeg
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import resized_crop

    from pipeline.data.transforms import Encoded, crop_resize, dct_reduction, open_image, pil_to_uint8, sample_crop_box

    width, height = size
    rng = random.Random(0)
    boxes = [sample_crop_box(width, height, (0.08, 1.0), (3 / 4, 4 / 3), rng) for _ in range(6 * len(images))]

    def scaled(data, box, **kw):  # simplejpeg at a DCT scale, torch resample of the box
        left, top, w, h = box
        array = simplejpeg.decode_jpeg(data, **kw)
        sy, sx = array.shape[0] / height, array.shape[1] / width
        y0, x0 = round(top * sy), round(left * sx)
        return resized_crop(torch.from_numpy(array).permute(2, 0, 1), y0, x0, round((top + h) * sy) - y0,
                            round((left + w) * sx) - x0, [224, 224], antialias=True)

    def power_of_two(box):
        reduction = dct_reduction(min(box[2:]) / 224)
        return dict(min_factor=reduction, min_height=math.ceil(height / reduction),
                    min_width=math.ceil(width / reduction))

    def pil_draft(data, box):  # the CPU path until 2026-11-23 for boxes >= 2x the size
        left, top, w, h = box
        image = open_image(data)
        if min(w, h) >= 448:
            image.draft("RGB", (math.ceil(width * 224 / min(w, h)), math.ceil(height * 224 / min(w, h))))
        sx, sy = image.size[0] / width, image.size[1] / height
        return pil_to_uint8(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR,
                                                        box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)))

    def torchvision_full(data, box):  # the CPU path until 2026-11-23 for smaller boxes
        left, top, w, h = box
        decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return resized_crop(decoded, top, left, h, w, [224, 224], antialias=True)

    def simplejpeg_pil_resize(data, box):
        left, top, w, h = box
        array = simplejpeg.decode_jpeg(data, **power_of_two(box))
        sx, sy = array.shape[1] / width, array.shape[0] / height
        return pil_to_uint8(Image.fromarray(array).resize((224, 224), Image.Resampling.BILINEAR,
                                                          box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)))

    candidates = {  # id: (description, fn)
        "pil_draft": ("PIL draft (1/2,1/4,1/8) + PIL resize", pil_draft),
        "torchvision": ("torchvision full decode + torch resize", torchvision_full),
        "simplejpeg": ("simplejpeg 1/2,1/4,1/8 + torch resize (ours)",
                       lambda d, b: crop_resize(Encoded.read(d), b, 224)),
        "simplejpeg_fast": ("simplejpeg same, fastdct+fastupsample",
                            lambda d, b: scaled(d, b, fastdct=True, fastupsample=True, **power_of_two(b))),
        "simplejpeg_pil_resize": ("simplejpeg same + PIL resize", simplejpeg_pil_resize),
        "simplejpeg_any_scale": ("simplejpeg any M/8 scale + torch resize", lambda d, b: scaled(
            d, b, min_height=math.ceil(height * 224 / min(b[2:])), min_width=math.ceil(width * 224 / min(b[2:])))),
    }
    times = alternating({key: lambda fn=fn: [fn(images[i % len(images)], box) for i, box in enumerate(boxes)]
                         for key, (_, fn) in candidates.items()}, rounds)
    rows = []
    for key, (name, fn) in candidates.items():
        diffs = [(fn(images[i % len(images)], box).int() - crop_resize(Encoded.read(images[i % len(images)]), box, 224,
                                                                          fast=False).int()).abs().float().mean().item()
                 for i, box in enumerate(boxes[:30])]
        rows.append((key, name, statistics.median(len(boxes) / t for t in times[key]), statistics.mean(diffs)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per path (median taken)")
    parser.add_argument("--passes", type=int, default=6, help="passes over the 7 photos per round")
    parser.add_argument("--loader-seconds", type=float, default=8.0, help="timed seconds per loader run")
    parser.add_argument("--workers", default="1,2", help="loader worker counts to measure")
    parser.add_argument("--resume-samples", type=int, default=100_000,
                        help="samples in the worker epoch of the resume measurement (0: skip it)")
    parser.add_argument("--resume-rounds", type=int, default=3, help="alternating rounds of the resume measurement")
    parser.add_argument("--candidates", action="store_true",
                        help="also measure the decode candidates side by side (images/s, difference from exact)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's share

    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (width, height) in SIZES.items():
            images = photos_as_jpeg(width, height)
            rates = per_process_rates(images, args.rounds, args.passes)
            speedup = rates["fast"] / rates["baseline"]
            figures[f"speedup_{label}"] = round(speedup, 3)
            figures[f"baseline_{label}_img_s"] = round(rates["baseline"], 1)
            figures[f"fast_{label}_img_s"] = round(rates["fast"], 1)
            rows.append((label, "1 process, 1 thread", "baseline (PIL + RandomResizedCrop)", rates["baseline"]))
            rows.append((label, "1 process, 1 thread", "fast (header box, DCT-scaled box decode)", rates["fast"]))
            rows.append((label, "1 process, 1 thread", "data.decode=gpu: worker's share", rates["gpu_worker"]))
            # worker cores that data.decode=gpu frees at 1,000 images/s per GPU
            figures[f"gpu_worker_{label}_img_s"] = round(rates["gpu_worker"], 1)
            freed = 1000 / rates["fast"] - 1000 / rates["gpu_worker"]
            figures[f"gpu_mode_cores_freed_per_1k_img_s_{label}"] = round(freed, 2)
            shard = Path(tmp) / f"{label}.tar"
            write_shard(images, shard, copies=20)
            overheads = worker_overheads(shard, args.rounds)
            figures.update({f"worker_{name}_{label}_us": round(us, 1) for name, us in overheads.items()})
            for workers in (int(w) for w in args.workers.split(",")):
                rate = loader_rate(shard, workers, args.loader_seconds)
                figures[f"loader_{label}_{workers}w_img_s"] = round(rate, 1)
                rows.append((label, f"loader, {workers} worker(s)", "fast, end to end (batches of 64)", rate))
            gpu = gpu_decode_rate(images, args.passes)
            if gpu is not None:
                figures[f"gpu_decode_{label}_img_s"] = round(gpu, 1)
                rows.append((label, torch.cuda.get_device_name(), "data.decode=gpu: BatchFinisher, batches of 64", gpu))
            if args.candidates:
                for key, name, rate, diff in decode_candidates(images, (width, height), args.rounds):
                    figures[f"candidate_{label}_{key}_img_s"] = round(rate, 1)
                    figures[f"candidate_{label}_{key}_mean_abs_diff"] = round(diff, 2)
                    rows.append((label, "1 process, 1 thread", f"{name} (|diff| {diff:.2f})", rate))
        if args.resume_samples:
            resume = resume_cost(Path(tmp), args.resume_samples, args.resume_rounds)
            figures["resume_deep_vs_start"] = round(resume["deep"] / resume["start"], 3)
            figures.update({f"resume_{k}_s": round(v, 3) for k, v in resume.items() if k != "shard_bytes"},
                           resume_epoch_samples=args.resume_samples,
                           resume_shard_gb=round(resume["shard_bytes"] / 1e9, 2))

    print(f"{'input':<10} {'setting':<24} {'path':<58} {'images/s':>9}")
    for label, setting, path, rate in rows:
        print(f"{label:<10} {setting:<24} {path:<58} {rate:>9.1f}")
    print(f"speedup (fast / baseline): 500x375 {figures['speedup_500x375']:.2f}x, "
          f"1600x1200 {figures['speedup_1600x1200']:.2f}x  (targets: >= 2.0x, >= 3.0x)")
    for label in SIZES:
        print(f"a worker's work per image besides the transform ({label}): " + ", ".join(
            f"{name.replace('_', ' ')} {figures[f'worker_{name}_{label}_us']:.0f} us"
            for name in ("tar_read", "sample_rng", "stack", "to_shared_memory")))
    if "resume_deep_vs_start" in figures:
        print(f"time to a worker's first batch ({figures['resume_epoch_samples']:,}-sample epoch, buffer 5000): "
              f"fresh {figures['resume_start_s']:.2f} s, resumed at 90% {figures['resume_deep_s']:.2f} s "
              f"(by reading up to it: {figures['resume_deep_by_reading_s']:.2f} s); "
              f"resume_deep_vs_start {figures['resume_deep_vs_start']:.2f} (target <= 2.0)")
    figures.update(machine=platform.machine(), cpu_count=os.cpu_count(),
                   torch=torch.__version__)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
