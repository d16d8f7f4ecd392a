import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from pipeline.model import create_vit, resample_pos_embed
from pipeline.model.weights import adapt_state_dict, export_safetensors


def test_timm_weights_at_a_higher_resolution():
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    model = create_vit("Ti/16", num_classes=1000, image_size=384)
    state = adapt_state_dict(theirs.state_dict(), model)
    assert state["pos_embed"].shape == (1, 1 + 24 * 24, 192)
    torch.testing.assert_close(state["pos_embed"], resample_pos_embed(theirs.pos_embed.detach(), (24, 24)))
    model.load_state_dict(state, strict=True)


def test_pre_logits_dropped_and_head_reinitialised():
    pretrained = create_vit("mu/2", num_classes=10, image_size=8, pre_logits=16).init_weights().state_dict()
    model = create_vit("mu/2", num_classes=5, image_size=16).init_weights()
    fresh_head = model.head.weight.clone()
    state = adapt_state_dict(pretrained, model)
    assert not any(k.startswith(("pre_logits", "head")) for k in state)
    model.load_state_dict(state, strict=False)
    torch.testing.assert_close(model.head.weight, fresh_head)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, pretrained["blocks.0.attn.qkv.weight"])


def test_reset_head_on_request_keeps_it_otherwise():
    pretrained = create_vit("mu/2", num_classes=10, image_size=8).init_weights()
    torch.nn.init.normal_(pretrained.head.weight)
    model = create_vit("mu/2", num_classes=10, image_size=8)
    assert "head.weight" in adapt_state_dict(pretrained.state_dict(), model)
    assert "head.weight" not in adapt_state_dict(pretrained.state_dict(), model, reset_head=True)


def test_another_architecture_is_refused_naming_keys_and_shapes():
    other = create_vit("S/2", num_classes=10, image_size=8, depth=2).state_dict()
    model = create_vit("mu/2", num_classes=10, image_size=8)
    with pytest.raises(ValueError) as e:
        adapt_state_dict(other, model, source="runs/x")
    message = str(e.value)
    assert "runs/x does not fit this model" in message
    assert "blocks.0.attn.qkv.weight: checkpoint (1152, 384), model (96, 32)" in message
    assert "not in the model: blocks.1." in message


def test_export_loads_into_timm_with_the_same_logits(tmp_path):
    model = create_vit("Ti/8", num_classes=7, image_size=32, layer_scale_init=0.1, global_pool="avg").init_weights()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    out, config_path = export_safetensors(model.state_dict(), model, tmp_path / "m.safetensors")
    config = json.loads(config_path.read_text())
    theirs = timm.models.vision_transformer.VisionTransformer(**config).eval()
    theirs.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(theirs(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_export_of_a_pre_logits_model_keeps_the_backbone(tmp_path):
    model = create_vit("mu/2", num_classes=10, image_size=8, pre_logits=16).init_weights()
    out, config_path = export_safetensors(model.state_dict(), model, tmp_path / "m.safetensors")
    config = json.loads(config_path.read_text())
    assert config["num_classes"] == 0
    theirs = timm.models.vision_transformer.VisionTransformer(**config)
    theirs.load_state_dict(load_file(str(out)), strict=True)
