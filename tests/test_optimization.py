"""The training step's options for large runs (pipelines/optimization.py, train.*): gradient
accumulation, activation checkpointing, torch.compile and the fused AdamW, each against the
plain step it replaces. Gradients are compared to float32 tolerance: the sums run in another order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipelines import config as config_module
from upsr.config_loader import ConfigError
from pipelines.optimization import backward_over_micro_batches, build_optimizer, maybe_compile
from upsr.denoiser import build_denoiser

REPO = Path(__file__).resolve().parent.parent
# Differences in summation order stay below this, relative to the largest gradient entry.
RELATIVE_TOLERANCE = 1e-5


def tiny_denoiser(*overrides: str) -> torch.nn.Module:
    config = config_module.load(REPO / "configs" / "tiny.yaml", list(overrides))
    assert config.denoiser.dropout == 0  # the comparisons below need a deterministic forward pass
    torch.manual_seed(0)
    return build_denoiser(config.denoiser)


def batch(size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(size, 3, 64, 64, generator=generator)
    cond = torch.randn(size, 6, 64, 64, generator=generator)
    target = torch.randn(size, 3, 64, 64, generator=generator)
    t = torch.randint(0, 4, (size,), generator=generator)
    return x_t, t, cond, target


def regression_terms(model: torch.nn.Module):
    def terms(micro_batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x_t, t, cond, target = micro_batch
        return {"loss": F.mse_loss(model(x_t, t, cond), target)}

    return terms


def gradients(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0
    error = (actual - expected).abs().max().item()
    assert error <= RELATIVE_TOLERANCE * scale, f"max difference {error:.3g} against largest entry {scale:.3g}"


def no_reduction(values: torch.Tensor) -> torch.Tensor:
    return values


def test_accumulating_micro_batches_gives_the_gradient_of_their_union():
    model = tiny_denoiser()
    full = batch(4)
    result = backward_over_micro_batches(model, [full], regression_terms(model), lambda loss: loss, no_reduction)
    expected = gradients(model)
    assert result.finite and result.loss_sum_over_ranks == pytest.approx(result.terms["loss"])

    model.zero_grad(set_to_none=True)
    halves = [tuple(part[:2] for part in full), tuple(part[2:] for part in full)]
    accumulated = backward_over_micro_batches(model, halves, regression_terms(model), lambda loss: loss,
                                              no_reduction)
    assert_close(gradients(model), expected)
    # The logged loss is the mean over micro-batches: the union's loss for equal sizes.
    assert accumulated.loss_sum_over_ranks == pytest.approx(result.loss_sum_over_ranks, rel=1e-5)


def test_a_non_finite_micro_batch_ends_the_step_before_its_backward_pass():
    model = tiny_denoiser()
    good, bad = batch(2, seed=1), batch(2, seed=2)
    bad = (*bad[:3], torch.full_like(bad[3], float("nan")))
    scaled = []

    def scale(loss: torch.Tensor) -> torch.Tensor:
        scaled.append(loss)
        return loss

    result = backward_over_micro_batches(model, [good, bad], regression_terms(model), scale, no_reduction)
    assert not result.finite and result.terms == {}
    assert len(scaled) == 1  # the NaN loss never reached backward
    assert torch.isfinite(gradients(model)).all()


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_denoiser()
    terms = regression_terms(model)
    backward_over_micro_batches(model, [batch(2)], terms, lambda loss: loss, no_reduction)
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(True)
    calls = []
    forward = model.middle_block.forward

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    model.middle_block.forward = counted
    backward_over_micro_batches(model, [batch(2)], terms, lambda loss: loss, no_reduction)
    assert_close(gradients(model), expected)
    assert len(calls) == 2  # the middle level ran again in the backward pass


@pytest.mark.slow
def test_a_compiled_denoiser_gives_the_same_gradients_and_trains_the_same_parameters():
    # One level and one res-block: inductor's C++ code generation for the two-level tiny model
    # takes ~2 minutes on 2 CPU cores, ~1 for this one.
    model = tiny_denoiser("denoiser.channel_mult=[1]", "denoiser.num_res_blocks=1")
    backward_over_micro_batches(model, [batch(2)], regression_terms(model), lambda loss: loss, no_reduction)
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    compiled = maybe_compile(model, True)
    assert compiled is not model
    backward_over_micro_batches(compiled, [batch(2)], regression_terms(compiled), lambda loss: loss, no_reduction)
    # Inductor fuses and reorders float32 arithmetic: a looser bound than eager-vs-eager.
    scale = expected.abs().max().item()
    assert (gradients(model) - expected).abs().max().item() <= 1e-4 * scale
    assert set(compiled.state_dict()) == {f"_orig_mod.{name}" for name in model.state_dict()}


def test_the_fused_adamw_takes_the_same_step_as_the_default_one():
    reference, fused_model = tiny_denoiser(), tiny_denoiser()
    fused = build_optimizer(fused_model.parameters(), 1e-3, 0.01, torch.device("cpu"))
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    assert fused.defaults["fused"] is True
    for model, optimizer in ((reference, plain), (fused_model, fused)):
        for seed in range(3):
            optimizer.zero_grad(set_to_none=True)
            backward_over_micro_batches(model, [batch(2, seed)], regression_terms(model), lambda loss: loss,
                                        no_reduction)
            optimizer.step()
    for expected, actual in zip(reference.parameters(), fused_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_grad_accum_steps_sets_the_global_batch_and_must_be_positive():
    config = config_module.load(REPO / "configs" / "tiny.yaml", ["train.grad_accum_steps=3"])
    assert config.train.global_batch_size == config.train.batch_size * config.train.num_workers * 3
    with pytest.raises(ConfigError, match="train: grad_accum_steps must be >= 1"):
        config_module.load(REPO / "configs" / "tiny.yaml", ["train.grad_accum_steps=0"])
