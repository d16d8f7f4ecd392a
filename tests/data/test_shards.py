import csv
import dataclasses
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data import resolve_shards
from pipeline.data.preflight import preflight
from pipeline.data.sources import digits_source, open_source, synthetic_source
from pipeline.data.writer import index_shards, split_items, write_shards, write_split

from .conftest import jpeg_bytes

ROOT = Path(__file__).resolve().parents[2]


def read_all(manifest: Path) -> list[dict]:
    shards = resolve_shards(str(manifest))
    return [s for url in shards.urls for s in wds.tarfile_samples([{"url": url}])]


def test_make_shards_digits_writes_every_digit(tmp_path):
    out = tmp_path / "digits"
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch/make_shards.py"), "--source", "digits", "--out", str(out),
         "--val-fraction", "0.2", "--max-count", "500", "--quiet"],
        capture_output=True, text=True, check=True,
    )
    assert "train:" in result.stdout
    train, val = (json.loads((out / f"{s}.json").read_text()) for s in ("train", "val"))
    assert train["num_samples"] + val["num_samples"] == 1797
    assert val["num_samples"] == round(1797 * 0.2)
    assert train["classes"] == [str(i) for i in range(10)] and train["num_classes"] == 10
    assert [s["url"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all(s["num_samples"] <= 500 for s in train["shards"])
    keys = set()
    for split in ("train", "val"):
        samples = read_all(out / f"{split}.json")
        assert len(samples) == json.loads((out / f"{split}.json").read_text())["num_samples"]
        keys |= {s["__key__"] for s in samples}
    assert len(keys) == 1797
    # Lossless: the PNG holds the digit exactly.
    from sklearn.datasets import load_digits

    digits = load_digits()
    sample = next(s for s in read_all(out / "val.json"))
    index = int(sample["__key__"].split("-")[1])
    pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
    np.testing.assert_array_equal(pixels, np.round(digits.images[index] * 255 / 16).astype(np.uint8))
    assert int(sample["cls"]) == digits.target[index]


def test_split_is_deterministic_and_disjoint():
    items = digits_source().items
    a, b = split_items(items, 0.25, seed=3), split_items(items, 0.25, seed=3)
    assert [i.key for i in a["val"]] == [i.key for i in b["val"]]
    assert {i.key for i in a["train"]}.isdisjoint({i.key for i in a["val"]})
    assert [i.key for i in split_items(items, 0.25, seed=4)["val"]] != [i.key for i in a["val"]]
    with pytest.raises(ValueError, match="val-fraction"):
        split_items(items, 1.0, seed=0)


def test_byte_limit_splits_shards(tmp_path):
    manifests = write_shards(digits_source(), tmp_path, val_fraction=0.0, max_bytes=50_000, progress=False)
    shards = manifests["train"]["shards"]
    assert len(shards) > 3 and "val" not in manifests
    assert all(40_000 < s["num_bytes"] <= 50_000 for s in shards[:-1])
    assert sum(s["num_samples"] for s in shards) == 1797


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for name in ["cat", "dog"]:
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (900, 600, 3), dtype=np.uint8)
            (root / name / f"{name}.{i}.jpg").write_bytes(jpeg_bytes(pixels))
    Image.new("RGBA", (40, 30), (1, 2, 3, 128)).save(root / "dog" / "small.png")
    (root / "dog" / "broken.jpg").write_bytes(b"")
    return root


def test_imagefolder_source_with_max_side(image_folder, tmp_path):
    manifests = write_shards(open_source(f"imagefolder:{image_folder}"), tmp_path / "out", val_fraction=0.0,
                             max_side=256, progress=False)
    train = manifests["train"]
    assert train["classes"] == ["cat", "dog"]
    assert train["num_samples"] == 7 and len(train["skipped"]) == 1 and "broken.jpg" in train["skipped"][0]["origin"]
    samples = {s["__key__"]: s for s in read_all(tmp_path / "out/train.json")}
    big = samples["cat/cat_0"]
    assert max(Image.open(io.BytesIO(big["jpg"])).size) == 256  # re-encoded
    assert "png" in samples["dog/small"]  # small images pass through untouched
    assert int(samples["dog/dog_1"]["cls"]) == 1


def test_list_source(image_folder, tmp_path):
    csv_path = image_folder / "list.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([["cat/cat.0.jpg", "feline"], ["dog/dog.0.jpg", "canine"], ["dog/small.png", "canine"]])
    source = open_source(f"list:{csv_path}")
    assert source.classes == ["canine", "feline"]
    assert [i.label for i in source.items] == [1, 0, 0]
    with pytest.raises(ValueError, match="unknown --source"):
        open_source("folder:/x")


def test_missing_shards_name_the_url(tmp_path, make_shards):
    spec, _ = make_shards([3, 3])
    assert len(resolve_shards(spec).urls) == 2
    with pytest.raises(FileNotFoundError, match=r"missing shard '.*s-000002.tar'"):
        resolve_shards(spec.replace("000001", "000002"))
    with pytest.raises(FileNotFoundError, match=r"no shard matches '.*nothing-"):
        resolve_shards(str(tmp_path / "nothing-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        resolve_shards(str(tmp_path / "nope.json"))


def test_preflight_reports_bad_samples_by_shard_and_key(tmp_path, make_shards):
    spec, keys = make_shards([4, 3], bad={2: "corrupt", 5: "nolabel"}, name="train")
    urls = resolve_shards(spec).urls
    manifest = {"split": "train", "num_samples": 7, "classes": [str(i) for i in range(10)],
                "shards": [{"url": Path(u).name, "num_samples": n} for u, n in zip(urls, [4, 3])]}
    (tmp_path / "train.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--check", str(tmp_path),
                             "--world-size", "1", "--workers", "2", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "train: 7 samples in 2 shards" in result.stdout
    assert "unreadable: 2" in result.stdout
    assert f"train-000000.tar key={keys[2]}" in result.stdout and f"train-000001.tar key={keys[5]}" in result.stdout
    assert "no label (.cls)" in result.stdout
    assert "2 streams: suits it" in result.stdout


def test_tar_headers_give_sample_counts_and_offsets(make_shards, tmp_path):
    from pipeline.data.tarindex import count_samples, shard_samples

    spec, keys = make_shards([7])
    url = resolve_shards(spec).urls[0]
    assert count_samples(url) == 7
    assert [s["__key__"] for s in shard_samples(url, skip=4)] == keys[4:]
    assert list(shard_samples(url, skip=7)) == []


@pytest.mark.parametrize("fmt", ["pax-float-mtime", "pax-long-names", "gnu-long-names", "ustar-prefix"])
def test_header_walk_finds_what_webdataset_reads(tmp_path, fmt):
    """Samples read by their offsets from the header walk equal webdataset's, whatever headers
    the writer used: webdataset's default (a pax header per file for its float mtime), pax and
    GNU long names, ustar name prefixes."""
    import tarfile

    from pipeline.data.tarindex import count_samples, shard_members, shard_samples

    path = tmp_path / f"{fmt}.tar"
    stem = {"pax-float-mtime": "k", "ustar-prefix": "d" * 120 + "/k"}.get(fmt, "d" * 120 + "/" + "k" * 30)
    if fmt == "pax-float-mtime":
        with wds.TarWriter(str(path)) as sink:
            for i in range(7):
                sink.write({"__key__": f"{stem}{i:03d}", "jpg": bytes([i]) * (100 + 300 * i), "cls": str(i).encode()})
    else:
        formats = {"pax-long-names": tarfile.PAX_FORMAT, "gnu-long-names": tarfile.GNU_FORMAT}
        tar_format = formats.get(fmt, tarfile.USTAR_FORMAT)
        with tarfile.open(path, "w", format=tar_format) as tar:
            for i in range(7):
                for ext, data in (("jpg", bytes([i]) * (100 + 300 * i)), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{stem}{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    expected = list(wds.tarfile_samples([{"url": str(path)}]))
    assert len(expected) == 7 and count_samples(str(path)) == 7
    got = dict(shard_members(str(path), [6, 0, 3]))
    for i in (0, 3, 6):
        assert got[i] == {k: v for k, v in expected[i].items() if k != "__local_path__"}, i
    assert [s["__key__"] for s in shard_samples(str(path), skip=2, count=3)] == [s["__key__"] for s in expected[2:5]]


def test_sample_index_sidecars_are_written_read_and_refused_when_stale(tmp_path, caplog):
    """make_shards and --index write SHARD.tar.idx.npz, equal to the header walk and the same
    bytes each time. A sidecar that no longer fits its shard is refused with a warning at load
    (size, first/middle/last headers) or, for another member, when it is read: the headers are
    walked again and the samples are right."""
    from pipeline.data.tarindex import ShardIndex, shard_index, shard_members, sidecar_path, write_sidecar

    write_shards(synthetic_source(30, side=24), tmp_path / "own", val_fraction=0.0, max_count=12, progress=False)
    tars = sorted((tmp_path / "own").glob("*.tar"))
    assert len(tars) == 3 and all(sidecar_path(t).is_file() for t in tars)
    first = sidecar_path(tars[0]).read_bytes()
    write_sidecar(tars[0])
    assert sidecar_path(tars[0]).read_bytes() == first
    for tar in tars:
        walked, loaded = ShardIndex.walk(str(tar)), shard_index(str(tar))
        assert list(loaded.keys) == list(walked.keys) and loaded.first.tolist() == walked.first.tolist()
        assert {e: w.tolist() for e, w in loaded.files.items()} == {e: w.tolist() for e, w in walked.files.items()}

    def write(path, sizes, fill):
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i, size in enumerate(sizes):
                sink.write({"__key__": f"k{i}", "jpg": bytes([fill + i]) * size, "cls": str(i).encode()})

    shard = tmp_path / "other-000000.tar"
    write(shard, [100] * 5, 0)
    index_shards(tmp_path, progress=False)  # writes other.json and the sidecar
    assert sidecar_path(shard).is_file()
    write(shard, [100, 400, 100, 100, 100], 50)  # same offsets (512-byte blocks), sample 1 larger
    assert sidecar_path(shard).stat().st_size and shard_index(str(shard)).files["jpg"][1, 1] == 100  # fits at load
    with caplog.at_level(logging.WARNING, logger="pipeline.data.tarindex"):
        got = dict(shard_members(str(shard), [1, 3]))
    assert "stale at sample 1" in caplog.text
    expected = list(wds.tarfile_samples([{"url": str(shard)}]))
    assert got[1]["jpg"] == expected[1]["jpg"] == bytes([51]) * 400 and got[3]["jpg"] == expected[3]["jpg"]
    write(shard, [900] * 6, 0)  # another size: refused at load
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.tarindex"):
        assert len(shard_index(str(shard))) == 6
    assert "does not fit its shard" in caplog.text


def test_preflight_reports_labels_outside_the_classes(tmp_path, make_shards):
    spec, keys = make_shards([7], name="train")
    manifest = {"split": "train", "num_samples": 7, "classes": [str(i) for i in range(5)],
                "shards": [{"url": "train-000000.tar", "num_samples": 7}]}
    (tmp_path / "train.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--check", str(tmp_path),
                             "--num-classes", "5", "--world-size", "4", "--workers", "2", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unreadable or out of range: 2" in result.stdout
    assert f"key={keys[5]}: label 5 outside [0, 5)" in result.stdout and f"key={keys[6]}" in result.stdout
    assert "8 streams" in result.stdout and "a count that suits them: 8 shards" in result.stdout


def test_index_writes_the_manifest_the_writer_wrote(tmp_path):
    """Shards without a manifest (as img2dataset leaves them): --index counts samples and classes
    from the tar headers and .cls files, equal to what the writer recorded; training opens them."""
    written = write_shards(digits_source(), tmp_path, val_fraction=0.2, max_count=150, progress=False)
    for split in written:
        (tmp_path / f"{split}.json").unlink()
    result = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--index", str(tmp_path), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for split, ours in written.items():
        indexed = json.loads((tmp_path / f"{split}.json").read_text())
        assert indexed["num_samples"] == ours["num_samples"] and indexed["num_classes"] == ours["num_classes"] == 10
        assert [(s["url"], s["num_samples"], s["num_bytes"]) for s in indexed["shards"]] == \
            [(s["url"], s["num_samples"], s["num_bytes"]) for s in ours["shards"]]
        assert f"{split}: {ours['num_samples']} samples, 10 classes" in result.stdout
        assert resolve_shards(str(tmp_path / f"{split}.json")).num_samples == ours["num_samples"]
    ok, report = preflight(tmp_path, progress=False, num_classes=10)
    assert ok, report
    again = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--index", str(tmp_path)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "has a manifest already" in again.stderr


def test_index_takes_a_split_and_names_what_it_cannot_read(tmp_path, make_shards):
    make_shards([3, 2], name="part")
    manifests = index_shards(tmp_path, split="val", progress=False)
    assert manifests["val"]["num_samples"] == 5 and (tmp_path / "val.json").is_file()
    manifests = index_shards(tmp_path, progress=False)  # the split from the file names
    assert manifests["part"]["num_samples"] == 5 and manifests["part"]["num_classes"] == 5
    with wds.TarWriter(str(tmp_path / "bad-000000.tar"), mtime=0) as sink:
        sink.write({"__key__": "x", "jpg": b"not read", "cls": b"cat"})
    with pytest.raises(ValueError, match=r"bad-000000.tar: x.cls holds b'cat', not a class index"):
        index_shards(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        index_shards(tmp_path / "empty", progress=False)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_procs_give_byte_identical_shards_and_preflight(tmp_path):
    source = synthetic_source(90, side=96)  # re-encoded: --max-side 64
    for procs in (1, 2):
        write_shards(source, tmp_path / f"p{procs}", val_fraction=0.2, max_count=16, max_side=64, progress=False,
                     procs=procs)
    files = _files(tmp_path / "p1")
    assert files == _files(tmp_path / "p2") and len(files) == 16  # 5 + 2 shards, their sample indexes, 2 manifests
    reports = [preflight(tmp_path / "p1", progress=False, num_classes=10, procs=procs) for procs in (1, 2)]
    assert reports[0] == reports[1] and reports[0][0]


def test_a_crashed_split_resumes_after_its_complete_shards(tmp_path):
    source = synthetic_source(60, side=32)
    write_split(source.items, tmp_path / "whole", "train", source.classes, max_count=10, progress=False)

    def crash():
        raise KeyboardInterrupt

    crashing = [dataclasses.replace(item, read=crash) if i == 35 else item for i, item in enumerate(source.items)]
    with pytest.raises(KeyboardInterrupt):
        write_split(crashing, tmp_path / "resumed", "train", source.classes, max_count=10, progress=False)
    assert json.loads((tmp_path / "resumed/.train.progress.json").read_text())["next"] == 30
    reads = []

    def counted(item):
        def read():
            reads.append(item.key)
            return item.read()
        return dataclasses.replace(item, read=read)

    write_split([counted(i) for i in source.items], tmp_path / "resumed", "train", source.classes, max_count=10,
                progress=False)
    assert reads == [item.key for item in source.items[30:]], "items of complete shards were read again"
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def test_unlabelled_splits_from_any_source(image_folder, tmp_path):
    """--unlabelled leaves .cls out and says so in the manifest; images:PATH and path-only lists
    are unlabelled sources; --train-fraction keeps a seeded share of the train split."""
    manifests = write_shards(digits_source(), tmp_path / "digits", val_fraction=0.2, max_count=500, progress=False,
                             unlabelled=True)
    labelled = write_shards(digits_source(), tmp_path / "labelled", val_fraction=0.2, max_count=500, progress=False,
                            train_fraction=0.1)
    assert manifests["train"]["labelled"] is False and manifests["train"]["classes"] == []
    assert labelled["train"]["labelled"] is True and labelled["train"]["num_samples"] == 144  # 10% of 1,438
    assert labelled["val"]["num_samples"] == manifests["val"]["num_samples"] == 359  # whole
    samples = read_all(tmp_path / "digits/train.json")
    assert len(samples) == 1438 and not [s for s in samples if "cls" in s]
    # the same split: the 10% are among the unlabelled train images
    assert {s["__key__"] for s in read_all(tmp_path / "labelled/train.json")} <= {s["__key__"] for s in samples}
    assert resolve_shards(str(tmp_path / "digits/train.json")).labelled is False
    ok, report = preflight(tmp_path / "digits", progress=False)
    assert ok and "unlabelled (no .cls)" in report, report

    images = open_source(f"images:{image_folder}")
    assert images.classes == [] and images.items and all(i.label is None for i in images.items)
    csv_path = image_folder / "paths.csv"
    csv_path.write_text("path\ncat/cat.0.jpg\ndog/small.png\n")
    listed = open_source(f"list:{csv_path}")
    assert [i.label for i in listed.items] == [None, None] and listed.classes == []
    csv_path.write_text("cat/cat.0.jpg,1\ndog/small.png\n")
    with pytest.raises(ValueError, match="row 2 has 1 fields"):
        open_source(f"list:{csv_path}")
