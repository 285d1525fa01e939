"""The training EMA: its decay ramps up over the first updates, then holds."""

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipelines.training_loop import ema_update


class WithIndex(nn.Linear):
    """A layer with an integer buffer, like the denoiser's relative-position index."""

    def __init__(self):
        super().__init__(1, 1, bias=False)
        self.register_buffer("index", torch.arange(5))


def run_ema(warmup: bool, updates: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = WithIndex()
    nn.init.zeros_(model.weight)
    ema = AveragedModel(model, multi_avg_fn=ema_update(0.999, warmup), use_buffers=True)
    expected = None
    for step in range(updates):
        with torch.no_grad():
            model.weight.fill_(float(step + 1))
        ema.update_parameters(model)
        value = model.weight.detach().clone()
        if expected is None:
            expected = value  # AveragedModel copies the model on its first update
        else:
            n = step  # updates averaged before this one
            decay = min(0.999, (1 + n) / (10 + n)) if warmup else 0.999
            expected = decay * expected + (1 - decay) * value
    assert torch.equal(ema.module.index, torch.arange(5))
    return ema.module.weight.detach(), expected


def test_warmup_decay_follows_the_ramp():
    got, expected = run_ema(warmup=True, updates=30)
    assert torch.allclose(got, expected, rtol=1e-5)
    # After 30 updates the warm EMA sits near the latest weights (30); a fixed 0.999 stays near the start.
    assert got.item() > 20
    fixed, fixed_expected = run_ema(warmup=False, updates=30)
    assert torch.allclose(fixed, fixed_expected, rtol=1e-5) and fixed.item() < 2
