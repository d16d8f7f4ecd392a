import pytest
import torch

from pipeline.config import load_config
from pipeline.flops import VitShape, forward_macs, mae_shapes, param_count, train_flops_per_image
from pipeline.model import create_vit
from pipeline.model.mae import MAE_DECODER, mae_from_config
from pipeline.train.objectives import MaskedAutoencoding

TINY = ["objective=mae", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]


def tiny(*overrides):
    config = load_config("configs/demo/pretrain.yaml", [*TINY, *overrides])
    model = mae_from_config(config)
    for name, module in model.named_modules():
        model.init_module_weights(name, module)
    return config, model


def test_masking_hides_the_same_share_of_every_image_and_follows_the_noise():
    _, model = tiny()
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    pred, mask = model(torch.randn(4, 3, 8, 8), noise)
    assert pred.shape == (4, 16, 2 * 2 * 3) and model.num_keep == 4
    assert mask.sum(1).tolist() == [12.0] * 4  # 75% of 16 patches hidden in each image
    visible = noise.argsort(1)[:, :4]  # the lowest noise is kept
    assert (mask.gather(1, visible) == 0).all()


def test_the_encoder_sees_only_the_visible_patches():
    """A hidden patch's pixels reach no output of the encoder: changing them changes nothing."""
    _, model = tiny()
    model.eval()
    images = torch.randn(1, 3, 8, 8)
    noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(1))
    keep = noise.argsort(1)[:, :model.num_keep]
    hidden = noise.argsort(1)[0, -1].item()  # a hidden patch, at grid row and column
    row, col = divmod(hidden, 4)
    changed = images.clone()
    changed[..., 2 * row:2 * row + 2, 2 * col:2 * col + 2] += 5.0
    with torch.no_grad():
        assert torch.equal(model.forward_features(images, keep), model.forward_features(changed, keep))
        assert torch.equal(model(images, noise)[0], model(changed, noise)[0])
        assert model.forward_features(images, keep).shape == (1, 1 + model.num_keep, 64)


def test_loss_is_the_mean_error_on_hidden_patches_of_normalised_pixels():
    config, model = tiny("model.drop_path_rate=0.0")  # two forwards, the same output
    objective = MaskedAutoencoding.__new__(MaskedAutoencoding)
    objective.config, objective.plan = config, type("Plan", (), {"dtype": torch.float32})()
    images, noise = torch.randn(2, 3, 8, 8), torch.rand(2, 16)
    loss = objective.loss(model, images, noise)
    pred, mask = model(images, noise)
    target = model.patchify(images)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = [((pred[i] - target[i]) ** 2).mean(-1)[mask[i] == 1].mean() for i in range(2)]
    assert loss.tolist() == pytest.approx([e.item() for e in expected], rel=1e-6)


def test_encoder_keys_are_the_classifiers_and_the_rest_is_the_decoder():
    config, model = tiny()
    classifier = create_vit("pico/2", num_classes=0, image_size=8).state_dict()
    ours = model.state_dict()
    assert {k: v.shape for k, v in ours.items() if not k.startswith(MAE_DECODER)} == \
        {k: v.shape for k, v in classifier.items()}
    assert {"mask_token", "decoder_pos_embed", "decoder_pred.weight"} <= set(ours)


def test_mae_flops_and_parameters_add_up_their_parts():
    shape = VitShape.from_variant("H/14", 224)
    encoder, decoder = mae_shapes(shape, 0.75, 512, 8, 16)
    assert encoder.num_tokens == 64 + 1 and decoder.num_tokens == 256 + 1
    assert train_flops_per_image((encoder, decoder)) == train_flops_per_image(encoder) + train_flops_per_image(decoder)
    # The MAE paper's claim: a pretraining step costs roughly a third of a supervised one.
    assert 0.25 < train_flops_per_image((encoder, decoder)) / train_flops_per_image(shape) < 0.35
    config, model = tiny()
    parts = MaskedAutoencoding.shapes(config)
    # the parts' counts are the real model's, less the decoder's input projection (64 x 32 + 32),
    # its pixel prediction counted as a patch embedding (bias 32 wide instead of 2 x 2 x 3)
    assert param_count(parts) == sum(p.numel() for p in model.parameters()) - (64 * 32 + 32) + (32 - 12)
    assert forward_macs(parts) > 0


def test_mae_config_mistakes_name_the_key():
    from pipeline.config import ConfigError

    config = load_config("configs/demo/pretrain.yaml", ["objective=mae"])
    assert config.mae.mask_ratio == 0.75 and config.mae.decoder_dim == 512 and config.mae.norm_pix_loss
    for bad in ("mae.mask_ratio=1.0", "mae.mask_ratio=0"):
        with pytest.raises(ConfigError, match="mae.mask_ratio"):
            load_config("configs/demo/pretrain.yaml", ["objective=mae", bad])
    with pytest.raises(ConfigError, match="objective=mae trains an encoder without a head"):
        load_config("configs/demo/pretrain.yaml", ["objective=mae", "model.distilled=true"])
    with pytest.raises(ConfigError, match="objective=distillation with distill.type=none"):
        load_config("configs/demo/pretrain.yaml", ["objective=distillation"])
    assert load_config("configs/demo/distill.yaml").objective == "distillation"  # distill.type alone
    from pipeline.config import OBJECTIVES as NAMED
    from pipeline.train.objectives import OBJECTIVES

    assert tuple(OBJECTIVES) == NAMED  # every objective the config accepts has its class, and no other
