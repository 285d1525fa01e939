"""Synthesise LR/HR training pairs from HR photographs into sharded Parquet (Ray Data).

Pipeline: list files -> read bytes and decode to 8-bit RGB -> random HR crops -> degrade in an
actor pool (CPU or GPU actors) -> PNG-encode -> Parquet shards, quarantine table, manifest.

Every crop's degradation is drawn from a seed derived from the config seed and the crop id,
so the same inputs and config give the same rows however many workers run and in whatever
order files are listed. The manifest is written last: a dataset without one is incomplete.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, Datasink

from degradations import DegradationConfig, sample
from pipelines import config as config_module
from pipelines import storage
from pipelines.entry import run_job
from pipelines.errors import UserError
from pipelines.config import Config
from pipelines.dataset import CONFIG_FILE, MANIFEST, MARKER, QUARANTINE, SCHEMA_VERSION, SHARD_SCHEMA, owned_files
from pipelines.images import RejectedImage, decode_rgb, derive_seed, encode_png, random_crops
from pipelines.ray_env import init_ray, require_shared
from upsr.config_loader import from_dict, to_dict

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="folder or s3:// prefix of HR images (default: the sample photographs "
                                        "that scikit-image ships, exported to runs/sample_photos on the "
                                        "submitting node: on a multi-node cluster give --input)")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for the dataset")
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", metavar="FILE",
                        help="YAML config file (e.g. configs/tiny.yaml); several merge in order")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set degradation.jpeg_range=[40,90]")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (credentials taken out) and exit")
    parser.add_argument("--allow-local", action="append_const", dest="set", const="ray.allow_local=true",
                        help="on a Ray cluster, accept local paths for outputs, checkpoints and MLflow (every "
                             "node must mount them); same as --set ray.allow_local=true")


def run(args: argparse.Namespace) -> int:
    config = config_module.load(args.config, args.set)
    source = args.input or str(export_sample_photos(sample_photos_folder(config.synth.sample_collections),
                                                    config.synth.sample_collections))
    manifest = synthesize(source, args.output, config, overwrite=args.overwrite)
    counts = manifest["counts"]
    log.info("wrote %d rows from %d of %d files (%d quarantined) to %s", counts["rows"], counts["files_processed"],
             counts["files_seen"], counts["files_quarantined"], args.output)
    return 0


def sample_photos(collections: tuple[str, ...] = ("scikit-image",)) -> dict[str, Any]:
    """Photographs that installed packages ship in their wheels (no download), by file stem:
    scikit-image's nine colour photographs, scikit-learn's two and matplotlib's one."""
    photos: dict[str, Any] = {}
    if "scikit-image" in collections:
        import skimage.data

        photos |= {
            "astronaut": skimage.data.astronaut, "chelsea": skimage.data.chelsea, "coffee": skimage.data.coffee,
            "hubble_deep_field": skimage.data.hubble_deep_field,
            "immunohistochemistry": skimage.data.immunohistochemistry,
            "motorcycle_left": lambda: skimage.data.stereo_motorcycle()[0],
            "motorcycle_right": lambda: skimage.data.stereo_motorcycle()[1],
            "retina": skimage.data.retina, "rocket": skimage.data.rocket,
        }
    if "scikit-learn" in collections:
        import sklearn.datasets

        def sklearn_photo(name: str):
            return lambda: sklearn.datasets.load_sample_image(name)

        photos |= {"sklearn_china": sklearn_photo("china.jpg"), "sklearn_flower": sklearn_photo("flower.jpg")}
    if "matplotlib" in collections:
        def grace_hopper():
            import matplotlib.cbook
            import matplotlib.image

            with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
                return matplotlib.image.imread(file, format="jpg")

        photos |= {"matplotlib_grace_hopper": grace_hopper}
    return photos


def sample_photos_folder(collections: tuple[str, ...]) -> Path:
    """Where ``upsr synth`` exports the sample photographs when no --input is given: one folder per
    choice of collections, so that a folder never mixes two choices."""
    if tuple(collections) == ("scikit-image",):
        return Path("runs/sample_photos")
    return Path("runs/sample_photos_" + "_".join(collections))


