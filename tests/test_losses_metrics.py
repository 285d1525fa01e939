"""Losses (MSE + LPIPS with its offline VGG loader), overfitting, and the full-reference metrics."""

from __future__ import annotations

import logging

import pytest
import torch

from upsr.config import LossConfig, MetricsConfig
from upsr.denoiser import build_denoiser
from upsr.losses import LPIPSBackboneError, VGG16_FILENAME, DiffusionLoss, build_lpips
from upsr.metrics import full_reference_metrics, psnr, ssim


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def test_missing_vgg_backbone_is_a_clear_error_naming_where_it_looked(empty_torch_home):
    with pytest.raises(LPIPSBackboneError) as error:
        build_lpips()
    expected = empty_torch_home / "hub" / "checkpoints" / VGG16_FILENAME
    assert str(expected) in str(error.value)
    with pytest.raises(LPIPSBackboneError, match="elsewhere/vgg.pth"):
        DiffusionLoss(LossConfig(lpips_weight=0.5, lpips_backbone="/elsewhere/vgg.pth"))


def test_random_backbone_is_allowed_for_tests_with_a_warning(empty_torch_home, caplog):
    with caplog.at_level(logging.WARNING, logger="upsr.losses"):
        loss = DiffusionLoss(LossConfig(lpips_weight=0.5, allow_random_backbone=True))
    assert "LPIPS not meaningful" in caplog.text
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    terms = loss(x0 + 0.1, x0)
    assert set(terms) == {"mse", "lpips", "loss"}
    assert terms["loss"].item() == pytest.approx(terms["mse"].item() + 0.5 * terms["lpips"].item(), rel=1e-5)


def test_the_random_backbone_is_the_same_in_every_run_and_leaves_the_callers_random_state(empty_torch_home):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_lpips(allow_random_backbone=True)
    assert torch.equal(torch.rand(3), expected_next)
    second = build_lpips(allow_random_backbone=True)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                 strict=True))


def test_lambda_zero_does_not_build_lpips(empty_torch_home):
    loss = DiffusionLoss(LossConfig(lpips_weight=0.0))  # would raise if it looked for VGG16
    assert loss.lpips is None
    x0 = torch.zeros(1, 3, 8, 8)
    assert loss(x0 + 0.5, x0)["loss"].item() == pytest.approx(0.25)


@pytest.mark.slow
def test_vgg_backbone_file_is_loaded_into_the_lpips_trunk(tmp_path, caplog):
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)  # stands in for the ImageNet file: same keys and shapes
    path = tmp_path / VGG16_FILENAME
    torch.save(vgg.state_dict(), path)
    with caplog.at_level(logging.WARNING):
        model = build_lpips(path)
    assert "not meaningful" not in caplog.text
    torch.testing.assert_close(getattr(model.net.slice5, "28").weight, vgg.features[28].weight)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model(image, image).abs().max() < 1e-6
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_tiny_denoiser_overfits_one_batch_with_the_real_forward_process(tiny_parts):
    from skimage import data

    denoiser, _, diffusion = tiny_parts
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255 * 2 - 1
    x0 = torch.stack([photo[:, 100:164, 200:264], photo[:, 300:364, 150:214]])
    y = torch.nn.functional.avg_pool2d(x0, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    weight = torch.full_like(x0, 0.7)
    cond = torch.cat([y, y], dim=1)
    t = torch.tensor([1, 3])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = diffusion.q_sample(x0, y, t, weight, noise)
    loss_fn = DiffusionLoss(LossConfig(lpips_weight=0.0))
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = loss_fn(denoiser(diffusion.scale_input(x_t, t), t, cond), x0)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_psnr_and_ssim_on_the_y_channel():
    generator = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 48, 48, generator=generator)
    assert torch.all(ssim(hr, hr) > 0.999)
    shifted = (hr + 0.01).clamp(0, 1)
    # basicsr's Y = (65.481 R + 128.553 G + 24.966 B + 16) / 255, so the Y error is that weighted sum.
    expected_mse = ((shifted - hr) * torch.tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255).sum(1).pow(2)
    expected = 10 * torch.log10(1 / expected_mse.mean(dim=(1, 2)).double())
    torch.testing.assert_close(psnr(shifted, hr), expected, rtol=1e-4, atol=1e-3)
    cropped = psnr(shifted, hr, MetricsConfig(crop_border=4))
    assert cropped.shape == (2,)


def test_full_reference_metrics_include_lpips_when_given_a_model(empty_torch_home):
    lpips_model = build_lpips(allow_random_backbone=True)
    hr = torch.rand(1, 3, 32, 32)
    scores = full_reference_metrics(hr, hr, lpips_model=lpips_model)
    assert set(scores) == {"psnr", "ssim", "lpips"}
    assert scores["lpips"].abs().max() < 1e-6
    with pytest.raises(ValueError, match="one shape"):
        psnr(hr, hr[..., :16])


def test_lr_consistency_is_perfect_for_an_sr_image_that_degrades_back_to_its_lr():
    import torch.nn.functional as F

    from upsr.metrics import lr_consistency

    torch.manual_seed(0)
    sr = F.interpolate(torch.rand(2, 3, 16, 16), scale_factor=4, mode="bilinear")
    lr = F.interpolate(sr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    # 10 log10(1 / 1e-8): basicsr's PSNR of identical images.
    assert torch.allclose(lr_consistency(sr, lr), torch.full((2,), 80.0, dtype=torch.float64), atol=0.5)
    noisy = (sr + 0.1 * torch.randn_like(sr)).clamp(0, 1)
    assert (lr_consistency(noisy, lr) < 40).all()
