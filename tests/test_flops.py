import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.flops import VitShape, device_peak_tflops, forward_macs, param_count, train_flops_per_image
from pipeline.model import create_vit


@pytest.mark.parametrize("variant, timm_name", [("L/16", "vit_large_patch16_224"), ("H/14", "vit_huge_patch14_224"),
                                                ("B/16", "vit_base_patch16_224")])
def test_param_count_matches_timm(variant, timm_name):
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    assert param_count(VitShape.from_variant(variant, 224, 1000)) == sum(p.numel() for p in model.parameters())


def test_reference_flops():
    h14 = VitShape.from_variant("H/14", 224, 1000)
    assert forward_macs(h14) / 1e9 == pytest.approx(167.4, rel=0.002)  # timm: 167.4 GMAC
    assert train_flops_per_image(h14) / 1e9 == pytest.approx(1003.8, rel=0.002)
    assert forward_macs(VitShape.from_variant("L/16", 224, 1000)) / 1e9 == pytest.approx(61.6, rel=0.002)
    assert train_flops_per_image(h14, recompute=True) == 4 * 2 * forward_macs(h14)


@pytest.mark.parametrize("variant, image_size, pre_logits", [("mu/2", 8, None), ("Ti/4", 16, 32)])
def test_forward_flops_match_a_measured_count(variant, image_size, pre_logits):
    model = create_vit(variant, num_classes=10, image_size=image_size, pre_logits=pre_logits)
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as matmuls the counter sees (it skips the CPU flash kernel).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, image_size, image_size))
    shape = VitShape.from_variant(variant, image_size, 10, pre_logits=pre_logits)
    assert 2 * forward_macs(shape) == counter.get_total_flops()
    assert param_count(shape) == sum(p.numel() for p in model.parameters())


def test_device_peaks():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert device_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert device_peak_tflops("cpu") is None