def export_sample_photos(folder: Path, collections: tuple[str, ...] = ("scikit-image",)) -> Path:
    """Write the sample photographs as PNG files (once) and return the folder."""
    location = storage.resolve(str(folder))
    for name, load in sample_photos(collections).items():
        if not storage.exists(location, f"{name}.png"):
            storage.write_bytes(location, f"{name}.png", encode_png(load(), 3))
    return folder


def synthesize(source_uri: str, output_uri: str, config: Config, overwrite: bool = False) -> dict[str, Any]:
    """Run the synthesis job; returns the manifest it wrote."""
    source = storage.locate(source_uri, config.storage)
    output = storage.locate(output_uri, config.storage)
    init_ray(config.ray)
    require_shared(config.ray, {"--output": output.uri})
    prepare_output(source, output, overwrite)

    extensions = tuple(e.lower() for e in config.synth.extensions)
    listing = [info for info in storage.list_files(source) if info.path.lower().endswith(extensions)]
    if not listing:
        raise UserError(f"no image files ({', '.join(extensions)}) under {source_uri}")
    files = [{"path": info.path, "source": storage.relative(source, info.path)} for info in listing]
    log.info("found %d image files under %s", len(files), source_uri)

    storage.write_bytes(output, MARKER, json.dumps({
        "writer": "upsr synth", "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": storage.redact_uri(source_uri)}).encode())
    storage.write_bytes(output, CONFIG_FILE, config_module.to_yaml(config).encode())
    synth = config.synth
    sink = SynthDatasink(output, config, files_seen=len(files))
    listed = ray.data.from_items(files, override_num_blocks=min(len(files), 200))
    # Shards in listing order: the same input and config write the same files row for row, so a
    # deterministic training config (train_data.deterministic) reads the same batches after a re-run.
    listed.context.execution_options.preserve_order = True
    (
        listed
        # One file per call: Ray Data bundles input rows up to the batch size before it picks an
        # actor, so a batch of several files would hand most of a small job to one actor.
        .map_batches(SynthesizeFiles, fn_constructor_kwargs={"source": source, "settings": to_dict(synth),
                                                              "degradation": to_dict(config.degradation)},
                     batch_size=1, batch_format="pyarrow",
                     compute=ActorPoolStrategy(size=actor_pool_size(synth)),
                     num_cpus=synth.actor_cpus, num_gpus=synth.actor_gpus)
        # Writing only moves encoded bytes: it takes no CPU slot from the actors.
        .write_datasink(sink, ray_remote_args={"num_cpus": 0})
    )
    if sink.manifest is None:
        raise UserError(f"none of the {len(files)} image files under {source_uri} could be processed; "
                        f"reasons are in {output.child_uri(QUARANTINE)}")
    return sink.manifest


def prepare_output(source: storage.Location, output: storage.Location, overwrite: bool) -> None:
    """Refuse an output that overlaps the input or holds anything but a dataset of ours; with
    ``overwrite``, delete that dataset's files (the manifest first), and nothing else."""
    if storage.overlaps(source, output):
        raise UserError(f"--output {output.uri} and --input {source.uri} overlap (one is, or contains, the other): "
                        "the output must be a folder of its own")
    if storage.exists(output) and output.fs.get_file_info(output.path).type != pafs.FileType.Directory:
        raise UserError(f"--output {output.uri} is a file, not a folder")
    ours, foreign = owned_files(output)
    if foreign:
        raise UserError(f"--output {output.uri} holds files that upsr synth did not write (e.g. {foreign[0]}); "
                        "choose an empty or new folder" + (" (--overwrite replaces only a dataset of ours)"
                                                          if overwrite else ""))
    if not ours:
        return
    finished = MANIFEST in ours
    if not overwrite:
        raise UserError(f"--output {output.uri} holds {'a dataset' if finished else 'an unfinished dataset'} "
                        "written by upsr synth; pass --overwrite to replace it")
    log.info("removing the existing dataset at %s (--overwrite): %d files", output.uri, len(ours))
    storage.delete_files(output, sorted(ours, key=lambda name: name != MANIFEST))


