import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_image(rng: np.random.Generator, height: int = 24, width: int = 32) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def make_shards(tmp_path):
    """Write shards of labelled JPEGs: make_shards([n0, n1, ...], bad={global index: kind}).

    Returns (spec, keys) where keys are in global order. Bad kinds: 'corrupt', 'nolabel', 'empty'.
    """

    def make(sizes, bad=None, name="s", size=(24, 32)):
        bad = bad or {}
        rng = np.random.default_rng(0)
        keys, index = [], 0
        for shard, count in enumerate(sizes):
            # mtime=0, as our writer does: no PAX header per member
            with wds.TarWriter(str(tmp_path / f"{name}-{shard:06d}.tar"), mtime=0) as sink:
                for _ in range(count):
                    key = f"sample{index:05d}"
                    sample = {"__key__": key, "jpg": jpeg_bytes(make_image(rng, *size)),
                              "cls": str(index % 10).encode()}
                    kind = bad.get(index)
                    if kind == "corrupt":
                        sample["jpg"] = sample["jpg"][:40] + b"\x00" * 20
                    elif kind == "nolabel":
                        del sample["cls"]
                    elif kind == "empty":
                        sample["jpg"] = b""
                    sink.write(sample)
                    keys.append(key)
                    index += 1
        spec = str(tmp_path / f"{name}-{{000000..{len(sizes) - 1:06d}}}.tar")
        return spec, keys

    return make
