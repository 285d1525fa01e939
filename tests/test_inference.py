"""UPSRPipeline: input kinds, padding back to the exact size, and seamless tiling."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from upsr.config import InferenceConfig
from upsr.inference import UPSRPipeline, blend_window, tile_starts, tiled_map


class ConvStandIn(nn.Module):
    """A deterministic local denoiser (receptive field 5x5 HR pixels) with the denoiser's interface."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(9, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x_t_scaled, t, cond):
        return torch.tanh(self.conv2(torch.tanh(self.conv1(torch.cat([x_t_scaled, cond], dim=1)))))


def astronaut_lr(height: int, width: int) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.array(Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC))


@pytest.fixture
def stand_in_pipeline(tiny_config, tiny_parts):
    _, aux_net, diffusion = tiny_parts

    def make(inference: InferenceConfig) -> UPSRPipeline:
        return UPSRPipeline(ConvStandIn(tiny_config.denoiser), aux_net, diffusion, tiny_config.weight, inference)

    return make


def test_tiles_cover_every_pixel_and_the_window_never_vanishes():
    assert tile_starts(100, 32, 24) == [0, 24, 48, 68]
    assert tile_starts(32, 32, 24) == [0]
    window = blend_window(128, 32, torch.device("cpu"), torch.float32)
    assert window.min() > 0 and window.max() == 1 and torch.equal(window, window.flip(0))
    assert torch.equal(blend_window(64, 0, torch.device("cpu"), torch.float32), torch.ones(64))


def test_tiled_map_puts_every_upscaled_tile_back_in_its_place():
    image = torch.rand(2, 3, 40, 56)
    calls = []

    def upscale_nearest(crops):
        calls.append(crops.shape[0])
        return torch.nn.functional.interpolate(crops, scale_factor=4, mode="nearest")

    tiled = tiled_map(upscale_nearest, [image], tile=16, stride=12, tile_batch=5, scale=4)
    torch.testing.assert_close(tiled, torch.nn.functional.interpolate(image, scale_factor=4, mode="nearest"))
    assert calls == [10, 10, 10]  # 3 x 5 tiles, 5 per call, 2 images each


def test_tiled_and_untiled_runs_agree_without_seams(stand_in_pipeline):
    lr = torch.from_numpy(astronaut_lr(96, 80)).permute(2, 0, 1)[None].float() / 255
    untiled = stand_in_pipeline(InferenceConfig(tile=96, stride=96)).upscale(lr)
    tiled_config = InferenceConfig(tile=32, stride=24, tile_batch=3)  # 4 x 4 = 16 tiles
    tiled = stand_in_pipeline(tiled_config).upscale(lr)
    assert tiled.shape == untiled.shape == (1, 3, 384, 320)
    assert (tiled - untiled).abs().max() < 2e-3

    # No step at tile borders: the horizontal gradient across a tile's first/last column is
    # like the gradient anywhere else.
    column_step = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    borders = set()
    for start in tile_starts(80, 32, 24):
        borders.update({start * 4 - 1, (start + 32) * 4 - 1})
    borders = sorted(b for b in borders if 0 <= b < column_step.numel())
    assert borders, "the image must be split into several tiles"
    assert column_step[borders].max() < 1.5 * column_step.median()


def test_tiling_keeps_prior_noise_consistent_at_full_size(stand_in_pipeline, monkeypatch):
    calls = []
    pipeline = stand_in_pipeline(InferenceConfig(tile=32, stride=24, tile_batch=4))
    original = pipeline.denoiser.forward

    def counting(x, t, cond):
        calls.append(tuple(x.shape))
        return original(x, t, cond)

    monkeypatch.setattr(pipeline.denoiser, "forward", counting)
    pipeline.upscale(torch.rand(1, 3, 64, 64))
    # 3 x 3 tiles of 128 HR pixels, 4 per call -> 3 calls per step, 5 DDIM steps.
    assert len(calls) == 3 * pipeline.diffusion.num_steps
    assert all(shape[2:] == (128, 128) for shape in calls)


def test_tiny_denoiser_pads_and_crops_back_to_the_exact_size(tiny_checkpoint):
    import upsr

    pipeline = upsr.load(tiny_checkpoint)
    odd = astronaut_lr(21, 37)
    out = pipeline.upscale(odd)
    assert out.shape == (84, 148, 3) and out.dtype == np.uint8
    outputs = pipeline.upscale([odd, astronaut_lr(16, 16), odd])
    assert [o.shape for o in outputs] == [(84, 148, 3), (64, 64, 3), (84, 148, 3)]
    tensor = pipeline.upscale(torch.rand(2, 3, 19, 17))
    assert tensor.shape == (2, 3, 76, 68) and tensor.dtype == torch.float32
    assert 0 <= tensor.min() and tensor.max() <= 1


@pytest.mark.slow
def test_same_seed_same_output_and_tiled_large_image(tiny_checkpoint):
    import upsr

    pipeline = upsr.load(tiny_checkpoint)
    image = astronaut_lr(40, 72)  # padded to 48 x 80 LR > tile 64: tiled
    first = pipeline.upscale(image)
    assert np.array_equal(first, pipeline.upscale(image))
    pipeline.inference_config = replace(pipeline.inference_config, seed=1)
    assert not np.array_equal(first, pipeline.upscale(image))
    assert first.shape == (160, 288, 3)


