"""The synthesised dataset's on-disk contract, and opening one for reading.

``DST/part-*.parquet`` shards with ``SHARD_SCHEMA``, ``DST/_quarantine.parquet`` (source,
reason) and ``DST/_manifest.json``, written last. Readers refuse a folder without a manifest
and read exactly the shards it lists, so a half-written dataset is never mistaken for a
finished one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines import storage

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
QUARANTINE = "_quarantine.parquet"
SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("crop", pa.struct([("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32())])),
    ("seed", pa.int64()),
    ("degradation", pa.string()),
    ("hr_png", pa.binary()),
    ("lr_png", pa.binary()),
])


class IncompleteDataset(Exception):
    """The folder holds no finished dataset (no manifest, or one we cannot read)."""


@dataclass(frozen=True)
class SynthDataset:
    location: storage.Location
    manifest: dict[str, Any]

    @property
    def shard_paths(self) -> list[str]:
        return [self.location.join(shard["file"]) for shard in self.manifest["shards"]]

    @property
    def manifest_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()


def open_dataset(uri: str, endpoint: str | None = None, region: str | None = None) -> SynthDataset:
    location = storage.resolve(uri, endpoint, region)
    if not storage.exists(location, MANIFEST):
        raise IncompleteDataset(f"{uri} has no {MANIFEST}: not a finished dataset (still being written, or its "
                                "synthesis failed); re-run `upsr synth`")
    try:
        manifest = json.loads(storage.read_bytes(location, location.join(MANIFEST)))
    except json.JSONDecodeError as error:
        raise IncompleteDataset(f"{uri}/{MANIFEST} is not valid JSON: {error}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise IncompleteDataset(f"{uri}/{MANIFEST}: schema_version {manifest.get('schema_version')!r}, "
                                f"this code reads version {SCHEMA_VERSION}")
    return SynthDataset(location, manifest)
