"""Eval sets: the three layouts that ``upsr evaluate`` and ``upsr promote`` read, told apart automatically.

1. ``dataset``: a synthesised dataset (folder or ``s3://`` prefix with ``_manifest.json``);
   each row's ``id``, ``lr_png`` and ``hr_png``.
2. ``pairs``: a folder with ``lr/`` and ``hr/`` subfolders; an LR and an HR image pair up when
   their paths relative to ``lr/`` and ``hr/`` agree without the extension
   (``lr/city/a.png`` with ``hr/city/a.jpg``). A file without a partner is an error.
3. ``lr-only``: a folder of LR images (or one with ``lr/`` and no ``hr/``): no reference, so
   only no-reference metrics can be computed.

An image's id is the dataset's ``id`` or its relative path without extension (``city/a``).

The content hash identifies *what* is evaluated, not where it lies: SHA-256 over the lines
``id, sha256(LR bytes), sha256(HR bytes)`` sorted by id. A dataset's images copied byte for
byte into a folder of pairs named by id hash the same; re-encoding any image changes it.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UserError
from pipelines.config import IMAGE_EXTENSIONS, StorageConfig
from pipelines.dataset import MANIFEST, IncompleteDataset, open_dataset
from pipelines.entry import progress_bar

log = logging.getLogger(__name__)

DATASET = "dataset"
PAIRS = "pairs"
LR_ONLY = "lr-only"
LR_FOLDER = "lr"
HR_FOLDER = "hr"
# How many offending names an error message lists before it only counts them.
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class EvalImage:
    """One image of a folder layout: its id and the paths (inside the eval set's filesystem)."""

    id: str
    lr_path: str
    hr_path: str | None


@dataclass(frozen=True)
class EvalSet:
    uri: str
    layout: str
    location: storage.Location
    ids: tuple[str, ...]
    # Folder layouts: one entry per id, in id order. Empty for a dataset.
    images: tuple[EvalImage, ...] = ()
    # Dataset layout: the shards its manifest lists.
    shard_paths: tuple[str, ...] = ()

    @property
    def has_reference(self) -> bool:
        return self.layout != LR_ONLY

    def read(self) -> Iterator[tuple[str, bytes, bytes | None]]:
        """(id, LR bytes, HR bytes or None) for every image, on this process."""
        if self.layout == DATASET:
            for path in self.shard_paths:
                with self.location.fs.open_input_file(path) as handle:
                    for batch in pq.ParquetFile(handle).iter_batches(columns=["id", "lr_png", "hr_png"], batch_size=64):
                        yield from zip(*(batch.column(name).to_pylist() for name in ("id", "lr_png", "hr_png")))
            return
        for image in self.images:
            hr = storage.read_bytes(self.location, image.hr_path) if image.hr_path else None
            yield image.id, storage.read_bytes(self.location, image.lr_path), hr

    def content_hash(self) -> str:
        """The content hash (module docstring), reading every image once on this process."""
        images = progress_bar(len(self.ids), "hash eval set", "image", self.read())
        digests = [(image_id, sha256(lr), sha256(hr) if hr is not None else None) for image_id, lr, hr in images]
        return content_hash(digests)

    def ray_dataset(self):
        """A Ray dataset with one row per image: ``id`` and either the ``lr_png``/``hr_png`` bytes
        (dataset layout) or the ``lr_path``/``hr_path`` to read (folder layouts)."""
        import ray

        if self.layout == DATASET:
            return ray.data.read_parquet(list(self.shard_paths), filesystem=self.location.fs).select_columns(
                ["id", "lr_png", "hr_png"])
        return ray.data.from_items([{"id": image.id, "lr_path": image.lr_path, "hr_path": image.hr_path}
                                    for image in self.images])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(digests: Iterable[tuple[str, str, str | None]]) -> str:
    """SHA-256 over ``id, LR sha256, HR sha256`` lines sorted by id (``-`` for a missing HR)."""
    digest = hashlib.sha256()
    for image_id, lr_sha, hr_sha in sorted(digests):
        digest.update(f"{image_id}\t{lr_sha}\t{hr_sha or '-'}\n".encode())
    return digest.hexdigest()


def open_eval_set(uri: str, settings: StorageConfig = StorageConfig()) -> EvalSet:
    """List the eval set at ``uri`` and tell its layout; UserError when it is none of the three."""
    location = storage.locate(uri, settings)
    if storage.exists(location, MANIFEST):
        return _open_dataset(uri, location, settings)
    files = storage.list_files(location)
    if not files:
        raise UserError(f"eval set {uri}: no such folder, or it holds no files")
    images = [info.path for info in files if info.path.lower().endswith(IMAGE_EXTENSIONS)]
    lr = _by_id(location, location.join(LR_FOLDER), images)
    hr = _by_id(location, location.join(HR_FOLDER), images)
    if lr and hr:
        unmatched = sorted(set(lr) ^ set(hr))
        if unmatched:
            described = ", ".join(f"{LR_FOLDER if name in lr else HR_FOLDER}/{name}"
                                  for name in unmatched[:_NAMES_SHOWN])
            raise UserError(f"eval set {uri}: {len(unmatched)} image(s) without a partner in the other of "
                            f"{LR_FOLDER}/ and {HR_FOLDER}/ (matched by path without extension): {described}"
                            + (" ..." if len(unmatched) > _NAMES_SHOWN else ""))
        _warn_ignored(uri, images, len(lr) + len(hr))
        return _folder_set(uri, PAIRS, location, {name: (lr[name], hr[name]) for name in lr})
    if hr:
        raise UserError(f"eval set {uri}: an {HR_FOLDER}/ folder without an {LR_FOLDER}/ folder; put the LR inputs "
                        f"in {LR_FOLDER}/ (matched to {HR_FOLDER}/ by path without extension)")
    if lr:
        _warn_ignored(uri, images, len(lr))
        return _folder_set(uri, LR_ONLY, location, {name: (path, None) for name, path in lr.items()})
    if images:
        return _folder_set(uri, LR_ONLY, location,
                           {name: (path, None) for name, path in _by_id(location, location.path, images).items()})
    if any(info.path.endswith(".parquet") for info in files):
        raise UserError(f"eval set {uri} holds Parquet files but no {MANIFEST}: not a finished synthesised dataset "
                        "(still being written, or its synthesis failed); re-run `upsr synth`")
    raise UserError(f"eval set {uri} is none of: a synthesised dataset (with {MANIFEST}), a folder with {LR_FOLDER}/ "
                    f"and {HR_FOLDER}/ subfolders of images, a folder of LR images ({', '.join(IMAGE_EXTENSIONS)})")


def _open_dataset(uri: str, location: storage.Location, settings: StorageConfig) -> EvalSet:
    try:
        dataset = open_dataset(uri, settings.s3_endpoint, settings.s3_region)
    except IncompleteDataset as error:
        raise UserError(f"eval set {uri}: {error}") from None
    paths = tuple(dataset.shard_paths)
    ids = [] if not paths else pq.read_table(list(paths), columns=["id"], filesystem=location.fs)["id"].to_pylist()
    _refuse_duplicates(uri, ids)
    return EvalSet(uri, DATASET, location, tuple(sorted(ids)), shard_paths=paths)


def _by_id(location: storage.Location, folder: str, images: list[str]) -> dict[str, str]:
    """Images under ``folder`` keyed by their path relative to it without extension."""
    prefix = folder.rstrip("/") + "/"
    found = [path for path in images if path.startswith(prefix)]
    names = [posixpath.splitext(posixpath.relpath(path, folder))[0] for path in found]
    _refuse_duplicates(location.uri, names, hint="files that differ only in their extension")
    return dict(zip(names, found))


def _refuse_duplicates(uri: str, ids: list[str], hint: str = "ids must be unique") -> None:
    duplicates = sorted(image_id for image_id, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise UserError(f"eval set {uri}: {len(duplicates)} duplicate image id(s) ({hint}): "
                        + ", ".join(duplicates[:_NAMES_SHOWN]))


def _warn_ignored(uri: str, images: list[str], used: int) -> None:
    if len(images) > used:
        log.warning("eval set %s: %d image file(s) outside %s/ and %s/ are ignored", uri, len(images) - used,
                    LR_FOLDER, HR_FOLDER)


def _folder_set(uri: str, layout: str, location: storage.Location,
                pairs: dict[str, tuple[str, str | None]]) -> EvalSet:
    ids = tuple(sorted(pairs))
    images = tuple(EvalImage(image_id, *pairs[image_id]) for image_id in ids)
    return EvalSet(uri, layout, location, ids, images=images)
