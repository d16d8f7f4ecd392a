import pytest
import torch
from timm.layers import resample_abs_pos_embed

from pipeline.model import create_vit, resample_pos_embed


@pytest.mark.parametrize(
    "old, new, prefix",
    [((16, 16), (32, 32), 1), ((14, 14), (24, 24), 1), ((16, 16), (8, 8), 1), ((6, 10), (9, 15), 1),
     ((8, 8), (12, 12), 0)],
)
def test_matches_timm(old, new, prefix):
    torch.manual_seed(0)
    pos_embed = torch.randn(1, prefix + old[0] * old[1], 32)
    ours = resample_pos_embed(pos_embed, new, old_grid=old, num_prefix_tokens=prefix)
    theirs = resample_abs_pos_embed(pos_embed, list(new), list(old), num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new[0] * new[1], 32)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours[:, :prefix], pos_embed[:, :prefix], rtol=0, atol=0)


def test_identity_on_the_same_grid():
    pos_embed = torch.randn(1, 1 + 6 * 10, 8)
    assert resample_pos_embed(pos_embed, (6, 10), old_grid=(6, 10)) is pos_embed
    assert resample_pos_embed(pos_embed[:, :50], 7) is not None  # square default: 49 grid tokens + cls


def test_keeps_dtype_and_default_square_grid():
    pos_embed = torch.randn(1, 1 + 16, 8, dtype=torch.bfloat16)
    out = resample_pos_embed(pos_embed, 8)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 65, 8)


def test_smooth_field_resamples_smoothly():
    # A linear ramp over the grid stays (close to) a ramp after upsampling.
    ramp = torch.linspace(0, 1, 8)
    grid = (ramp[:, None] + ramp[None, :]).reshape(1, 64, 1)
    out = resample_pos_embed(torch.cat([torch.zeros(1, 1, 1), grid], 1), 16)[0, 1:, 0].reshape(16, 16)
    assert (out[:, 1:] >= out[:, :-1] - 1e-5).all() and (out[1:] >= out[:-1] - 1e-5).all()


def test_errors():
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), 8)
    with pytest.raises(ValueError, match="does not match"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), 8, old_grid=(3, 3))


def test_resampled_model_runs_at_the_new_resolution():
    model = create_vit("mu/2", num_classes=3, image_size=8).init_weights()
    state = model.state_dict()
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], (8, 8))
    big = create_vit("mu/2", num_classes=3, image_size=16)
    big.load_state_dict(state, strict=True)
    assert big(torch.randn(2, 3, 16, 16)).shape == (2, 3)