def test_bad_inputs_are_named(tiny_checkpoint, tiny_config, tiny_parts):
    import upsr

    pipeline = upsr.load(tiny_checkpoint)
    with pytest.raises(ValueError, match="image 1: expected a uint8 HxWx3"):
        pipeline.upscale([astronaut_lr(16, 16), np.zeros((16, 16), np.uint8)])
    with pytest.raises(ValueError, match="Bx3xhxw"):
        pipeline.upscale(torch.zeros(3, 16, 16))
    denoiser, aux_net, diffusion = tiny_parts
    with pytest.raises(ValueError, match="multiple of 16"):
        UPSRPipeline(denoiser, aux_net, diffusion, tiny_config.weight, InferenceConfig(tile=40, stride=32))
    with pytest.raises(ValueError, match="multiple of 16"):
        pipeline.inference_config = InferenceConfig(tile=24, stride=24)


def test_large_images_in_a_list_go_one_at_a_time_and_small_ones_share_calls(stand_in_pipeline, monkeypatch):
    pipeline = stand_in_pipeline(InferenceConfig(tile=32, stride=24, tile_batch=4))
    crops_per_call = []
    original = pipeline.denoiser.forward

    def counting(x, t, cond):
        crops_per_call.append(x.shape[0])
        return original(x, t, cond)

    monkeypatch.setattr(pipeline.denoiser, "forward", counting)
    large = astronaut_lr(48, 48)
    outputs = pipeline.upscale([large, large])
    assert [o.shape for o in outputs] == [(192, 192, 3)] * 2
    assert max(crops_per_call) == 4  # tile_batch tiles of one image, never tile_batch x images
    crops_per_call.clear()
    pipeline.upscale([astronaut_lr(16, 16)] * 3)
    assert crops_per_call == [3] * pipeline.diffusion.num_steps


def test_a_per_call_seed_replaces_the_configured_one(stand_in_pipeline):
    pipeline = stand_in_pipeline(InferenceConfig(tile=64, stride=48, seed=0))
    image = astronaut_lr(16, 24)
    configured = pipeline.upscale(image)
    assert np.array_equal(pipeline.upscale(image, seed=0), configured)
    with_seed_5 = pipeline.upscale(image, seed=5)
    assert not np.array_equal(with_seed_5, configured)
    pipeline.inference_config = replace(pipeline.inference_config, seed=5)
    assert np.array_equal(pipeline.upscale(image), with_seed_5)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(pipeline.upscale(tensor, seed=3), pipeline.upscale(tensor, seed=3))
    assert not torch.equal(pipeline.upscale(tensor, seed=3), pipeline.upscale(tensor, seed=4))


def test_noise_is_the_prior_noise_in_pixel_space(stand_in_pipeline):
    """x_T = y + kappa sqrt(eta_T) w noise: the result is the sampler's from that prior, whatever the seed."""
    from upsr.aux_net import sr_condition
    from upsr.denoiser import make_denoise_fn

    pipeline = stand_in_pipeline(InferenceConfig(tile=96, stride=96))
    lr = torch.rand(2, 3, 16, 32)
    noise = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(7))
    first = pipeline.upscale(lr, seed=1, noise=noise)
    assert torch.equal(first, pipeline.upscale(lr, seed=2, noise=noise))
    assert not torch.equal(first, pipeline.upscale(lr, seed=1))
    condition = sr_condition(pipeline.aux_net, lr, pipeline.weight_config, use_sr_condition=True)
    expected = pipeline.diffusion.sample(make_denoise_fn(pipeline.denoiser, pipeline.diffusion), condition.y,
                                         condition.cond, condition.weight, prior_noise=noise)
    torch.testing.assert_close(first, ((expected + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)


def test_noise_at_the_output_size_is_extended_over_the_padding(stand_in_pipeline):
    pipeline = stand_in_pipeline(InferenceConfig(tile=96, stride=96))
    lr = torch.rand(1, 3, 13, 21)  # padded to 16 x 32 (lr_multiple 16)
    padded_noise = torch.randn(1, 3, 64, 128)
    at_padded = pipeline.upscale(lr, noise=padded_noise)
    at_output = pipeline.upscale(lr, noise=padded_noise[..., :52, :84])
    assert at_padded.shape == at_output.shape == (1, 3, 52, 84)
    # Only the padding's noise differs (drawn from the seed); it reaches the image only near its border.
    assert (at_padded - at_output)[..., :40, :60].abs().max() < 1e-6
    image = astronaut_lr(13, 21)
    assert pipeline.upscale(image, noise=padded_noise[0]).shape == (52, 84, 3)
    with pytest.raises(ValueError, match=r"noise must be a float tensor of shape \(1, 3, 52, 84\)"):
        pipeline.upscale(lr, noise=torch.randn(1, 3, 52, 80))
    with pytest.raises(ValueError, match="not a list"):
        pipeline.upscale([image, image], noise=padded_noise)


def test_release_tiling_samples_every_tile_on_its_own_and_averages(stand_in_pipeline):
    config = InferenceConfig(tile=32, stride=24, tile_batch=3, tiling="release")
    pipeline = stand_in_pipeline(config)
    lr = torch.rand(1, 3, 40, 48)
    noise = torch.randn(1, 3, 160, 192)
    tiled = pipeline.upscale(lr, noise=noise)
    whole = stand_in_pipeline(replace(config, tile=64, stride=64))
    total, count = torch.zeros_like(tiled), torch.zeros_like(tiled)
    for top in tile_starts(40, 32, 24):
        for left in tile_starts(48, 32, 24):
            rows, cols = slice(top * 4, (top + 32) * 4), slice(left * 4, (left + 32) * 4)
            total[..., rows, cols] += whole.upscale(lr[..., top:top + 32, left:left + 32], noise=noise[..., rows, cols])
            count[..., rows, cols] += 1
    torch.testing.assert_close(tiled, total / count, rtol=0, atol=1e-6)
    # Without given noise each tile draws its own: the result is reproducible from the seed.
    assert torch.equal(pipeline.upscale(lr, seed=3), pipeline.upscale(lr, seed=3))
