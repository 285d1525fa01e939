"""Synthesis throughput, measured side by side in one run (crops = LR/HR pairs per second).

(a) the authors' way: Real-ESRGAN's second-order degradation written with basicsr's torch
    primitives (random_mixed_kernels, filter2D, DiffJPEG, random_add_*_noise_pt), on batches,
    in a serial single-process loop with torch's default threads; UPSR's settings, no USM;
(b) our ``Degrader.apply`` alone (default config: OpenCV filtering, real JPEG), no I/O;
(c) the whole ``upsr synth`` Ray Data pipeline (read, decode, crop, degrade, PNG, Parquet)
    on the sample photographs with a local Ray of 1 and of 2 CPUs. A job pays a fixed start-up
    (planning, actors importing torch and basicsr) of several seconds; the job is run at two
    sizes and the steady-state rate is the marginal one, (rows2 - rows1) / (t2 - t1). Both the
    whole-job rate of the larger run and the steady-state rate are printed.

Goals: c2/a >= 2.0 and pipeline overhead b/c2 - 1 <= 25 % (on the steady-state rates).

    .venv/bin/python benchmarks/synth.py [--crops-per-image 24 96] [--batches 12]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import basicsr_compat  # noqa: F401
from basicsr.data.degradations import (
    circular_lowpass_kernel,
    random_add_gaussian_noise_pt,
    random_add_poisson_noise_pt,
    random_mixed_kernels,
)
from basicsr.utils import DiffJPEG
from basicsr.utils.img_process_util import filter2D

from degradations import DegradationConfig, Degrader, sample

BATCH = 8


def authors_kernel(config: DegradationConfig, stage: str) -> np.ndarray:
    """RealESRGANDataset's per-sample kernel draw (ResShift's sizes: odd 3..19, padded to 21)."""
    suffix = "2" if stage == "2" else ""
    pad_to = getattr(config, f"blur_kernel_size{suffix}")
    size = random.choice(range(3, pad_to - 1, 2))
    if np.random.uniform() < getattr(config, f"sinc_prob{suffix}"):
        cutoff = np.random.uniform(np.pi / 3, np.pi) if size < 13 else np.random.uniform(np.pi / 5, np.pi)
        kernel = circular_lowpass_kernel(cutoff, size, pad_to=False)
    else:
        sigma = getattr(config, f"blur_sigma{suffix}")
        kernel = random_mixed_kernels(list(getattr(config, f"kernel_list{suffix}")),
                                      list(getattr(config, f"kernel_prob{suffix}")), size, sigma, sigma,
                                      [-math.pi, math.pi], getattr(config, f"betag_range{suffix}"),
                                      getattr(config, f"betap_range{suffix}"), noise_range=None)
    pad = (pad_to - size) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def authors_degrade(gt: torch.Tensor, config: DegradationConfig, jpeger: DiffJPEG) -> torch.Tensor:
    """Real-ESRGAN's feed_data (batch-level resize choices), as ResShift/UPSR configure it."""
    b, _, h, w = gt.shape
    kernel1 = torch.from_numpy(np.stack([authors_kernel(config, "1") for _ in range(b)])).float()
    kernel2 = torch.from_numpy(np.stack([authors_kernel(config, "2") for _ in range(b)])).float()
    out = filter2D(gt, kernel1)
    for stage in ("1", "2"):
        suffix = "2" if stage == "2" else ""
        if stage == "2":
            if np.random.uniform() < config.second_blur_prob:
                out = filter2D(out.contiguous(), kernel2)
        direction = random.choices(["up", "down", "keep"], getattr(config, f"resize_prob{suffix}"))[0]
        low, high = getattr(config, f"resize_range{suffix}")
        scale = np.random.uniform(1, high) if direction == "up" else (
            np.random.uniform(low, 1) if direction == "down" else 1)
        mode = random.choice(["area", "bilinear", "bicubic"])
        if stage == "1":
            out = F.interpolate(out, scale_factor=scale, mode=mode)
        else:
            out = F.interpolate(out, size=(int(h / config.scale * scale), int(w / config.scale * scale)), mode=mode)
        gray = getattr(config, f"gray_noise_prob{suffix}")
        if np.random.uniform() < getattr(config, f"gaussian_noise_prob{suffix}"):
            out = random_add_gaussian_noise_pt(out, sigma_range=getattr(config, f"noise_range{suffix}"), clip=True,
                                               rounds=False, gray_prob=gray)
        else:
            out = random_add_poisson_noise_pt(out, scale_range=getattr(config, f"poisson_scale_range{suffix}"),
                                              gray_prob=gray, clip=True, rounds=False)
        quality = out.new_zeros(b).uniform_(*getattr(config, f"jpeg_range{suffix}"))
        out = jpeger(torch.clamp(out, 0, 1).contiguous(), quality=quality)
    sinc = torch.from_numpy(np.stack([
        circular_lowpass_kernel(np.random.uniform(np.pi / 3, np.pi), random.choice(range(3, 21, 2)), pad_to=21)
        if np.random.uniform() < config.final_sinc_prob else np.pad([[1.0]], 10) for _ in range(b)])).float()
    lr_size = (h // config.scale, w // config.scale)
    quality = out.new_zeros(b).uniform_(*config.jpeg_range2)
    if np.random.uniform() < 0.5:
        out = filter2D(F.interpolate(out, size=lr_size, mode=random.choice(["area", "bilinear", "bicubic"])).contiguous(),
                       sinc)
        out = jpeger(torch.clamp(out, 0, 1).contiguous(), quality=quality)
    else:
        out = jpeger(torch.clamp(out, 0, 1).contiguous(), quality=quality)
        out = filter2D(F.interpolate(out, size=lr_size, mode=random.choice(["area", "bilinear", "bicubic"])).contiguous(),
                       sinc)
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


def hr_crops(count: int) -> np.ndarray:
    from pipelines.images import random_crops
    from pipelines.synth import sample_photos

    photos = [load() for load in sample_photos().values()]
    crops = []
    for i in range(count):
        crops.append(random_crops(photos[i % len(photos)], 1, 256, seed=i)[0][2])
    return np.stack(crops)


def measure_authors(crops: np.ndarray) -> float:
    config = DegradationConfig()
    jpeger = DiffJPEG(differentiable=False)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    batches = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255.0).contiguous().split(BATCH)
    with torch.no_grad():
        authors_degrade(batches[0], config, jpeger)  # warm-up
        start = time.perf_counter()
        for batch in batches:
            authors_degrade(batch, config, jpeger)
    return len(crops) / (time.perf_counter() - start)


