"""UPSR: uncertainty-guided perturbation for diffusion super-resolution (the model library).

``upsr.load(path_or_uri)`` returns a ready ``UPSRPipeline``; ``pipeline.upscale(images)``
super-resolves x4. Heavy imports (torch, basicsr) happen on first use, so importing ``upsr``
for its config classes stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from upsr.checkpoint import load
    from upsr.inference import UPSRPipeline

__all__ = ["load", "UPSRPipeline"]


def __getattr__(name: str):
    if name == "load":
        from upsr.checkpoint import load

        return load
    if name == "UPSRPipeline":
        from upsr.inference import UPSRPipeline

        return UPSRPipeline
    raise AttributeError(f"module 'upsr' has no attribute {name!r}")
