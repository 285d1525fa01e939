"""Training data of both training jobs: a synthesised dataset split by photograph.

The validation split holds every crop of a deterministic fraction of the source photographs,
so no crop of a validation photograph is ever trained on. The train split streams through Ray
Data: shards read with ``ray.data.read_parquet`` (exactly those the manifest lists), PNGs
decoded in ``map_batches``; workers receive uint8 NHWC batches and turn them into float NCHW
tensors in [0, 1] on their device, with a random flip and 90-degree rotation per pair. What a run
validates on is read once by the driver: a few held-out crops in the dataset's own order, or the
held-out photographs whole (``train_data.val_photos``).
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

from pipelines import storage
from pipelines.config import StorageConfig, TrainDataConfig
from pipelines.dataset import IncompleteDataset, SynthDataset, open_dataset
from pipelines.errors import UserError
from pipelines.images import decode_png, decode_rgb, degraded_centre_crop, derive_seed

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    dataset: SynthDataset
    train: ray.data.Dataset
    train_sources: list[str]
    val_sources: list[str]
    train_rows: int
    crop_sizes: dict[str, int]  # decode_pairs' hr_size and lr_size
    settings: TrainDataConfig
    # train_data.val_photos, located when the data is opened: a relative path means the driver's
    # folder, not the one a Tune trial runs in.
    val_photos: storage.Location | None

    @property
    def datasets(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train}

    def validation_pairs(self, batches: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """What validation scores, as uint8 batches ``{"lr", "hr"}`` (NHWC): with
        ``train_data.val_photos``, every held-out photograph whole, one per batch; otherwise the
        first ``batches x batch_size`` crops of the held-out photographs in the dataset's own order
        (shard by shard, as synth wrote them). The same images in every run, trial and resume of any
        config, so that validation scores compare; none when nothing is held out.

        Read here, once, by the driver: a streaming pipeline would cost more to start than these
        few images cost to read.
        """
        if not self.val_sources or batches < 1:
            return []
        if self.val_photos:
            return [dict(zip(("lr", "hr"), (image[None] for image in self.held_out_photo(name))))
                    for name in self.val_sources]
        table = pads.dataset(self.dataset.shard_paths, filesystem=self.dataset.location.fs, format="parquet").head(
            batches * batch_size, columns=["source", "hr_png", "lr_png"],
            filter=pads.field("source").isin(self.val_sources))
        pairs = decode_pairs(table.to_pydict(), keep=set(self.val_sources), **self.crop_sizes)
        return [{name: images[start:start + batch_size] for name, images in pairs.items()}
                for start in range(0, len(pairs["hr"]), batch_size)]

    def held_out_photo(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(LR, HR) of the source photograph ``name`` under ``train_data.val_photos``, degraded with
        the dataset's own degradation settings."""
        from degradations import DegradationConfig
        from upsr.config_loader import from_dict

        location = self.val_photos
        try:
            data = storage.read_bytes(location, location.join(name))
        except FileNotFoundError:
            raise UserError(f"train_data.val_photos: {location.child_uri(name)} does not exist; val_photos must "
                            f"be the folder the dataset {self.dataset.location.uri} was synthesised from") from None
        synth = self.dataset.manifest["config"]["synth"]
        degradation = from_dict(DegradationConfig, self.dataset.manifest["config"]["degradation"])
        photo = decode_rgb(data, synth["max_pixels"], synth["min_side"])
        return degraded_centre_crop(photo, self.settings.val_photo_side, degradation,
                                    derive_seed(synth["seed"], "validation-photo", name))


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


def open_training_data(uri: str, settings: TrainDataConfig, storage_settings: StorageConfig) -> TrainingData:
    try:
        dataset = open_dataset(uri, storage_settings.s3_endpoint, storage_settings.s3_region)
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
    # Epochs are shuffled by reading the shards in a new order each time (files, then rows in the
    # workers' local shuffle buffer), so decoding streams: a block shuffle after the decode would
    # be an all-to-all that holds each epoch's first batch until the whole epoch is decoded.
    file_order_seed = derive_seed(settings.split_seed, "file-order") if settings.deterministic else None
    rows = ray.data.read_parquet(dataset.shard_paths, filesystem=fs,
                                 shuffle=ray.data.FileShuffleConfig(seed=file_order_seed)
                                 ).select_columns(["source", "hr_png", "lr_png"])
    # Datasets derived from ``rows`` inherit its context: materialize() keeps the read order too.
    rows.context.execution_options.preserve_order = settings.deterministic
    synth = dataset.manifest["config"]["synth"]
    scale = dataset.manifest["config"]["degradation"]["scale"]
    crop_sizes = {"hr_size": synth["crop_size"], "lr_size": synth["crop_size"] // scale}
    train = rows.map_batches(decode_pairs, fn_kwargs={"keep": set(train_sources), **crop_sizes},
                             batch_format="numpy")
    if settings.materialize:
        # Decoded once, so its blocks are reordered instead (no decode to wait for).
        block_order_seed = derive_seed(settings.split_seed, "block-order") if settings.deterministic else None
        train = train.materialize().randomize_block_order(seed=block_order_seed)
    return TrainingData(dataset, train, train_sources, val_sources,
                        train_rows, crop_sizes, settings,
                        storage.locate(settings.val_photos, storage_settings) if settings.val_photos else None)


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


def validation_batches(pairs: list[dict[str, np.ndarray]],
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``TrainingData.validation_pairs`` as ``(lr, hr)`` float batches on ``device``."""
    import torch

    # torch.tensor copies: the arrays come read-only from the object store.
    return [to_images({name: torch.tensor(images) for name, images in batch.items()}, device) for batch in pairs]


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
