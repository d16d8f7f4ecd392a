import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from pipeline.config import load_config
from pipeline.model import VARIANTS, create_vit, parse_variant, vit_from_config
from pipeline.model.weights import timm_config


def tiny(size: str, patch: int = 4, **overrides):
    """The variant's depth and heads at a tiny width, so every size runs on the CPU in a test."""
    _, _, _, heads = VARIANTS[size]
    kwargs = dict(embed_dim=heads * 8, mlp_dim=heads * 16)
    kwargs.update(overrides)
    return create_vit(f"{size}/{patch}", num_classes=5, image_size=4 * patch, **kwargs).init_weights()


@pytest.mark.parametrize("size", list(VARIANTS))
def test_forward_backward_no_nans(size):
    torch.manual_seed(0)
    model = tiny(size, drop_path_rate=0.1)
    x = torch.randn(2, 3, 16, 16)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "variant, num_classes, expected",
    [
        # timm's vit_large_patch16_224 / vit_huge_patch14_224 / giant / gigantic with 1000 classes.
        ("L/16", 1000, 304_326_632),
        ("H/14", 1000, 632_045_800),
        ("H/14", 0, 630_764_800),  # H/14 without its head
        ("g/14", 1000, 1_012_611_432),
        ("G/14", 1000, 1_844_440_680),
    ],
)
def test_big_variant_on_meta_device(variant, num_classes, expected):
    with torch.device("meta"):
        model = create_vit(variant, num_classes=num_classes, image_size=224)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == expected
    assert all(p.is_meta for p in params), "a parameter was allocated"


@pytest.mark.parametrize("variant, timm_name", [("L/16", "vit_large_patch16_224"), ("H/14", "vit_huge_patch14_224")])
def test_state_dict_matches_timm_names_and_shapes(variant, timm_name):
    with torch.device("meta"):
        ours = create_vit(variant, num_classes=1000, image_size=224).state_dict()
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=1000).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


TIMM_SHAPES = [
    dict(global_pool="token", class_token=True, layer_scale_init=None, qkv_bias=True),
    dict(global_pool="avg", class_token=False, layer_scale_init=None, qkv_bias=True),
    dict(global_pool="avg", class_token=True, layer_scale_init=1e-1, qkv_bias=False),
]


@pytest.mark.parametrize("options", TIMM_SHAPES, ids=["token", "avg-no-cls", "layerscale-nobias"])
def test_logits_match_timm_both_ways(options):
    torch.manual_seed(0)
    theirs = TimmViT(
        img_size=32, patch_size=8, num_classes=7, embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0,
        global_pool=options["global_pool"], class_token=options["class_token"],
        init_values=options["layer_scale_init"], qkv_bias=options["qkv_bias"],
    ).eval()
    ours = create_vit("S/8", num_classes=7, image_size=32, embed_dim=64, depth=3, num_heads=4, mlp_dim=256,
                      **options).eval()
    state = {k: torch.randn_like(v) for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)

    ours.init_weights()  # and ours -> timm
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_init_weights_follows_the_vit_paper():
    torch.manual_seed(0)
    model = create_vit("B/16", num_classes=10, image_size=32).init_weights()
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert 0.015 < model.pos_embed.std() < 0.025
    # xavier-uniform with q, k, v counted as three d x d matrices: bound sqrt(6 / 2d)
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= (6 / (2 * 768)) ** 0.5
    assert qkv.abs().max() > 0.9 * (6 / (2 * 768)) ** 0.5
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert 0 < model.blocks[0].mlp.fc1.bias.abs().max() < 1e-4
    fan_in = 3 * 16 * 16
    assert abs(model.patch_embed.proj.weight.std().item() - fan_in**-0.5) < 0.1 * fan_in**-0.5


def test_layer_scale_and_pre_logits():
    model = create_vit("mu/4", num_classes=3, image_size=8, layer_scale_init=1e-5, pre_logits=16).init_weights()
    assert torch.allclose(model.blocks[0].ls1.gamma, torch.full((32,), 1e-5))
    assert model.pre_logits.fc.weight.shape == (16, 32) and model.head.weight.shape == (3, 16)
    assert model.forward_head(model.forward_features(torch.randn(2, 3, 8, 8)), pre_logits=True).shape == (2, 16)


def test_stochastic_depth_linear_rule_and_eval_determinism():
    model = create_vit("Ti/4", num_classes=3, image_size=8, drop_path_rate=0.3)
    rates = [block.drop_path for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)])
    model.init_weights().eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("every", [1, 2])
def test_grad_checkpointing_gives_the_same_gradients(every):
    torch.manual_seed(0)
    model = create_vit("Ti/4", num_classes=4, image_size=16, depth=4).init_weights()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    x = torch.randn(2, 3, 16, 16)

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(every)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    model.set_grad_checkpointing(0)
    assert model.grad_checkpointing_every == 0


def test_grad_checkpointing_recomputes_blocks():
    model = create_vit("mu/4", num_classes=2, image_size=8, depth=2).init_weights()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.set_grad_checkpointing(1)
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    assert len(calls) == 2  # forward, then the recompute in backward


def test_freeze_and_unfreeze_backbone():
    model = create_vit("mu/4", num_classes=2, image_size=8)
    model.freeze_backbone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    model.unfreeze_backbone()
    assert all(p.requires_grad for p in model.parameters())


