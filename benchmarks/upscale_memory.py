"""Memory of ``UPSRPipeline.upscale`` per output pixel, "blend" against "release" tiling, measured side by
side: each case runs in a fresh process that upscales a small image first (allocator, tile buffers,
lazy imports), then a large one, and reports the growth of its peak RSS divided by the large
image's output pixels. ``upsr.inference.BYTES_PER_OUTPUT_PIXEL`` (the default pixel limit of
``upscale`` and ``evaluate``) is this figure rounded up.

Networks: configs/tiny.yaml's, randomly initialised (memory does not depend on the weights),
tiles of 64 LR pixels at stride 48 so that large images are tiled as at paper scale.

    .venv/bin/python benchmarks/upscale_memory.py               # CPU, about a minute here
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(tiling: str, side: int) -> float:
    """Bytes of peak-RSS growth per output pixel (run in a fresh process by ``main``)."""
    import torch

    from pipelines.config import load
    from upsr.aux_net import build_aux_net, freeze
    from upsr.denoiser import build_denoiser
    from upsr.diffusion import UNWDiffusion
    from upsr.inference import UPSRPipeline

    torch.set_num_threads(2)
    config = load(REPO / "configs" / "tiny.yaml")
    pipeline = UPSRPipeline(build_denoiser(config.denoiser).eval(), freeze(build_aux_net(config.aux)),
                            UNWDiffusion.from_config(config.diffusion), config.weight,
                            replace(config.inference, tiling=tiling, tile=64, stride=48))
    with torch.no_grad():
        pipeline.upscale(torch.rand(1, 3, 96, 96))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        pipeline.upscale(torch.rand(1, 3, side, side))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (after - before) / (side * side * pipeline.scale**2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 384], help="LR sides of the large image")
    parser.add_argument("--one", nargs=2, metavar=("TILING", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        json.dump(measure(args.one[0], int(args.one[1])), sys.stdout)
        return
    from upsr.inference import BYTES_PER_OUTPUT_PIXEL

    print("| LR side | blend, bytes / output pixel | release, bytes / output pixel | blend / release |")
    print("|---|---|---|---|")
    for side in args.sides:
        figures = {}
        for tiling in ("blend", "release"):
            done = subprocess.run([sys.executable, __file__, "--one", tiling, str(side)], capture_output=True,
                                  text=True, check=True, cwd=REPO)
            figures[tiling] = json.loads(done.stdout)
        print(f"| {side} | {figures['blend']:.1f} | {figures['release']:.1f} | "
              f"{figures['blend'] / figures['release']:.2f} |")
    print(f"\nlimits used by upsr (inference.BYTES_PER_OUTPUT_PIXEL): {BYTES_PER_OUTPUT_PIXEL}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