def measure_apply(crops: np.ndarray) -> float:
    degrader = Degrader()
    records = [sample(seed) for seed in range(len(crops))]
    degrader.apply(crops[:BATCH], records[:BATCH])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(crops), BATCH):
        degrader.apply(crops[i:i + BATCH], records[i:i + BATCH])
    return len(crops) / (time.perf_counter() - start)


def measure_pipeline(cpus: int, sizes: list[int]) -> list[dict]:
    """Runs in a fresh process so each Ray instance gets exactly ``cpus`` CPUs.

    An untimed job of the first size runs first, so that one-off costs of a process's first
    job (Ray Data's set-up, first worker processes) fall on neither timed job.
    """
    from pipelines import config as config_module
    from pipelines.ray_env import init_ray
    from pipelines.synth import export_sample_photos, synthesize

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        photos = export_sample_photos(Path(workdir, "photos"))
        for run, crops_per_image in enumerate([sizes[0], *sizes]):
            config = config_module.load(None, [f"ray.num_cpus={cpus}", f"synth.crops_per_image={crops_per_image}"])
            init_ray(config.ray)
            start = time.perf_counter()
            manifest = synthesize(str(photos), str(Path(workdir, f"out{run}")), config)
            results.append({"rows": manifest["counts"]["rows"], "seconds": time.perf_counter() - start})
    return results[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops-per-image", type=int, nargs=2, default=[24, 96],
                        help="the two pipeline sizes: 9 photographs x each")
    parser.add_argument("--batches", type=int, default=12, help="batches of 8 crops for (a) and (b)")
    parser.add_argument("--pipeline-cpus", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_cpus:
        print(json.dumps(measure_pipeline(args.pipeline_cpus, args.crops_per_image)))
        return

    crops = hr_crops(args.batches * BATCH)
    a = measure_authors(crops)
    b = measure_apply(crops)
    c, whole = {}, {}
    for cpus in (1, 2):
        out = subprocess.run([sys.executable, __file__, "--pipeline-cpus", str(cpus), "--crops-per-image",
                              *map(str, args.crops_per_image)], capture_output=True, text=True, check=True,
                             env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        small, large = json.loads(out.stdout.strip().splitlines()[-1])
        c[cpus] = (large["rows"] - small["rows"]) / (large["seconds"] - small["seconds"])
        whole[cpus] = (large["rows"], large["rows"] / large["seconds"])
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"(a)  authors' way, basicsr torch primitives, serial:  {a:7.1f} crops/s")
    print(f"(b)  our apply alone (OpenCV + real JPEG), no I/O:    {b:7.1f} crops/s")
    for cpus in (1, 2):
        print(f"(c{cpus}) Ray Data pipeline, {cpus} CPU{'s' if cpus > 1 else ' '}, steady state:     {c[cpus]:7.1f} crops/s"
              f"   (whole job of {whole[cpus][0]} crops: {whole[cpus][1]:.1f} crops/s)")
    print(f"c2/a  = {c[2] / a:5.2f}   (goal >= 2.0)")
    print(f"c2/c1 = {c[2] / c[1]:5.2f}")
    print(f"b/c2  = {b / c[2]:5.2f}   (goal: overhead b/c2 - 1 <= 0.25)")
    print(f"b/c1  = {b / c[1]:5.2f}   (one CPU each: what the job adds to apply per crop)")


if __name__ == "__main__":
    main()