def actor_pool_size(synth: config_module.SynthConfig) -> int:
    """``synth.max_actors``, or as many actors as the cluster's CPUs (or GPUs) hold now.

    A fixed pool: Ray Data's autoscaling pool measured here stayed at one actor for small jobs.
    """
    if synth.max_actors:
        return synth.max_actors
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // synth.actor_cpus) if synth.actor_cpus else 1
    if synth.actor_gpus:
        fits = min(fits, int(resources.get("GPU", 0) // synth.actor_gpus))
    if fits < 1:
        raise UserError(f"the Ray cluster has no room for one degradation actor ({synth.actor_cpus} CPU, "
                        f"{synth.actor_gpus} GPU): {resources}")
    return fits


# Columns passed between stages: a crop's pixels travel as raw bytes (shape from crop_size) and
# a rejected file travels as a row with a reason, so every stage sees one flat schema.
STAGE_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("x", pa.int32()), ("y", pa.int32()),
    ("size", pa.int32()), ("seed", pa.int64()), ("hr_raw", pa.binary()), ("reason", pa.string()),
])


def load_crops(batch: pa.Table, source: storage.Location, synth: config_module.SynthConfig) -> pa.Table:
    """Read, decode and crop files; unusable files become rows that only carry a reason."""
    rows: list[dict[str, Any]] = []
    for path, name in zip(batch["path"].to_pylist(), batch["source"].to_pylist()):
        try:
            image = decode_rgb(storage.read_bytes(source, path), synth.max_pixels, synth.min_side)
        except RejectedImage as rejection:
            rows.append({"id": None, "source": name, "x": 0, "y": 0, "size": 0, "seed": 0, "hr_raw": b"",
                         "reason": str(rejection)})
            continue
        except OSError as error:
            if isinstance(error, FileNotFoundError) and not storage.exists(source):
                # Listed by the driver, absent here: not a bad file but a folder this node cannot see.
                raise UserError(f"{source.uri} does not exist on the Ray node {socket.gethostname()}: a local "
                                "--input must be on storage that every node mounts; use s3:// or a shared "
                                "filesystem") from None
            rows.append({"id": None, "source": name, "x": 0, "y": 0, "size": 0, "seed": 0, "hr_raw": b"",
                         "reason": f"unreadable: {error}"})
            continue
        crops = random_crops(image, synth.crops_per_image, synth.crop_size, derive_seed(synth.seed, "crops", name))
        for index, (x, y, crop) in enumerate(crops):
            crop_id = f"{name}#{index}"
            rows.append({"id": crop_id, "source": name, "x": x, "y": y, "size": synth.crop_size,
                         "seed": derive_seed(synth.seed, crop_id), "hr_raw": crop.tobytes(), "reason": None})
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


class SynthesizeFiles:
    """Actor: reads, decodes and crops files, degrades the crops in batches of ``synth.batch_size``
    and PNG-encodes both images of each pair.

    Holds one ``Degrader`` (and DiffJPEG's tables on the GPU) for its lifetime. Doing all
    per-file and per-crop work here keeps it in the pool, in parallel; the write stage that
    follows only moves bytes.
    """

    def __init__(self, source: storage.Location, settings: dict[str, Any], degradation: dict[str, Any]):
        import cv2

        # Imported here, not at the top: the write tasks unpickle this module and need no torch.
        from degradations import Degrader

        cv2.setNumThreads(1)  # one CPU per actor: parallelism comes from the pool
        self.source = source
        self.synth = from_dict(config_module.SynthConfig, settings)
        self.config = from_dict(DegradationConfig, degradation)
        self.degrader = Degrader(self.config.primitives, self.config.device)

    def __call__(self, files: pa.Table) -> pa.Table:
        crops = load_crops(files, self.source, self.synth)
        size = self.synth.batch_size
        return pa.concat_tables([self.degrade(crops.slice(start, size))
                                 for start in range(0, max(crops.num_rows, 1), size)])

    def degrade(self, batch: pa.Table) -> pa.Table:
        good = [i for i, reason in enumerate(batch["reason"].to_pylist()) if reason is None]
        hr_png: list[bytes] = [b""] * batch.num_rows
        lr_png: list[bytes] = [b""] * batch.num_rows
        records: list[str | None] = [None] * batch.num_rows
        if good:
            sizes = batch["size"].to_pylist()
            hr_raw = batch["hr_raw"].to_pylist()
            seeds = batch["seed"].to_pylist()
            hr = np.stack([np.frombuffer(hr_raw[i], np.uint8).reshape(sizes[i], sizes[i], 3) for i in good])
            drawn = [sample(seeds[i], self.config) for i in good]
            lr = self.degrader.apply(hr, drawn)
            for k, i in enumerate(good):
                hr_png[i] = encode_png(hr[k], self.synth.png_compression)
                lr_png[i] = encode_png(lr[k], self.synth.png_compression)
                records[i] = json.dumps(drawn[k], sort_keys=True)
        return (batch.drop_columns(["hr_raw"])
                .append_column("degradation", pa.array(records, pa.string()))
                .append_column("hr_png", pa.array(hr_png, pa.binary()))
                .append_column("lr_png", pa.array(lr_png, pa.binary())))


