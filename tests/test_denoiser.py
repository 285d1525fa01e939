"""The Swin-UNet denoiser: the release's layout and parameter count, tiny forward/backward, the
shift and mask rules, the sampler adapter."""

from __future__ import annotations

import pytest
import torch

from upsr.config import DenoiserConfig
from upsr.denoiser import SwinBlock, build_denoiser, count_parameters, make_denoise_fn, shifted_window_mask

RELEASE_PARAMETERS = 119_418_319


def test_paper_size_parameter_count_is_the_release_count():
    with torch.device("meta"):  # count only: no memory, no forward at full size
        denoiser = build_denoiser(DenoiserConfig())
    assert count_parameters(denoiser) == RELEASE_PARAMETERS


def test_paper_config_file_equals_the_defaults(tiny_config):
    from pipelines.config import load

    from tests.conftest import REPO

    paper = load(REPO / "configs" / "upsr_x4.yaml")
    assert paper.denoiser == DenoiserConfig()
    assert count_parameters(build_denoiser(tiny_config.denoiser)) < 2e6


def test_tiny_forward_shape_and_gradient_reaches_every_parameter(tiny_config):
    torch.manual_seed(0)
    denoiser = build_denoiser(tiny_config.denoiser)
    x_t = torch.randn(2, 3, 64, 64)
    cond = torch.randn(2, 6, 64, 64)
    t = torch.tensor([0, 4])
    target = torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    # Every res-block's last conv starts at zero, which blocks gradients to the time embedding;
    # two steps make them non-zero, the third backward is checked.
    for _ in range(3):
        optimizer.zero_grad()
        out = denoiser(x_t, t, cond)
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()
    assert out.shape == (2, 3, 64, 64)
    without_gradient = [name for name, p in denoiser.named_parameters()
                        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert without_gradient == []


def test_a_fresh_net_ignores_t_as_the_release_does(tiny_config):
    """The res-blocks' zero-initialised out-convs cut the time embedding off until training moves them."""
    denoiser = build_denoiser(tiny_config.denoiser)
    x_t, cond = torch.randn(1, 3, 64, 64), torch.randn(1, 6, 64, 64)
    at_0 = denoiser(x_t, torch.tensor([0]), cond)
    assert torch.equal(at_0, denoiser(x_t, torch.tensor([4]), cond))
    assert at_0.abs().mean() > 0  # the head's last conv is not zeroed


def test_baseline_condition_is_y_alone(tiny_config):
    from dataclasses import replace

    denoiser = build_denoiser(replace(tiny_config.denoiser, use_sr_condition=False))
    assert denoiser.input_blocks[0][0].in_channels == 48 + 48
    assert build_denoiser(tiny_config.denoiser).input_blocks[0][0].in_channels == 48 + 96
    assert denoiser(torch.randn(1, 3, 64, 64), torch.tensor([1]), torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="use_sr_condition=False"):
        denoiser(torch.randn(1, 3, 64, 64), torch.tensor([1]), torch.randn(1, 6, 64, 64))


def test_sizes_off_the_window_grid_are_refused(tiny_config):
    denoiser = build_denoiser(tiny_config.denoiser)
    assert tiny_config.denoiser.lr_multiple == 16
    with pytest.raises(ValueError, match="multiple of the Swin window"):
        denoiser(torch.randn(1, 3, 96, 96), torch.tensor([0]), torch.randn(1, 6, 96, 96))


def test_shifted_window_block_matches_a_rolled_plain_block_without_border_windows():
    """Away from the wrapped border, shifting windows by s equals rolling the image by -s
    before a plain block: the mask only changes windows that contain wrapped-around tokens."""
    torch.manual_seed(0)
    shifted = SwinBlock(16, heads=2, window=4, shift=2, mlp_ratio=2.0, groups=4, resolution=16, mask_rule="swin")
    plain = SwinBlock(16, heads=2, window=4, shift=0, mlp_ratio=2.0, groups=4, resolution=16)
    # The MLP's GroupNorm pools statistics over the whole map, masked windows included; take it out.
    torch.nn.init.zeros_(shifted.mlp.fc2.weight)
    torch.nn.init.zeros_(shifted.mlp.fc2.bias)
    plain.load_state_dict({k: v for k, v in shifted.state_dict().items() if k != "attn_mask"})
    x = torch.randn(1, 16, 16, 16)
    expected = torch.roll(plain(torch.roll(x, (-2, -2), dims=(2, 3))), (2, 2), dims=(2, 3))
    # Exclude the last window row/column (in rolled coordinates) where wrapped tokens are masked.
    interior = (slice(None), slice(None), slice(2, 14), slice(2, 14))
    torch.testing.assert_close(shifted(x)[interior], expected[interior])


def test_denoise_fn_drives_the_sampler(tiny_parts):
    denoiser, _, diffusion = tiny_parts
    seen = []

    def spy(x_t, t, cond):
        seen.append(int(t[0]))
        return make_denoise_fn(denoiser, diffusion)(x_t, t, cond)

    y = torch.rand(1, 3, 64, 64) * 2 - 1
    cond = torch.cat([y, y], dim=1)
    out = diffusion.sample(spy, y, cond, torch.ones_like(y), generator=torch.Generator().manual_seed(0))
    assert out.shape == y.shape and out.abs().max() <= 1
    assert seen == list(reversed(range(diffusion.num_steps)))


def test_plain_window_block_commutes_with_whole_window_translations():
    torch.manual_seed(0)
    block = SwinBlock(16, heads=2, window=4, shift=0, mlp_ratio=2.0, groups=4, resolution=12)
    x = torch.randn(2, 16, 12, 16)
    rolled_first = block(torch.roll(x, (4, 8), dims=(2, 3)))
    torch.testing.assert_close(rolled_first, torch.roll(block(x), (4, 8), dims=(2, 3)))
    # ...but not with a translation inside a window: attention really is windowed.
    assert not torch.allclose(block(torch.roll(x, 1, dims=3)), torch.roll(block(x), 1, dims=3), atol=1e-4)


def test_blocks_no_larger_than_the_window_get_no_shift_as_in_the_release():
    with torch.device("meta"):
        denoiser = build_denoiser(DenoiserConfig())
    shifts = {name: block.shift for name, block in denoiser.named_modules() if isinstance(block, SwinBlock)}
    # Levels at 64, 32, 16 and 8 (LR 64): the 8x8 level and the middle block keep shift 0.
    shifted = sorted(name for name, shift in shifts.items() if shift)
    assert shifted == sorted(name for name in shifts if name.endswith("blocks.1")
                             and not name.startswith(("input_blocks.10.", "middle_block.", "output_blocks.0.",
                                                      "output_blocks.1.", "output_blocks.2.")))
    assert len(shifted) == 6 and all(shifts[name] == 4 for name in shifted)
    buffers = dict(denoiser.named_buffers())
    assert {name.removesuffix(".attn_mask") for name in buffers if name.endswith("attn_mask")} == set(shifted)


def test_release_mask_separates_only_the_bottom_window_row_left_from_right():
    window, shift = 4, 2
    release = shifted_window_mask(12, 8, window, shift, "release").view(3, 2, 16, 16)
    swin = shifted_window_mask(12, 8, window, shift, "swin").view(3, 2, 16, 16)
    assert not release[:2].any()  # windows above the bottom row: nothing masked
    column = torch.arange(16) % window  # token (row, col) -> col within its window
    left = column < window - shift
    expected = (left[:, None] != left[None, :]).float() * -100.0
    assert torch.equal(release[2, 0], expected) and torch.equal(release[2, 1], expected)
    # Swin's own rule also masks the right column of windows, and in the bottom row by rows.
    assert swin[:2, 1].any() and not swin[:2, 0].any()
    row = torch.arange(16) // window
    top = row < window - shift
    assert torch.equal(swin[2, 0], (top[:, None] != top[None, :]).float() * -100.0)


def test_a_build_size_mask_is_stored_and_other_sizes_get_theirs(tiny_config):
    from dataclasses import replace

    denoiser = build_denoiser(replace(tiny_config.denoiser, shift_mask="swin"))
    block = next(b for b in denoiser.modules() if isinstance(b, SwinBlock) and b.shift)
    assert torch.equal(block.attn_mask, shifted_window_mask(64, 64, 8, 4, "swin"))
    assert torch.equal(block._mask(32, 48, torch.device("cpu")), shifted_window_mask(32, 48, 8, 4, "swin"))


def test_residual_prediction_starts_at_the_conditions_first_image(tiny_config):
    from dataclasses import replace

    for use_sr_condition in (True, False):
        config = replace(tiny_config.denoiser, predict="residual", use_sr_condition=use_sr_condition)
        denoiser = build_denoiser(config)
        cond = torch.randn(1, 6 if use_sr_condition else 3, 64, 64)
        out = denoiser(torch.randn(1, 3, 64, 64), torch.tensor([3]), cond)
        assert torch.equal(out, cond[:, :3])  # g(y), or y for the baseline
        assert layout_of(denoiser) == layout_of(build_denoiser(replace(config, predict="x0")))


def layout_of(module):
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}
