"""Data-path throughput of training: how many CPU cores keep one GPU fed.

What a training worker's batches cost on the CPU, measured side by side in one run on a dataset
that ``upsr synth`` writes first (the sample photographs, configs/upsr_x4.yaml's degradation and
Parquet layout, HR crops of ``--crop`` pixels, 256 in the paper, LR crops a quarter of that):

(1) one process pinned to one core, ``torch.set_num_threads(1)``: a plain PyArrow/PyTorch loop
    over the Parquet row groups doing what the Ray path does per batch, with the project's own
    functions: read the PNG columns, ``decode_pairs`` (the Ray Data decode), ``torch.from_numpy``
    (the collation ``iter_torch_batches`` does), ``to_images`` (uint8 NHWC -> float NCHW) and
    ``augment`` (random flip and 90-degree rotation). Time per stage and per sample;
(2) the Ray Data path exactly as ``upsr train`` builds it: ``open_training_data`` (read_parquet,
    decode_pairs in map_batches, randomized block order), Ray Train's ingest (``ingest_config``'s
    DataConfig.configure: streaming_split for one worker), consumed by ``iter_batches`` (local
    shuffle buffer, prefetching, collation) followed by ``augment``, on a fresh local Ray of 1 and
    of 2 CPUs (``init_ray`` with ``ray.num_cpus``). This process plays the one training worker and
    consumes as fast as it can. Each Ray instance first runs ``--warmup-epochs`` untimed epochs.
    Reported per timed epoch: the time to its first batch, its length and rate (each epoch restarts
    the pipeline, as a training run's epochs do), the rate after the first batch, and the CPU
    seconds that every process of the instance (driver, raylet, GCS, Ray Data tasks) spent per
    sample; and the all-to-all operators of the dataset's plan, which hold the first batch back
    until the whole epoch has passed through them.

Each Ray instance runs in a subprocess of its own (so this process never starts or stops a Ray);
the largest synthesises the dataset before its epochs, which is why its warm-up epoch matters.

Then the sizing: given the GPU's training rate X (samples/s, ``--gpu-samples-per-s``; without
it, a table for a few example rates), the cores per GPU that keep the GPU waiting for data less
than ``--max-wait`` of the time, and whether an 8-GPU node of ``--node-vcpus`` vCPUs (AWS
p5en.48xlarge: 192 for 8 H200s) has them. The model is printed with the figures.

    .venv/bin/python benchmarks/data_path.py                       # ~4 minutes on 2 cores
    .venv/bin/python benchmarks/data_path.py --gpu-samples-per-s 700
    .venv/bin/python benchmarks/data_path.py --rows 72 --crop 64 --batch-size 4 --epochs 1 \
        --warmup-epochs 0 --passes 1                               # smoke run, ~40 s
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("benchmarks.data_path")

RESULT_PREFIX = "DATA_PATH_RESULT "
EXAMPLE_GPU_RATES = (100, 200, 400, 800)
PAPER_CONFIG = REPO / "configs" / "upsr_x4.yaml"


def bench_config(rows: int, crop: int, ray_cpus: int | None):
    """configs/upsr_x4.yaml (the paper's degradation, Parquet layout and train_data settings) with
    enough crops per sample photograph for ``rows`` rows, every photograph in the train split."""
    from pipelines import config as config_module
    from pipelines.synth import sample_photos

    photos = len(sample_photos(config_module.SynthConfig().sample_collections))
    overrides = [f"synth.crop_size={crop}", f"synth.crops_per_image={max(1, math.ceil(rows / photos))}",
                 "train_data.val_fraction=0"]
    if ray_cpus:
        overrides.append(f"ray.num_cpus={ray_cpus}")
    return config_module.load(PAPER_CONFIG, overrides)


# --- run in subprocesses: each owns one local Ray instance ---------------------------------------

def synthesize_dataset(output: Path, rows: int, crop: int) -> dict:
    """``upsr synth`` of the sample photographs into ``output``, on the Ray instance this process started."""
    from pipelines.dataset import open_dataset
    from pipelines.synth import export_sample_photos, synthesize

    config = bench_config(rows, crop, None)
    photos = export_sample_photos(output.parent / "photos", config.synth.sample_collections)
    started = time.perf_counter()
    manifest = synthesize(str(photos), str(output), config)
    seconds = time.perf_counter() - started
    dataset = open_dataset(str(output))
    total_bytes = sum(Path(path).stat().st_size for path in dataset.shard_paths)
    return {"rows": manifest["counts"]["rows"], "bytes": total_bytes, "files": len(dataset.shard_paths),
            "seconds": seconds}


def process_tree_cpu_seconds(cpu_by_pid: dict[int, float]) -> dict[int, float]:
    """User + system CPU seconds of this process and all its descendants (Ray's GCS and raylet are
    children of the driver, Ray's workers children of the raylet), keyed by pid, merged over
    ``cpu_by_pid`` so that a process that has exited keeps its last reading."""
    import psutil

    me = psutil.Process()
    readings = dict(cpu_by_pid)
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            readings[process.pid] = times.user + times.system
        except psutil.Error:
            continue
    return readings


def measure_ray(data_uri: str, cpus: int, batch_size: int, epochs: int, warmup_epochs: int,
                synthesise: dict | None = None) -> dict:
    """Samples/s of the training ingest on a fresh local Ray of ``cpus`` CPUs, consumed here; with
    ``synthesise`` ({"rows", "crop"}), the instance first synthesises the dataset at ``data_uri``."""
    import ray
    import torch

    from pipelines.config import load
    from pipelines.images import derive_seed
    from pipelines.ray_env import init_ray
    from pipelines.train_data import augment, ingest_config, iter_batches, open_training_data

    torch.set_num_threads(1)
    config = load(PAPER_CONFIG, ["train_data.val_fraction=0", f"ray.num_cpus={cpus}"])
    settings = config.train_data
    init_ray(config.ray)
    try:
        synth = synthesize_dataset(Path(data_uri), **synthesise) if synthesise else None
        data = open_training_data(data_uri, settings, config.storage)
        plan = repr(data.train)
        # What Ray Train does for its workers (V2's DatasetManager calls this DataConfig.configure).
        shard = ingest_config(settings, ["train"]).configure(
            data.datasets, world_size=1, worker_handles=None,
            worker_node_ids=[ray.get_runtime_context().get_node_id()])[0]["train"]
        device = torch.device("cpu")
        generator = torch.Generator()
        epochs_timed = []
        cpu_start: dict[int, float] = {}
        for epoch in range(warmup_epochs + epochs):
            if epoch == warmup_epochs:
                cpu_start = process_tree_cpu_seconds({})
                wall_start = time.perf_counter()
            started = time.perf_counter()
            first_at, first_rows, rows = None, 0, 0
            for step, (lr, hr) in enumerate(iter_batches(shard, batch_size, settings, device,
                                                         shuffle_seed=derive_seed(0, "bench", epoch))):
                generator.manual_seed(derive_seed(0, epoch, step))
                lr, hr = augment(lr, hr, generator)
                rows += hr.shape[0]
                if first_at is None:
                    first_at, first_rows = time.perf_counter(), hr.shape[0]
            ended = time.perf_counter()
            if first_at is None:
                raise RuntimeError(f"an epoch of {data.train_rows} rows gave no batch of {batch_size}")
            log.info("%d CPU(s), epoch %d%s: %d samples in %.2f s (first batch after %.2f s)", cpus, epoch,
                     " (warm-up)" if epoch < warmup_epochs else "", rows, ended - started, first_at - started)
            if epoch >= warmup_epochs:
                epochs_timed.append({"rows": rows, "seconds": ended - started, "first_rows": first_rows,
                                     "steady_seconds": ended - first_at,
                                     "decode_tasks": decode_task_times(shard.stats())})
        wall = time.perf_counter() - wall_start
        cpu_end = process_tree_cpu_seconds(cpu_start)
    finally:
        ray.shutdown()
    cpu_seconds = sum(cpu_end[pid] - cpu_start.get(pid, 0.0) for pid in cpu_end)
    rows = sum(e["rows"] for e in epochs_timed)
    after_rows = sum(e["rows"] - e["first_rows"] for e in epochs_timed)
    after_seconds = sum(e["steady_seconds"] for e in epochs_timed)
    seconds = sum(e["seconds"] for e in epochs_timed)
    decode = [e["decode_tasks"] for e in epochs_timed]
    decode_cpu_per_sample = (sum(d["cpu"] for d in decode) / sum(d["rows"] for d in decode)
                             if all(decode) and sum(d["rows"] for d in decode) else None)
    return {"cpus": cpus, "rows": rows, "epochs": len(epochs_timed), "epoch_seconds": seconds / len(epochs_timed),
            "decode_cpu_seconds_per_sample": decode_cpu_per_sample,
            "first_batch_seconds": sum(e["seconds"] - e["steady_seconds"] for e in epochs_timed) / len(epochs_timed),
            "whole": rows / seconds, "after_first": after_rows / after_seconds if after_seconds > 0 else math.nan,
            "cpu_seconds_per_sample": cpu_seconds / rows, "busy_cores": cpu_seconds / wall,
            "plan": plan, "barriers": barriers(plan), "synth": synth}


def decode_task_times(stats: str) -> dict | None:
    """Remote CPU and wall seconds and output rows of the read+decode operator in the last execution's
    stats (``DataIterator.stats()``); None where the text does not have them."""
    import re

    seconds = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
    block = re.search(r"^Operator \d+ [^\n]*MapBatches\(decode_pairs\)[^\n]*\n(.*?)(?=^Operator |\Z)", stats,
                      re.MULTILINE | re.DOTALL)
    if not block:
        return None
    found = {}
    for key, label in (("cpu", "Remote cpu time"), ("wall", "Remote wall time")):
        match = re.search(label + r":.*?([\d.]+)(s|ms|us) total", block.group(1))
        if not match:
            return None
        found[key] = float(match.group(1)) * seconds[match.group(2)]
    rows = re.search(r"Output num rows per block:.*?(\d+) total", block.group(1))
    return {**found, "rows": int(rows.group(1))} if rows else None


# Ray Data operators that take in every block of their input before they hand on the first one.
ALL_TO_ALL = ("RandomizeBlockOrder", "RandomShuffle", "Repartition", "Sort", "Aggregate")


def barriers(plan: str) -> list[str]:
    """The all-to-all operators in a Dataset's plan as ``repr`` prints it (one operator a line)."""
    names = [line.strip().removeprefix("+- ").split("(")[0].strip() for line in plan.splitlines()]
    return [name for name in names if name in ALL_TO_ALL]


# --- run in this process -------------------------------------------------------------------------

@dataclass
class LoopResult:
    samples: int
    seconds: dict[str, float]  # per stage
    cpu_seconds: float

    @property
    def wall(self) -> float:
        return sum(self.seconds.values())

    @property
    def rate(self) -> float:
        return self.samples / self.wall


def measure_single_core(data_uri: str, batch_size: int, passes: int) -> LoopResult:
    """(1): the per-batch work of the Ray path in one process on one core, stage by stage."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipelines.dataset import open_dataset
    from pipelines.train_data import augment, decode_pairs, to_images

    dataset = open_dataset(data_uri)
    crop, scale = dataset.manifest["config"]["synth"]["crop_size"], dataset.manifest["config"]["degradation"]["scale"]
    sizes = {"hr_size": crop, "lr_size": crop // scale}  # as open_training_data passes them
    sources = set(pq.read_table(dataset.shard_paths, columns=["source"])["source"].to_pylist())
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(1)
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    seconds = dict.fromkeys(("read", "decode", "collate", "augment"), 0.0)
    samples = 0
    try:
        cpu_started = time.process_time()
        for _ in range(passes):
            for path in dataset.shard_paths:
                batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size,
                                                            columns=["source", "hr_png", "lr_png"])
                while True:
                    started = time.perf_counter()
                    record_batch = next(batches, None)
                    if record_batch is None:
                        break
                    # Ray Data's batch_format="numpy": one array per column.
                    batch = {name: column.to_numpy(zero_copy_only=False)
                             for name, column in zip(record_batch.schema.names, record_batch.columns)}
                    decoding = time.perf_counter()
                    pairs = decode_pairs(batch, keep=sources, **sizes)
                    collating = time.perf_counter()
                    lr, hr = to_images({name: torch.from_numpy(np.ascontiguousarray(images))
                                        for name, images in pairs.items()}, device)
                    augmenting = time.perf_counter()
                    augment(lr, hr, generator)
                    ended = time.perf_counter()
                    seconds["read"] += decoding - started
                    seconds["decode"] += collating - decoding
                    seconds["collate"] += augmenting - collating
                    seconds["augment"] += ended - augmenting
                    samples += len(pairs["hr"])
        cpu_seconds = time.process_time() - cpu_started
    finally:
        torch.set_num_threads(threads)
        if affinity:
            os.sched_setaffinity(0, affinity)
    return LoopResult(samples, seconds, cpu_seconds)


def run_subprocess(arguments: list[str], timeout: float) -> dict:
    command = [sys.executable, __file__, *arguments]
    log.info("running %s", " ".join(command[1:]))
    # stderr (its log) goes to ours; stdout carries the result line.
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not results:
        raise RuntimeError(f"{' '.join(command[1:])} failed (exit {done.returncode}); its log is above")
    return json.loads(results[-1][len(RESULT_PREFIX):])


def cores_per_gpu(gpu_rate: float, per_core: float, max_wait: float, barrier: bool = False) -> float:
    """Data cores that keep a GPU training at ``gpu_rate`` samples/s waiting at most ``max_wait``
    of the time, with loaders of ``per_core`` samples/s per core that scale linearly.

    Streaming (no barrier): loading overlaps the GPU step, the GPU waits 1 - D/X of the time when
    the loaders' rate D = n r falls below X: n >= (1 - max_wait) X / r. With an all-to-all barrier
    after the decode, an epoch's first batch waits for the decode of the whole epoch and training
    overlaps none of it: the GPU waits X / (X + n r) of the time: n >= (1 - max_wait) / max_wait X / r.
    """
    if barrier:
        return (1 - max_wait) / max_wait * gpu_rate / per_core
    return (1 - max_wait) * gpu_rate / per_core


def report(args: argparse.Namespace, synth: dict, loop: LoopResult, ray_runs: list[dict]) -> str:
    hr, lr = args.crop, args.crop // 4
    decoded_kb = 3 * (hr * hr + lr * lr) / 1e3
    row_kb = synth["bytes"] / synth["rows"] / 1e3
    lines = [f"Data path of training: HR {hr}x{hr} / LR {lr}x{lr} PNG pairs from `upsr synth` "
             f"(configs/upsr_x4.yaml, sample photographs), batch {args.batch_size}, "
             f"machine {os.cpu_count()} CPUs",
             f"dataset: {synth['rows']} rows in {synth['files']} Parquet files, {row_kb:.1f} kB per row on disk "
             f"(HR + LR PNG and the degradation record), {decoded_kb:.1f} kB decoded; "
             f"synthesised in {synth['seconds']:.1f} s",
             ""]
    per = {name: 1e3 * value / loop.samples for name, value in loop.seconds.items()}
    lines += ["| path | first batch after (s) | epoch (s) | samples/s | samples/s per core | "
              "CPU ms / sample, decode | CPU ms / sample, all |",
              "|---|---|---|---|---|---|---|",
              f"| (1) one process on one core: read + decode + collate + augment | - | "
              f"{loop.wall / args.passes:.2f} | {loop.rate:.1f} | {loop.rate:.1f} | "
              f"{per['read'] + per['decode']:.2f} (read + decode_pairs) | "
              f"{1e3 * loop.cpu_seconds / loop.samples:.2f} |"]
    for run in ray_runs:
        decode = run["decode_cpu_seconds_per_sample"]
        lines.append(f"| (2) Ray Data ingest, local Ray of {run['cpus']} CPU{'s' if run['cpus'] > 1 else ''} "
                     f"(after the first batch: {run['after_first']:.0f} samples/s) | "
                     f"{run['first_batch_seconds']:.2f} | {run['epoch_seconds']:.2f} | {run['whole']:.1f} | "
                     f"{run['whole'] / run['cpus']:.1f} per Ray CPU | "
                     f"{f'{1e3 * decode:.2f}' if decode else 'n/a'} (read + decode tasks) | "
                     f"{1e3 * run['cpu_seconds_per_sample']:.2f} |")
    lines += ["", "(1) by stage, ms per sample on one core:", "",
              "| read Parquet | decode PNGs (decode_pairs) | collate + to float (to_images) | augment | total |",
              "|---|---|---|---|---|",
              f"| {per['read']:.3f} | {per['decode']:.3f} | {per['collate']:.3f} | {per['augment']:.3f} | "
              f"{1e3 * loop.wall / loop.samples:.3f} |", "",
              "(2): samples/s over whole timed epochs (each epoch restarts the pipeline: listing the files, "
              "worker processes). CPU ms / sample, decode: the remote CPU time of Ray Data's read + decode_pairs "
              "tasks (Ray Data's stats of each epoch); all: CPU time of every process of the Ray instance (this "
              "process as the worker: shuffle buffer, collation, augment; GCS, raylet, Ray Data's tasks and "
              "actors) over the timed epochs, per-epoch start-up included."]
    found = sorted({name for run in ray_runs for name in run["barriers"]})
    if ray_runs:
        plan = " <- ".join(line.strip().removeprefix("+- ").split("(num_rows")[0]
                           for line in ray_runs[0]["plan"].splitlines())
        lines += ["", f"Training dataset plan (open_training_data): {plan}."]
        if found:
            lines.append(f"All-to-all barrier in it: {', '.join(found)} takes in every decoded block of the epoch "
                         f"before the first batch leaves ({decoded_kb:.0f} kB per row held in the object store) and "
                         "the training loop overlaps none of that decode.")

    # Sizing: the per-core rate of the work that grows with the data, Ray Data's read + decode tasks
    # (the slowest run's), or (1)'s read + decode without them; the worker's own share (collation,
    # H2D copies, launches) is its CPU below.
    decodes = [run["decode_cpu_seconds_per_sample"] for run in ray_runs if run["decode_cpu_seconds_per_sample"]]
    if decodes:
        per_core, source = 1 / max(decodes), "Ray Data's read + decode tasks, slowest run of (2)"
    else:
        per_core, source = 1e3 / (per["read"] + per["decode"]), "(1)'s read + decode"
    all_cores = (f"; counting every process of (2), per-epoch start-up included, r would be "
                 f"{min(1 / run['cpu_seconds_per_sample'] for run in ray_runs):.1f}" if ray_runs else "")
    w = args.max_wait
    rates = [args.gpu_samples_per_s] if args.gpu_samples_per_s else list(EXAMPLE_GPU_RATES)
    per_gpu = args.node_vcpus / args.node_gpus
    lines += ["", f"Cores per GPU for a GPU training at X samples/s to wait for data < {w:.0%} of the time; "
              f"r = {per_core:.1f} samples/s per core ({source}, this machine's cores{all_cores}), loaders "
              "scaling linearly with their cores. Streaming: Ray Data decodes in its own processes and prefetches "
              "(train_data.prefetch_batches), so loading overlaps the GPU step and the GPU waits 1 - D/X of the time "
              f"when the loaders' rate D = n r is below X: n >= {1 - w:.2f} X / r. Epoch barrier (what the current "
              f"plan does{'' if found else ' not'}): the GPU idles while the whole epoch decodes, X / (X + n r) of the "
              f"time: n >= {(1 - w) / w:.0f} X / r. Each GPU's worker also holds train.cpus_per_worker = 1 CPU. Node: "
              f"{args.node_gpus} x (ceil(n) + 1) against {args.node_vcpus} vCPUs ({per_gpu:.0f} per GPU; AWS "
              f"p5en.48xlarge: 192 vCPUs for 8 H200s); a vCPU is one hyperthread, so the last column counts only "
              f"{args.node_vcpus // 2} physical cores.", "",
              "| GPU rate X (samples/s) | model | data cores per GPU n | CPUs per GPU (n + 1) | "
              f"{args.node_gpus}-GPU node needs | fits {args.node_vcpus} vCPUs? | fits {args.node_vcpus // 2} cores? |",
              "|---|---|---|---|---|---|---|"]
    for rate in rates:
        for barrier in (False, True):
            n = cores_per_gpu(rate, per_core, w, barrier)
            node = args.node_gpus * (math.ceil(n) + 1)
            model = "epoch barrier" if barrier else "streaming"
            lines.append(f"| {rate:g} | {model} | {n:.2f} | {math.ceil(n) + 1} | {node} | "
                         f"{'yes' if node <= args.node_vcpus else 'no'} ({100 * node / args.node_vcpus:.0f}%) | "
                         f"{'yes' if node <= args.node_vcpus // 2 else 'no'} |")
    data_cores = per_gpu - 1
    lines += ["", f"With {data_cores:.0f} data vCPUs per GPU, a {args.node_vcpus}-vCPU node keeps each GPU fed up to "
              f"{data_cores * per_core / (1 - w):,.0f} samples/s streaming, "
              f"{data_cores * per_core * w / (1 - w):,.0f} samples/s with the epoch barrier."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4608, help="rows to synthesise (rounded up to whole "
                                                                "crops per sample photograph)")
    parser.add_argument("--crop", type=int, default=256, help="HR crop side (the paper's 256); LR is a quarter")
    parser.add_argument("--batch-size", type=int, default=16, help="a worker's batch (the paper's 16 per GPU)")
    parser.add_argument("--ray-cpus", type=int, nargs="+", default=[1, 2],
                        help="local Ray sizes to measure; the largest also synthesises the dataset, first")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per Ray instance")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs per Ray instance first")
    parser.add_argument("--passes", type=int, default=2, help="passes of the single-core loop over the data")
    parser.add_argument("--gpu-samples-per-s", type=float, help="the GPU's training rate; default: a table of "
                                                                 f"example rates {EXAMPLE_GPU_RATES}")
    parser.add_argument("--max-wait", type=float, default=0.05, help="share of time the GPU may wait for data")
    parser.add_argument("--node-vcpus", type=int, default=192, help="vCPUs of a GPU node (p5en.48xlarge: 192)")
    parser.add_argument("--node-gpus", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each subprocess")
    parser.add_argument("--data", help=argparse.SUPPRESS)  # the subprocess mode
    parser.add_argument("--measure-ray", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--synthesise", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.ray_cpus) < 1 or args.epochs < 1 or args.warmup_epochs < 0 or args.passes < 1:
        parser.error("--ray-cpus and --epochs must be >= 1, --warmup-epochs >= 0, --passes >= 1")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.measure_ray:
        for name in ("ray", "pipelines"):
            logging.getLogger(name).setLevel(logging.WARNING)
        result = measure_ray(args.data, args.measure_ray, args.batch_size, args.epochs, args.warmup_epochs,
                             {"rows": args.rows, "crop": args.crop} if args.synthesise else None)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return ""

    with tempfile.TemporaryDirectory(prefix="upsr-data-path-") as folder:
        data = str(Path(folder, "data"))
        ray_runs = []
        synth: dict = {}
        # Largest instance first: it synthesises the dataset, then measures after a warm-up epoch.
        for cpus in sorted(set(args.ray_cpus), reverse=True):
            first = not ray_runs
            run = run_subprocess(["--rows", str(args.rows), "--crop", str(args.crop), "--batch-size",
                                  str(args.batch_size), "--data", data, "--measure-ray", str(cpus), "--epochs",
                                  str(args.epochs), "--warmup-epochs", str(args.warmup_epochs),
                                  *(["--synthesise"] if first else [])], args.timeout)
            if first:
                synth = run["synth"]
                log.info("synthesised %d rows (%.1f kB per row) in %.1f s", synth["rows"],
                         synth["bytes"] / synth["rows"] / 1e3, synth["seconds"])
            log.info("Ray Data, %d CPU(s): %.1f samples/s, first batch after %.2f s of a %.2f s epoch", cpus,
                     run["whole"], run["first_batch_seconds"], run["epoch_seconds"])
            ray_runs.append(run)
            if first:
                loop = measure_single_core(data, args.batch_size, args.passes)
                log.info("one core: %.1f samples/s", loop.rate)
    text = report(args, synth, loop, sorted(ray_runs, key=lambda run: run["cpus"]))
    print(text)
    return text


if __name__ == "__main__":
    main()