class SynthDatasink(Datasink):
    """Writes good rows to Parquet shards; returns rejected files to the driver for the quarantine.

    ``on_write_complete`` runs on the driver after every shard is written and writes the
    quarantine table and, last, the manifest (kept in ``self.manifest``; None when no file
    could be processed).
    """

    def __init__(self, output: storage.Location, config: Config, files_seen: int):
        self.output = output
        self.config = config
        self.files_seen = files_seen
        self.manifest: dict[str, Any] | None = None

    @property
    def min_rows_per_write(self) -> int:
        return self.config.synth.rows_per_file

    def write(self, blocks, ctx) -> dict[str, Any]:
        table = pa.concat_tables([block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
                                  for block in blocks])
        reasons = table["reason"]
        rejected = table.filter(reasons.is_valid()).select(["source", "reason"])
        good = table.filter(reasons.is_null())
        good = good.sort_by("id")
        shards = []
        per_file = self.config.synth.rows_per_file
        for part, start in enumerate(range(0, good.num_rows, per_file)):
            name = f"part-{ctx.task_idx:05d}-{part:03d}.parquet"
            rows = to_shard(good.slice(start, per_file))
            path = self.output.join(name)
            pq.write_table(rows, path, filesystem=self.output.fs, row_group_size=self.config.synth.row_group_rows,
                           compression={name: ("NONE" if name.endswith("_png") else "ZSTD")
                                        for name in rows.column_names})
            shards.append({"file": name, "rows": rows.num_rows})
        return {"shards": shards, "rejected": rejected.to_pylist(), "sources": sorted(set(good["source"].to_pylist()))}

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        shards = sorted((s for r in returns for s in r["shards"]), key=lambda s: s["file"])
        rejected = sorted((q for r in returns for q in r["rejected"]), key=lambda q: q["source"])
        processed = {source for r in returns for source in r["sources"]}
        if len(processed) + len(rejected) != self.files_seen:
            raise RuntimeError(f"{self.files_seen} files listed but {len(processed)} processed and "
                               f"{len(rejected)} quarantined: refusing to write a manifest")
        quarantine = pa.Table.from_pylist(rejected, schema=pa.schema([("source", pa.string()), ("reason", pa.string())]))
        sink = pa.BufferOutputStream()
        pq.write_table(quarantine, sink)
        storage.write_bytes(self.output, QUARANTINE, sink.getvalue().to_pybytes())
        if not processed:
            return  # no manifest: an empty dataset is a failed synthesis, not a finished one
        self.manifest = {
            "schema_version": SCHEMA_VERSION,
            "package_version": metadata.version("upsr-ray"),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config_module.public_dict(self.config),
            "counts": {
                "files_seen": self.files_seen,
                "files_processed": len(processed),
                "files_quarantined": len(rejected),
                "rows": sum(s["rows"] for s in shards),
            },
            "shards": shards,
            "columns": SHARD_SCHEMA.names,
        }
        storage.write_bytes(self.output, MANIFEST, json.dumps(self.manifest, indent=2).encode())


def to_shard(table: pa.Table) -> pa.Table:
    crop = pa.StructArray.from_arrays(
        [table["x"].combine_chunks(), table["y"].combine_chunks(), table["size"].combine_chunks(),
         table["size"].combine_chunks()], names=["x", "y", "w", "h"])
    columns = {"id": table["id"], "source": table["source"], "crop": crop, "seed": table["seed"],
               "degradation": table["degradation"], "hr_png": table["hr_png"], "lr_png": table["lr_png"]}
    return pa.table(columns, schema=SHARD_SCHEMA)


if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
