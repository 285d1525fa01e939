"""The optimisation step of both training jobs, free of Ray, so that ``benchmarks/gpu_check.py``
times what the Ray Train workers run: matmul precision, the optimiser, ``torch.compile`` and
gradient accumulation over micro-batches."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

# Devices with a fused AdamW kernel in torch (one kernel for the whole update instead of a
# handful per parameter group).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def configure_matmul(device: torch.device) -> None:
    """TF32 for the float32 matrix products on GPUs (g(y), w and the condition stay in float32
    under bf16 autocast); CPUs have no TF32 and keep full float32."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward passes' autocast for a resolved precision (a reusable context manager)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def build_optimizer(parameters: Iterable[nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(parameters), lr=lr, weight_decay=weight_decay,
                             fused=device.type in FUSED_ADAMW_DEVICES)


def maybe_compile(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """The net the steps call: compiled, it shares its parameters with ``model`` (which the EMA,
    checkpoints and validation keep using, with their plain state-dict names). Training batches
    all have one shape, so the graph is compiled for that shape (no dynamic-shape recompile)."""
    return torch.compile(model, backend=backend, dynamic=False) if enabled else model


@dataclass
class Accumulated:
    """One optimiser step's forward and backward passes over its micro-batches."""

    finite: bool
    # The mean over micro-batches of the loss, summed over ranks (divide by the world size).
    loss_sum_over_ranks: float = math.nan
    # This rank's mean over micro-batches of each loss term.
    terms: dict[str, float] = field(default_factory=dict)


def backward_over_micro_batches(model: nn.Module, micro_batches: Sequence,
                                loss_terms: Callable[[object], dict[str, torch.Tensor]],
                                scale: Callable[[torch.Tensor], torch.Tensor],
                                reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> Accumulated:
    """Accumulate into ``.grad`` the gradient of the mean loss over ``micro_batches`` (each
    micro-batch's mean loss divided by their number: with equal sizes, the gradient of one batch
    of their union). DDP synchronises on the last micro-batch only. A loss that is not finite on
    any rank (``reduce_sum`` sums over ranks) ends the step before its backward pass, on every
    rank alike: the caller skips the optimiser step."""
    count = len(micro_batches)
    loss_sum = 0.0
    totals: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        defer_sync = index < count - 1 and hasattr(model, "no_sync")
        with model.no_sync() if defer_sync else contextlib.nullcontext():
            terms = loss_terms(batch)
            loss = terms["loss"]
            summed = reduce_sum(torch.stack([loss.detach().float(), (~torch.isfinite(loss)).float()]))
            if summed[1] != 0:
                return Accumulated(finite=False)
            scale(loss / count).backward()
        loss_sum += float(summed[0]) / count
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / count
    return Accumulated(True, loss_sum, totals)