def test_wrong_resolution_is_a_clear_error():
    model = create_vit("mu/4", num_classes=2, image_size=8)
    with pytest.raises(ValueError, match="resample pos_embed"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, 10, 10))


def test_parse_variant():
    assert parse_variant("H/14") == ("H", 14)
    assert parse_variant("L/8") == ("L", 8)
    for bad in ["H14", "Q/16", "L/"]:
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_vit_from_config():
    config = load_config("demo/pretrain")
    model = vit_from_config(config.model)
    assert model.patch_size == 2 and model.image_size == 8 and model.num_classes == 10


def test_compiled_blocks_share_two_graphs_with_stochastic_depth():
    """24 blocks, each with its own drop-path rate, compiled and checkpointed as the Trainer does:
    one training step compiles the block code at most twice (blocks with drop-path masks and the
    first, without) and nothing falls back to eager past dynamo's recompile limit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = create_vit("mu/4", num_classes=10, image_size=16, depth=24, drop_path_rate=0.1).init_weights()
    model.set_grad_checkpointing(1)
    model.compile_blocks()
    eager = create_vit("mu/4", num_classes=10, image_size=16, depth=24, drop_path_rate=0.1)
    eager.load_state_dict(model.state_dict())
    images = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    model(images).logsumexp(-1).sum().backward()
    torch.manual_seed(1)
    eager(images).logsumexp(-1).sum().backward()
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert counters["frames"]["total"] == counters["frames"]["ok"], dict(counters["frames"])
    fallbacks = [reason for reason in counters["unimplemented"] if "recompile" in reason.lower()]
    assert not fallbacks, fallbacks
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), eager.parameters())]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in grads)  # the same masks, eager or compiled
    torch._dynamo.reset()


def test_distilled_model_matches_timm_deit_both_ways():
    """DeiT's distillation token and second head, as timm's VisionTransformerDistilled names and
    shapes them: weights go both ways under strict=True with equal logits; in training mode the
    forward gives both heads, in eval mode their average."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    ours = create_vit("S/8", num_classes=7, image_size=32, embed_dim=64, depth=3, num_heads=4, mlp_dim=256,
                      distilled=True)
    theirs = VisionTransformerDistilled(**timm_config(ours)).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys() and ours.num_prefix_tokens == 2
    assert ours.pos_embed.shape == theirs.pos_embed.shape == (1, 2 + 16, 64)
    state = {k: torch.randn_like(v) for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs.set_distilled_training(True)
    cls, dist = ours.train()(x)
    theirs_cls, theirs_dist = theirs.train()(x)
    torch.testing.assert_close((cls, dist), (theirs_cls, theirs_dist), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.eval()(x), (cls + dist) / 2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cls, dist)

    ours.init_weights()  # and ours -> timm
    assert torch.count_nonzero(ours.head_dist.weight) == 0 and 0.01 < ours.dist_token.std() < 0.03
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(theirs.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)


def test_distilled_weights_at_a_higher_resolution_keep_both_prefix_tokens():
    from pipeline.model.weights import adapt_state_dict

    torch.manual_seed(0)
    low = create_vit("mu/4", num_classes=10, image_size=16, distilled=True).init_weights()
    high = create_vit("mu/4", num_classes=10, image_size=32, distilled=True)
    state = adapt_state_dict(low.state_dict(), high)
    assert state["pos_embed"].shape == (1, 2 + 64, 32)
    torch.testing.assert_close(state["pos_embed"][:, :2], low.pos_embed[:, :2], rtol=0, atol=0)
    high.load_state_dict(state, strict=True)
    assert high.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # An undistilled model's weights start a distilled one: the new token's position is the class token's.
    plain = create_vit("mu/4", num_classes=10, image_size=16).init_weights()
    state = adapt_state_dict(plain.state_dict(), high)
    assert "dist_token" not in state and "head_dist.weight" not in state
    torch.testing.assert_close(state["pos_embed"][:, 1], plain.pos_embed[:, 0], rtol=0, atol=0)
    high.load_state_dict(state, strict=False)


def test_patch_dropout_keeps_a_random_share_of_patches_in_training_only():
    from pipeline.config import load_config
    from pipeline.flops import train_flops_per_image
    from pipeline.train.objectives import Classification

    model = create_vit("pico/2", num_classes=10, image_size=8, patch_dropout=0.5).init_weights()
    images = torch.randn(3, 3, 8, 8)
    model.train()
    torch.manual_seed(0)
    first = model.forward_features(images)
    assert first.shape == (3, 1 + 8, 64)  # the class token and half of the 16 patches
    torch.manual_seed(0)
    assert torch.equal(model.forward_features(images), first)  # drawn from the global generator
    assert not torch.equal(model.forward_features(images), first)  # and another subset next time
    model.eval()
    state = torch.get_rng_state()
    assert model.forward_features(images).shape == (3, 1 + 16, 64)  # evaluation sees every patch
    assert torch.equal(torch.get_rng_state(), state)
    # its FLOPs an image count the patches kept
    plain = load_config("configs/demo/pretrain.yaml")
    dropped = load_config("configs/demo/pretrain.yaml", ["model.patch_dropout=0.5"])
    assert train_flops_per_image(Classification.shapes(dropped)) < 0.6 * Classification.flops_per_image(plain)
