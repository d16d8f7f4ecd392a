import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop, v2

from pipeline.data.device import Normalize, batch_mixer
from pipeline.data.transforms import (
    Encoded, EvalTransform, TrainTransform, baseline_train_transform, crop_resize, decode_rgb, open_image,
    sample_crop_box, to_rgb,
)

from .conftest import jpeg_bytes, make_image


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def smooth_photo(width: int, height: int) -> np.ndarray:
    """A smooth colour field: JPEG and resampling errors on it are small and comparable."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16)), (100, 100, 100)),  # 16-bit: scaled, not clipped
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),  # fully transparent -> white background
        (Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("LA", (4, 4), (50, 255)), (50, 50, 50)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("RGB", (4, 4), (1, 2, 3)).convert("P", palette=Image.Palette.ADAPTIVE), (1, 2, 3)),
    ],
    ids=["L", "1", "I;16", "RGBA-clear", "RGBA-opaque", "LA", "CMYK", "P"],
)
def test_every_mode_becomes_rgb(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == expected


def test_palette_with_transparency_and_encoded_formats():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    image.info["transparency"] = 0
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    assert decode_rgb(encode(image, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert decode_rgb(encode(sixteen, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    cmyk = decode_rgb(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((8, 8))[0] > 200 and cmyk.getpixel((8, 8))[1] < 60
    webp = encode(Image.new("RGB", (8, 8), (200, 0, 0)), "WEBP", lossless=True)
    assert decode_rgb(webp).getpixel((3, 3)) == (200, 0, 0)


def test_exif_orientation_is_applied():
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95)
    image = open_image(data)
    assert image.size == (20, 40)
    assert decode_rgb(data).getpixel((10, 5))[0] > 200  # the red half is on top once displayed
    out = EvalTransform(8, crop_pct=1.0)(data)
    assert out.shape == (3, 8, 8) and out[0, 0].float().mean() > 200 and out[0, -1].float().mean() < 60


def test_header_reader_leaves_only_upright_plain_jpegs_to_libjpeg_turbo():
    """Encoded.read skips PIL for a JPEG with no EXIF or XMP block; every other sample is opened by
    PIL, so EXIF and XMP orientations are applied; both give the same pixels where both apply."""
    array = make_image(np.random.default_rng(0), 20, 40)
    rotate, upright = Image.Exif(), Image.Exif()
    rotate[0x0112], upright[0x0112] = 6, 1
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">' \
          b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    image = Image.fromarray(array)
    cases = {  # name: (bytes, read by libjpeg-turbo alone, decoded by it, displayed size)
        "plain": (encode(image, "JPEG"), True, True, (40, 20)),
        "gray": (encode(image.convert("L"), "JPEG"), True, True, (40, 20)),
        "exif-upright": (encode(image, "JPEG", exif=upright.tobytes()), False, True, (40, 20)),
        "exif-rotated": (encode(image, "JPEG", exif=rotate.tobytes()), False, False, (20, 40)),
        "xmp-rotated": (encode(image, "JPEG", xmp=xmp), False, False, (20, 40)),
        "cmyk": (encode(image.convert("CMYK"), "JPEG"), False, False, (40, 20)),
        "png": (encode(image, "PNG"), False, False, (40, 20)),
    }
    for name, (data, header_only, jpeg, size) in cases.items():
        source = Encoded.read(data)
        assert ((source.image is None), source.jpeg, source.size) == (header_only, jpeg, size), name
        assert source.pil().size == size, name
    plain, with_exif = (TrainTransform(16)(cases[name][0], random.Random(3)) for name in ("plain", "exif-upright"))
    torch.testing.assert_close(plain, with_exif, rtol=0, atol=0)
    with pytest.raises(OSError):  # a truncated JPEG's header reads; PIL then refuses the pixels
        TrainTransform(16)(cases["plain"][0][:200], random.Random(0))


def test_crop_box_distribution_is_random_resized_crops():
    width, height, n = 500, 375, 4000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    rng = random.Random(0)
    ours = np.array([sample_crop_box(width, height, scale, ratio, rng) for _ in range(n)])
    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    theirs = np.array([RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)])
    theirs = theirs[:, [1, 0, 3, 2]]  # (top, left, h, w) -> (left, top, w, h)
    for column, name in enumerate(["left", "top", "w", "h"]):
        assert ks_2samp(ours[:, column], theirs[:, column]).pvalue > 1e-3, name
    area = ours[:, 2] * ours[:, 3] / (width * height)
    assert ks_2samp(area, theirs[:, 2] * theirs[:, 3] / (width * height)).pvalue > 1e-3
    assert (ours[:, 0] + ours[:, 2] <= width).all() and (ours[:, 1] + ours[:, 3] <= height).all()
    # A biased sampler fails the same test (the test can fail).
    biased = np.array([sample_crop_box(width, height, (0.2, 1.0), ratio, rng) for _ in range(n)])
    assert ks_2samp(biased[:, 2], theirs[:, 2]).pvalue < 1e-6


def test_crop_box_fallback_for_extreme_aspect():
    assert sample_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (493, 0, 13, 10)


@pytest.mark.parametrize("width, height", [(1600, 1200), (500, 375)])
def test_fast_path_matches_exact_crop_of_the_same_box(width, height):
    data = jpeg_bytes(smooth_photo(width, height), quality=90)
    rng = random.Random(1)
    for _ in range(20):
        box = sample_crop_box(width, height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        fast = crop_resize(Encoded.read(data), box, 224, fast=True).to(torch.int16)
        exact = crop_resize(Encoded.read(data), box, 224, fast=False).to(torch.int16)
        assert fast.shape == exact.shape == (3, 224, 224)
        assert (fast - exact).abs().float().mean() < 2.0, box


def test_train_transform_is_deterministic_per_rng_and_flips():
    data = jpeg_bytes(smooth_photo(64, 48))
    transform = TrainTransform(16, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=1.0)
    out = transform(data, random.Random(5))
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    torch.testing.assert_close(out, transform(data, random.Random(5)))
    unflipped = TrainTransform(16, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=0.0)(data, random.Random(5))
    torch.testing.assert_close(out, unflipped.flip(-1))
    assert out[0, :, 0].float().mean() > out[0, :, -1].float().mean()  # red grows with x; flipped


def test_randaugment_is_seeded_by_the_sample_rng():
    data = jpeg_bytes(smooth_photo(64, 48))
    transform = TrainTransform(16, randaugment="2,9")
    torch.manual_seed(123)
    before = torch.rand(1)
    a, b = transform(data, random.Random(7)), transform(data, random.Random(7))
    torch.testing.assert_close(a, b)
    torch.manual_seed(123)
    assert torch.rand(1) == before  # the global RNG was not consumed


def test_eval_transform_matches_resize_center_crop():
    data = jpeg_bytes(smooth_photo(500, 375), quality=95)
    ours = EvalTransform(224, crop_pct=0.875, fast=False)(data).to(torch.int16)
    resize_crop = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])
    reference = resize_crop(Image.open(io.BytesIO(data)).convert("RGB"))
    theirs = v2.functional.pil_to_tensor(reference).to(torch.int16)
    assert (ours - theirs).abs().float().mean() < 2.0
    assert EvalTransform(224)(data).shape == (3, 224, 224)


def test_baseline_transform_shape():
    out = baseline_train_transform(32)(jpeg_bytes(smooth_photo(64, 48)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_normalize_and_mixing():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2).contiguous()
    out = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(images)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[-1.0, 1.0]] * 3))
    mixer = batch_mixer(0.8, 1.0, num_classes=4)
    mixed, soft = mixer(out, torch.tensor([0, 3]))
    assert mixed.shape == out.shape and soft.shape == (2, 4)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2))
    assert batch_mixer(0.0, 0.0, 4) is None


def test_gpu_decode_equals_the_cpu_path_falls_back_and_counts_what_fails():
    """data.decode=gpu, run on the CPU: whole RGB and grayscale JPEGs are left encoded by the
    worker and finished by BatchFinisher into the same pixels, box and flip as TrainTransform
    (boxes under twice the size: the same decoder); PNG, CMYK, EXIF-rotated and truncated
    samples go the CPU path in the worker (a truncated one fails there, as on the CPU path);
    a JPEG that fails on the device is counted and its place taken by another of the batch."""
    from pipeline.data.device import BatchFinisher
    from pipeline.data.transforms import DeviceTrainTransform, JpegCrop, stack_images

    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(make_image(rng, 24, 32)) for _ in range(4)]
    rotated = Image.fromarray(make_image(rng, 24, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    whole = encode(rgb[0], "JPEG")
    samples = {
        **{f"rgb{i}": (encode(im, "JPEG", quality=90), True) for i, im in enumerate(rgb)},
        "gray": (encode(rgb[1].convert("L"), "JPEG"), True),
        "png": (encode(rgb[2], "PNG"), False),
        "cmyk": (encode(rgb[3].convert("CMYK"), "JPEG"), False),
        "exif-rotated": (encode(rotated, "JPEG", exif=exif.tobytes()), False),
        "truncated": (whole[:len(whole) // 2], False),
    }
    cpu, device = TrainTransform(16), DeviceTrainTransform(16)
    expected, produced, labels = [], [], []
    for i, (name, (data, deferred)) in enumerate(samples.items()):
        try:
            reference = cpu(data, random.Random(i))
        except Exception:  # noqa: BLE001 - the worker skips it in both modes
            assert name == "truncated"
            with pytest.raises(Exception):
                device(data, random.Random(i))
            continue
        out = device(data, random.Random(i))
        assert isinstance(out, JpegCrop) == deferred, name
        expected.append(reference)
        produced.append(out)
        labels.append(i)
    decoder = BatchFinisher(16, "cpu")
    images, got_labels = decoder(stack_images(produced, labels))
    torch.testing.assert_close(images, torch.stack(expected), rtol=0, atol=0)
    assert got_labels.tolist() == labels and decoder.failed == 0
    # The GPU's way (boxes resampled in float, then the batch rounded, flipped and placed at once):
    # the same images, within one level of the uint8 kernel's rounding.
    batched, _ = BatchFinisher(16, "cpu", batched=True)(stack_images(produced, labels))
    assert (batched.int() - images.int()).abs().max() <= 1

    broken = JpegCrop(whole[:len(whole) // 2] + b"\xff\xd9", (0, 0, 8, 8), False)  # whole-looking, undecodable
    batch = stack_images([produced[0], broken, produced[2]], [5, 6, 7])
    images, got_labels = decoder(batch)
    assert decoder.failed == 1 and got_labels.tolist() == [5, 5, 7]
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no image of a batch of 1"):
        decoder(stack_images([broken], [1]))


def test_gpu_decode_refuses_randaugment():
    from pipeline.config import DataConfig

    with pytest.raises(ValueError, match="data.randaugment runs on images decoded in the workers"):
        DataConfig(decode="gpu", randaugment="2,9")
