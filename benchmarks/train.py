"""Training throughput of UPSR: a plain PyTorch loop against Ray Train with 1 and 2 workers.

CPU mode (default): the tiny model of configs/tiny.yaml, the same global batch everywhere,
one intra-op thread per process. The plain loop trains on tensors decoded in advance (it never
waits for data); the Ray Train runs are the real ``upsr train`` loop (Ray Data shards, DDP over
gloo, EMA, MLflow logging of every step) on a dataset synthesised from the sample photographs.
Throughput counts steps after ``--warmup``; "data wait" is the share of step time a worker
spent waiting for its next batch. The aux net is randomly initialised (speed does not depend
on the weights).

The paper-size model's step on a GPU (FLOPs, MFU, torch.compile) is measured by
benchmarks/gpu_check.py.

    .venv/bin/python benchmarks/train.py                # CPU, a few minutes here
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tiny_config(root: Path, overrides: list[str]):
    from pipelines import config as config_module

    return config_module.load(REPO / "configs" / "tiny.yaml", [
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"train.storage_path={root / 'ray'}",
        "train_data.materialize=true", "loss.lpips_weight=0", *overrides])


def plain_loop(config, data_uri: str, global_batch: int, steps: int, warmup: int) -> float:
    """Samples/s of a single-process loop doing the same work per step as a Ray Train worker."""
    import pyarrow.dataset as pads
    from torch.optim.swa_utils import AveragedModel

    from pipelines.dataset import open_dataset
    from pipelines.images import decode_png
    from pipelines.train import DiffusionTask
    from pipelines.optimization import build_optimizer
    from pipelines.train_data import augment
    from pipelines.training_loop import ema_update

    dataset = open_dataset(data_uri)
    table = pads.dataset(dataset.shard_paths, filesystem=dataset.location.fs, format="parquet").to_table(
        columns=["hr_png", "lr_png"])
    hr = torch.from_numpy(np.stack([decode_png(b) for b in table["hr_png"].to_pylist()])).permute(0, 3, 1, 2)
    lr = torch.from_numpy(np.stack([decode_png(b) for b in table["lr_png"].to_pylist()])).permute(0, 3, 1, 2)
    torch.manual_seed(0)
    task = DiffusionTask(config, torch.device("cpu"))
    model = task.model
    ema = AveragedModel(model, multi_avg_fn=ema_update(config.train.ema_decay, config.train.ema_warmup),
                        use_buffers=True)
    optimizer = build_optimizer(model.parameters(), config.train.lr, config.train.weight_decay, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        chosen = torch.randint(0, hr.shape[0], (global_batch,), generator=generator)
        lr_batch, hr_batch = augment(lr[chosen].float() / 255, hr[chosen].float() / 255, generator)
        loss = task.losses(model, lr_batch, hr_batch, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        ema.update_parameters(model)
        times.append(time.perf_counter() - started)
    return global_batch * (steps - warmup) / sum(times[warmup:])


def ray_train(root: Path, data_uri: str, workers: int, global_batch: int, steps: int, warmup: int):
    """(samples/s, data wait fraction) of ``upsr train`` with ``workers`` workers."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import TRAIN
    from pipelines.training_loop import fit

    config = tiny_config(root, [f"train.num_workers={workers}", f"train.batch_size={global_batch // workers}",
                                f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=1",
                                f"train.validate_every={steps + 1}", "train.cpus_per_worker=1"])
    result = fit(TRAIN, config, data_uri, f"bench-{workers}-workers")
    client = MlflowClient()

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
                if m.step > warmup]

    step_seconds = [global_batch / rate for rate in history("samples_per_s")]
    wait_seconds = [fraction * seconds for fraction, seconds in zip(history("data_wait_fraction"), step_seconds)]
    return global_batch * len(step_seconds) / sum(step_seconds), sum(wait_seconds) / sum(step_seconds)


def cpu_benchmark(args: argparse.Namespace) -> None:
    import ray

    from pipelines.synth import export_sample_photos, synthesize

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        # One logical CPU more than the workers take, for Ray Data's work.
        ray.init(address="local", num_cpus=3, include_dashboard=False)
        config = tiny_config(root, [f"synth.crop_size={args.crop}"])
        data_uri = str(root / "data")
        synthesize(str(export_sample_photos(REPO / "runs" / "sample_photos")), data_uri, config)
        plain = plain_loop(config, data_uri, args.global_batch, args.steps, args.warmup)
        one, one_wait = ray_train(root, data_uri, 1, args.global_batch, args.steps, args.warmup)
        two, two_wait = ray_train(root, data_uri, 2, args.global_batch, args.steps, args.warmup)
        ray.shutdown()
    print(f"\ntiny model, HR crops {args.crop}x{args.crop}, global batch {args.global_batch}, "
          f"{args.steps} steps ({args.warmup} warm-up), 1 intra-op thread per process")
    print("| run | samples/s | vs plain loop | data wait |")
    print("|---|---|---|---|")
    print(f"| plain PyTorch loop, 1 process | {plain:.2f} | 1.00x | 0 (pre-decoded) |")
    print(f"| Ray Train, 1 worker | {one:.2f} | {one / plain:.2f}x | {100 * one_wait:.1f}% |")
    print(f"| Ray Train, 2 workers | {two:.2f} | {two / plain:.2f}x | {100 * two_wait:.1f}% |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="HR crop side (256 in the paper)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cpu_benchmark(args)


if __name__ == "__main__":
    main()
