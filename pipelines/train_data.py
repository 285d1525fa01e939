"""Training data of both training jobs: a synthesised dataset split by photograph.

The validation split holds every crop of a deterministic fraction of the source photographs,
so no crop of a validation photograph is ever trained on. The train split streams through Ray
Data: shards read with ``ray.data.read_parquet`` (exactly those the manifest lists), PNGs
decoded in ``map_batches``; workers receive uint8 NHWC batches and turn them into float NCHW
tensors in [0, 1] on their device, with a random flip and 90-degree rotation per pair. The few
validation crops a run scores are read once by the driver, in the dataset's own order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.dataset as pads
import ray

# Ray Data's read/decode tasks, its split coordinator and Ray Train's dataset manager all
# unpickle ``decode_pairs`` and so import this module in fresh processes, several per run:
# without torch it imports in ~1 s instead of ~5 (as pipelines.synth for its write tasks).
if TYPE_CHECKING:
    import torch

from pipelines.errors import UserError
from pipelines.config import StorageConfig, TrainDataConfig
from pipelines.dataset import IncompleteDataset, SynthDataset, open_dataset
from pipelines.images import decode_png, derive_seed

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    dataset: SynthDataset
    train: ray.data.Dataset
    train_sources: list[str]
    val_sources: list[str]
    train_rows: int
    crop_sizes: dict[str, int]  # decode_pairs' hr_size and lr_size

    @property
    def datasets(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train}

    def validation_pairs(self, rows: int) -> dict[str, np.ndarray] | None:
        """The first ``rows`` crops of the held-out photographs in the dataset's own order (shard by
        shard, as synth wrote them), decoded: the same images in every run, trial and resume of any
        config, so that validation scores compare. None when nothing is held out.

        Read here with pyarrow: a streaming pipeline would cost more to start than these few
        crops cost to read.
        """
        if not self.val_sources or rows < 1:
            return None
        table = pads.dataset(self.dataset.shard_paths, filesystem=self.dataset.location.fs, format="parquet").head(
            rows, columns=["source", "hr_png", "lr_png"], filter=pads.field("source").isin(self.val_sources))
        return decode_pairs(table.to_pydict(), keep=set(self.val_sources), **self.crop_sizes)


def split_sources(sources: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) source names: the val share is the first ``val_fraction`` of the sources ranked
    by a hash of their names, at least one when the fraction is positive and one photo is left."""
    unique = sorted(set(sources))
    ranked = sorted(unique, key=lambda name: derive_seed(seed, "val-split", name))
    count = round(len(unique) * val_fraction)
    if val_fraction > 0:
        count = min(max(count, 1), len(unique) - 1)
    val = sorted(ranked[:count])
    return sorted(set(unique) - set(val)), val


def open_training_data(uri: str, settings: TrainDataConfig, storage: StorageConfig) -> TrainingData:
    try:
        dataset = open_dataset(uri, storage.s3_endpoint, storage.s3_region)
    except IncompleteDataset as error:
        raise UserError(str(error)) from None
    fs = dataset.location.fs
    # The source column alone: a small read, even for a large dataset.
    sources = pads.dataset(dataset.shard_paths, filesystem=fs, format="parquet").to_table(
        columns=["source"])["source"].to_pylist()
    train_sources, val_sources = split_sources(sources, settings.val_fraction, settings.split_seed)
    held_out = set(val_sources)
    train_rows = sum(1 for source in sources if source not in held_out)
    if not train_sources:
        raise UserError(f"{uri} holds no rows to train on")
    log.info("%s: %d source photos for training, %d held out for validation", uri, len(train_sources),
             len(val_sources))
    rows = ray.data.read_parquet(dataset.shard_paths, filesystem=fs).select_columns(["source", "hr_png", "lr_png"])
    # Datasets derived from ``rows`` inherit its context: materialize() keeps the read order too.
    rows.context.execution_options.preserve_order = settings.deterministic
    synth = dataset.manifest["config"]["synth"]
    scale = dataset.manifest["config"]["degradation"]["scale"]
    crop_sizes = {"hr_size": synth["crop_size"], "lr_size": synth["crop_size"] // scale}
    train = rows.map_batches(decode_pairs, fn_kwargs={"keep": set(train_sources), **crop_sizes},
                             batch_format="numpy")
    if settings.materialize:
        train = train.materialize()
    block_order_seed = derive_seed(settings.split_seed, "block-order") if settings.deterministic else None
    return TrainingData(dataset, train.randomize_block_order(seed=block_order_seed), train_sources, val_sources,
                        train_rows, crop_sizes)


def decode_pairs(batch: dict[str, np.ndarray], keep: set[str], hr_size: int, lr_size: int) -> dict[str, np.ndarray]:
    """PNG pairs -> uint8 ``hr`` (N, H, W, 3) and ``lr`` (N, h, w, 3), rows of the kept sources only."""
    chosen = [i for i, source in enumerate(batch["source"]) if source in keep]
    hr = np.empty((len(chosen), hr_size, hr_size, 3), np.uint8)
    lr = np.empty((len(chosen), lr_size, lr_size, 3), np.uint8)
    for k, i in enumerate(chosen):
        hr[k] = decode_png(batch["hr_png"][i])
        lr[k] = decode_png(batch["lr_png"][i])
    return {"hr": hr, "lr": lr}


def to_images(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC ``lr``, ``hr`` -> float NCHW in [0, 1] on ``device``."""
    def convert(images: torch.Tensor) -> torch.Tensor:
        return images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)

    return convert(batch["lr"]), convert(batch["hr"])


def validation_batches(pairs: dict[str, np.ndarray], batch_size: int,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``validation_pairs`` as ``(lr, hr)`` float batches on ``device`` (the last one may be short)."""
    import torch

    return [to_images({name: torch.from_numpy(images[start:start + batch_size]) for name, images in pairs.items()},
                      device) for start in range(0, len(pairs["hr"]), batch_size)]


def augment(lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random horizontal flip and 90-degree rotation for both images of each pair."""
    import torch

    flips = torch.randint(0, 2, (lr.shape[0],), generator=generator).tolist()
    turns = torch.randint(0, 4, (lr.shape[0],), generator=generator).tolist()
    lr_out, hr_out = [], []
    for index, (flip, turn) in enumerate(zip(flips, turns)):
        pair = [lr[index], hr[index]]
        if flip:
            pair = [image.flip(-1) for image in pair]
        pair = [image.rot90(turn, dims=(-2, -1)) for image in pair]
        lr_out.append(pair[0])
        hr_out.append(pair[1])
    return torch.stack(lr_out), torch.stack(hr_out)


def ingest_config(settings: TrainDataConfig, datasets_to_split: list[str]):
    """Ray Train's ``DataConfig`` for the training jobs, deterministic when ``settings`` asks."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = settings.deterministic
    return DataConfig(datasets_to_split=datasets_to_split, execution_options=options,
                      enable_shard_locality=not settings.deterministic)


def iter_batches(shard: Any, batch_size: int, settings: TrainDataConfig, device: torch.device,
                 shuffle_seed: int | None = None, shuffle: bool = True):
    """One epoch of a worker's shard as ``(lr, hr)`` float batches; short last batches are dropped
    so that every worker runs the same number of steps. ``shuffle_seed`` seeds the row shuffle
    of a deterministic config."""
    shuffle_buffer = settings.shuffle_buffer if shuffle else None
    for batch in shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, device="cpu", prefetch_batches=settings.prefetch_batches,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=shuffle_seed if shuffle_buffer and settings.deterministic else None):
        yield to_images(batch, device)
