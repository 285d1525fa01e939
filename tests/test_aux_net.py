"""The auxiliary SR net: basicsr construction, weight loading, freezing, the SR condition."""

from __future__ import annotations

import pytest
import torch

from upsr.aux_net import (
    AuxTrainingLoss,
    AuxWeightsError,
    build_aux_net,
    freeze,
    load_aux_weights,
    sr_condition,
)
from upsr.config import AuxConfig
from upsr.denoiser import count_parameters
from upsr.config import LossConfig
from upsr.losses import DiffusionLoss
from upsr.objective import UPSRObjective


def test_default_is_the_release_atd_and_any_lr_size_works():
    aux = build_aux_net(AuxConfig())
    assert type(aux.net).__name__ == "ATD" and count_parameters(aux) == 2_532_360
    with torch.no_grad():
        sr = aux(torch.rand(1, 3, 13, 21))  # not a multiple of the window: padded and cropped back
    assert sr.shape == (1, 3, 52, 84) and torch.isfinite(sr).all()


def test_unknown_architecture_and_wrong_scale_are_named():
    with pytest.raises(ValueError, match="NoSuchNet"):
        build_aux_net(AuxConfig(arch="NoSuchNet"))
    with pytest.raises(ValueError, match="upscale"):
        build_aux_net(AuxConfig(arch="MSRResNet", options={"num_feat": 8, "num_block": 1, "upscale": 2}))


def test_basicsr_checkpoint_loads_and_a_foreign_one_is_refused(tmp_path, tiny_config):
    source = build_aux_net(tiny_config.aux)
    path = tmp_path / "aux.pth"
    torch.save({"params_ema": source.net.state_dict()}, path)
    target = build_aux_net(tiny_config.aux)
    load_aux_weights(target, path)
    lr = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(target(lr), source(lr))

    other = tmp_path / "other.pth"
    torch.save({"params": {"conv.weight": torch.zeros(1)}}, other)
    with pytest.raises(AuxWeightsError, match="other.pth"):
        load_aux_weights(target, other)
    with pytest.raises(AuxWeightsError, match="missing.pth"):
        load_aux_weights(target, tmp_path / "missing.pth")


def test_frozen_aux_gets_no_gradient_and_does_not_change_in_a_denoiser_step(tiny_parts, tiny_config):
    denoiser, aux_net, diffusion = tiny_parts
    assert not aux_net.training and not any(p.requires_grad for p in aux_net.parameters())
    before = {name: p.clone() for name, p in aux_net.state_dict().items()}
    # Even a naive optimiser over both nets must leave the frozen one alone.
    optimizer = torch.optim.AdamW(list(denoiser.parameters()) + list(aux_net.parameters()), lr=1e-2)
    lr = torch.rand(2, 3, 16, 16)
    hr = torch.rand(2, 3, 64, 64)
    condition = sr_condition(aux_net, lr, tiny_config.weight, use_sr_condition=True)
    assert not condition.cond.requires_grad  # built under no_grad: no graph through g
    objective = UPSRObjective(aux_net, diffusion, tiny_config.weight, DiffusionLoss(LossConfig(lpips_weight=0)),
                              use_sr_condition=True)
    loss = objective(denoiser, lr, hr, generator=torch.Generator().manual_seed(0))
    loss["loss"].backward()
    optimizer.step()
    assert all(p.grad is None for p in aux_net.parameters())
    for name, tensor in aux_net.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_sr_condition_ranges_and_baseline(tiny_parts, tiny_config):
    _, aux_net, _ = tiny_parts
    lr = torch.rand(1, 3, 16, 16)
    full = sr_condition(aux_net, lr, tiny_config.weight, use_sr_condition=True)
    baseline = sr_condition(aux_net, lr, tiny_config.weight, use_sr_condition=False)
    assert full.cond.shape == (1, 6, 64, 64) and baseline.cond.shape == (1, 3, 64, 64)
    # g(y) is the net's output as it is: the release does not clamp it.
    torch.testing.assert_close(full.g_y, aux_net(lr) * 2 - 1)
    floor = tiny_config.weight.floor
    assert full.weight.min() >= floor - 1e-6 and full.weight.max() <= 1 + 1e-6
    torch.testing.assert_close(
        full.y, torch.nn.functional.interpolate(lr * 2 - 1, scale_factor=4, mode="bicubic", align_corners=False)
    )


def test_aux_training_loss_is_l1_without_lpips(tiny_config):
    loss = AuxTrainingLoss(tiny_config.aux)
    assert loss.lpips is None
    sr, hr = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.25)
    assert loss(sr, hr)["loss"].item() == pytest.approx(0.25)


def test_sr_condition_is_float32_inside_autocast(tiny_parts, tiny_config):
    """The release computes g(y), w and the condition outside autocast; bf16 would round w's small
    differences away."""
    _, aux_net, _ = tiny_parts
    lr = torch.rand(2, 3, 16, 16)
    expected = sr_condition(aux_net, lr, tiny_config.weight, use_sr_condition=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.Linear(2, 2)(torch.rand(1, 2)).dtype == torch.bfloat16  # autocast is really on
        inside = sr_condition(aux_net, lr.bfloat16(), tiny_config.weight, use_sr_condition=True)
    for name in ("y", "g_y", "weight", "cond"):
        value = getattr(inside, name)
        assert value.dtype == torch.float32, name
    # The LR given in bf16 is cast back exactly (bf16 -> fp32 is lossless), so only that rounding shows.
    again = sr_condition(aux_net, lr.bfloat16().float(), tiny_config.weight, use_sr_condition=True)
    torch.testing.assert_close(inside.cond, again.cond, rtol=0, atol=0)
    torch.testing.assert_close(inside.weight, again.weight, rtol=0, atol=0)
    assert expected.cond.dtype == torch.float32
