"""Sampling speed of UPSRPipeline: 5-step DDIM at 64->256 (tiny and paper-size denoiser) and a
tiled 256->1024 upscale (tiny): time per image, network calls, FLOPs per image and the achieved
rate (FlopCounterMode over one whole upscale, aux net included); on CUDA also peak memory.

Networks are randomly initialised: speed does not depend on the weights.

    .venv/bin/python benchmarks/sample.py                # CPU
    .venv/bin/python benchmarks/sample.py --device cuda  # adds peak memory
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipelines.config import Config, load
from upsr.aux_net import build_aux_net, freeze
from upsr.denoiser import build_denoiser, count_parameters
from upsr.diffusion import UNWDiffusion
from upsr.inference import UPSRPipeline

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
log = logging.getLogger("benchmarks.sample")


@dataclass
class Case:
    name: str
    config: Config
    lr_side: int
    batch: int


@dataclass
class Result:
    case: Case
    parameters: int
    ms_per_image: float
    calls_per_run: float
    gflop_per_image: float
    tflops: float
    peak_gib: float | None = None


def build_pipeline(config: Config, device: str) -> UPSRPipeline:
    torch.manual_seed(0)
    denoiser = build_denoiser(config.denoiser)
    aux_net = freeze(build_aux_net(config.aux))
    diffusion = UNWDiffusion.from_config(config.diffusion)
    return UPSRPipeline(denoiser, aux_net, diffusion, config.weight, config.inference).to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(case: Case, device: str, repeats: int) -> Result:
    pipeline = build_pipeline(case.config, device)
    calls = 0

    def count_call(module, args, output):
        nonlocal calls
        calls += 1

    pipeline.denoiser.register_forward_hook(count_call)
    lr = torch.rand(case.batch, 3, case.lr_side, case.lr_side, generator=torch.Generator().manual_seed(0)).to(device)
    pipeline.upscale(lr)  # warm-up: allocator, cuDNN algorithm choice, lazy imports
    with FlopCounterMode(display=False) as counter:
        pipeline.upscale(lr)
    flops = counter.get_total_flops()
    calls = 0
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        pipeline.upscale(lr)
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    return Result(
        case=case,
        parameters=count_parameters(pipeline.denoiser),
        ms_per_image=seconds * 1000 / case.batch,
        calls_per_run=calls / repeats,
        gflop_per_image=flops / case.batch / 1e9,
        tflops=flops / seconds / 1e12,
        peak_gib=peak,
    )


def cases(args: argparse.Namespace) -> list[Case]:
    tiny = load(CONFIGS / "tiny.yaml")
    paper = load(CONFIGS / "upsr_x4.yaml")
    untiled = {"tile": 512, "stride": 448}  # 64-pixel LR fits one tile
    selected = [
        Case("tiny 64->256 DDIM-5", replace(tiny, inference=replace(tiny.inference, **untiled)), 64, args.batch),
        Case("tiny 256->1024 tiled", tiny, 256, 1),
    ]
    if not args.skip_paper:
        selected.insert(1, Case("paper 64->256 DDIM-5", paper, 64, 1))
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case after one warm-up")
    parser.add_argument("--batch", type=int, default=4, help="images per call for the tiny 64->256 case")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-paper", action="store_true", help="leave out the 119M-parameter model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")

    results = []
    for case in cases(args):
        log.info("running %s (batch %d)", case.name, case.batch)
        results.append(run_case(case, args.device, args.repeats))

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\ndevice: {device_name}; torch {torch.__version__}; repeats {args.repeats}\n")
    header = "| case | denoiser params | batch | ms / image | network calls / run | GFLOP / image | TFLOP/s |"
    rule = "|---|---|---|---|---|---|---|"
    if args.device == "cuda":
        header += " peak GiB |"
        rule += "---|"
    print(header)
    print(rule)
    for r in results:
        row = (f"| {r.case.name} | {r.parameters / 1e6:.2f}M | {r.case.batch} | {r.ms_per_image:,.0f} | "
               f"{r.calls_per_run:g} | {r.gflop_per_image:,.0f} | {r.tflops:.3f} |")
        if args.device == "cuda":
            row += f" {r.peak_gib:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
