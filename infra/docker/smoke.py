"""The image's smoke test, run at the end of its build: everything a job imports loads, and one
degradation runs (OpenCV, basicsr's kernels and DiffJPEG, torch) on the CPU. A broken OpenCV or
basicsr would otherwise surface only in the first synth task on the cluster."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import ray

import basicsr_compat  # noqa: F401  (torchvision alias basicsr needs, as every job loads it)
import basicsr.data.degradations  # noqa: F401
import cli.main
import pipelines.synth  # noqa: F401
import tune.search  # noqa: F401
import upsr  # noqa: F401
from degradations import Degrader, DegradationConfig, sample


def main() -> int:
    assert ray.__version__ == "2.60.0", ray.__version__
    config = DegradationConfig()
    photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    lr = Degrader(config.primitives, "cpu").apply(photo[None], [sample(0, config)])[0]
    assert lr.shape == (16, 16, 3) and lr.dtype == np.uint8, lr.shape
    sys.stdout.write(f"smoke: ray {ray.__version__}, OpenCV {cv2.__version__}, "
                     f"degradation 64x64 -> {lr.shape[1]}x{lr.shape[0]}; {cli.main.version()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
