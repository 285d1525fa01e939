"""Real-ESRGAN second-order degradation with UPSR's settings: draw a record, then apply it.

>>> record = sample(seed=7)                    # every random choice, JSON-serialisable
>>> lr = apply(hr_crops, [record])             # uint8 (N, 256, 256, 3) -> (N, 64, 64, 3)
"""

from degradations.apply import Degrader, apply, build_kernel
from degradations.config import DegradationConfig
from degradations.record import RECORD_VERSION, sample

__all__ = ["DegradationConfig", "Degrader", "RECORD_VERSION", "apply", "build_kernel", "sample"]
