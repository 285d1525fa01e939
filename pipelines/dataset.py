"""The synthesised dataset's on-disk contract, and opening one for reading.

``DST/_synth.json`` (written first: the folder is ours from then on), ``DST/_config.yaml``,
``DST/part-NNNNN-NNN.parquet`` shards with ``SHARD_SCHEMA``, ``DST/_quarantine.parquet``
(source, reason) and ``DST/_manifest.json``, written last. Readers refuse a folder without a
manifest and read exactly the shards it lists, each a plain file name inside the folder, so a
half-written dataset is never mistaken for a finished one and a manifest cannot point
elsewhere. ``synth --overwrite`` deletes only files of this contract (``owned_files``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

SCHEMA_VERSION = 1
MARKER = "_synth.json"
CONFIG_FILE = "_config.yaml"
MANIFEST = "_manifest.json"
QUARANTINE = "_quarantine.parquet"
SHARD_NAME = re.compile(r"part-\d{5}-\d{3}\.parquet")
# storage.write_bytes' temporary names, left behind by an interrupted write.
_TEMPORARY = re.compile(r"(_synth\.json|_config\.yaml|_manifest\.json|_quarantine\.parquet)\.tmp-[0-9a-f]{32}")
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
    """The finished dataset at ``uri``: its manifest checked, and every shard it lists present and readable."""
    location = storage.resolve(uri, endpoint, region)
    where = location.child_uri(MANIFEST)
    if not storage.exists(location, MANIFEST):
        raise IncompleteDataset(f"{uri} has no {MANIFEST}: not a finished dataset (still being written, or its "
                                "synthesis failed); re-run `upsr synth`")
    try:
        manifest = json.loads(storage.read_bytes(location, location.join(MANIFEST)))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IncompleteDataset(f"{where} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise IncompleteDataset(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise IncompleteDataset(f"{where}: schema_version {manifest.get('schema_version')!r}, "
                                f"this code reads version {SCHEMA_VERSION}")
    for key, kind in (("shards", list), ("counts", dict), ("config", dict)):
        if not isinstance(manifest.get(key), kind):
            raise IncompleteDataset(f"{where}: key {key!r} is missing or not a {kind.__name__}")
    for shard in manifest["shards"]:
        check_shard_entry(shard, location, where)
    return SynthDataset(location, manifest)


def check_shard_entry(shard: Any, location: storage.Location, where: str) -> None:
    """A shard entry names a file of ours inside the dataset folder, present, with the rows it claims."""
    if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or not isinstance(shard.get("rows"), int):
        raise IncompleteDataset(f"{where}: shard entry {shard!r} is not {{\"file\": name, \"rows\": count}}")
    name = shard["file"]
    if posixpath.basename(name) != name or not SHARD_NAME.fullmatch(name):
        raise IncompleteDataset(f"{where}: shard {name!r} is not a shard file name inside the dataset "
                                "(part-NNNNN-NNN.parquet); refusing to read outside the folder")
    if not storage.exists(location, name):
        raise IncompleteDataset(f"{where} lists {name}, which is missing from {location.uri}")
    try:
        rows = pq.read_metadata(location.join(name), filesystem=location.fs).num_rows
    except (OSError, pa.ArrowException) as error:
        raise IncompleteDataset(f"{location.child_uri(name)} is not a readable Parquet file: {error}") from None
    if rows != shard["rows"]:
        raise IncompleteDataset(f"{location.child_uri(name)} holds {rows} rows, {where} says {shard['rows']}")


def owned_files(location: storage.Location) -> tuple[list[str], list[str]]:
    """(files of the dataset contract, other files) under a folder, as paths relative to it.

    The folder counts as a dataset only if it holds the marker or the manifest; then its
    contract files are ours to delete. Everything else is someone else's.
    """
    names = [storage.relative(location, info.path) for info in storage.list_files(location)]
    if MARKER not in names and MANIFEST not in names:
        return [], names
    ours = {MARKER, CONFIG_FILE, MANIFEST, QUARANTINE}
    mine = [n for n in names if n in ours or SHARD_NAME.fullmatch(n) or _TEMPORARY.fullmatch(n)]
    return mine, [n for n in names if n not in mine]
