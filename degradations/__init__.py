"""Real-ESRGAN second-order degradation with UPSR's settings: draw a record, then apply it.

>>> record = sample(seed=7)                    # every random choice, JSON-serialisable
>>> lr = apply(hr_crops, [record])             # uint8 (N, 256, 256, 3) -> (N, 64, 64, 3)

``sample`` and the config need only numpy; ``apply`` needs torch and basicsr (~4 s to import),
so the apply side loads on first use: processes that only draw records or read configs, such
as Ray Data's write tasks, stay light.
"""

from importlib import import_module

from degradations.config import DegradationConfig
from degradations.record import RECORD_VERSION, sample

_APPLY_SIDE = ("Degrader", "apply", "build_kernel")

__all__ = ["DegradationConfig", "Degrader", "RECORD_VERSION", "apply", "build_kernel", "sample"]


def __getattr__(name: str):
    if name in _APPLY_SIDE:
        return getattr(import_module("degradations.degrader"), name)
    raise AttributeError(f"module 'degradations' has no attribute {name!r}")
