"""Re-generate sampled rows of a synthesised dataset and check they match (data lineage).

For K rows drawn at random, the LR image is re-made from the stored HR PNG and the stored
degradation record, with the primitives and device named in the dataset's manifest, and
compared pixel by pixel with the stored LR PNG. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from degradations import Degrader
from pipelines.entry import run_job
from pipelines.errors import UserError
from pipelines.dataset import IncompleteDataset, open_dataset
from pipelines.images import decode_png

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="folder or s3:// prefix written by `upsr synth`")
    parser.add_argument("--sample", type=int, default=16, metavar="K", help="rows to check (0: all rows)")
    parser.add_argument("--seed", type=int, default=0, help="which rows are drawn")
    parser.add_argument("--tolerance", type=int, default=0,
                        help="largest per-pixel difference accepted (0: bit-exact, for the same kind of device)")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint (default: AWS environment)")


def run(args: argparse.Namespace) -> int:
    try:
        dataset = open_dataset(args.dataset, args.s3_endpoint)
    except IncompleteDataset as error:
        raise UserError(str(error)) from None
    report = verify(dataset, args.sample, args.seed, args.tolerance)
    for mismatch in report["mismatches"]:
        log.error("mismatch in %s: %d pixels differ, largest difference %d", mismatch["id"],
                  mismatch["pixels"], mismatch["max_difference"])
    log.info("checked %d rows of %s: %d mismatches", report["checked"], args.dataset, len(report["mismatches"]))
    return 1 if report["mismatches"] else 0


def verify(dataset, sample: int, seed: int = 0, tolerance: int = 0) -> dict[str, Any]:
    degradation = dataset.manifest["config"]["degradation"]
    degrader = Degrader(degradation["primitives"], degradation["device"])
    rng = np.random.default_rng(seed)
    total = dataset.manifest["counts"]["rows"]
    wanted = set(range(total)) if sample <= 0 or sample >= total else set(rng.choice(total, sample, replace=False).tolist())
    mismatches, checked, offset = [], 0, 0
    for path in dataset.shard_paths:
        parquet = pq.ParquetFile(dataset.location.fs.open_input_file(path))
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            picks = [i - offset for i in range(offset, offset + rows) if i in wanted]
            offset += rows
            if not picks:
                continue
            table = parquet.read_row_group(group, columns=["id", "degradation", "hr_png", "lr_png"]).take(picks)
            for row in table.to_pylist():
                lr = degrader.apply(decode_png(row["hr_png"])[None], [json.loads(row["degradation"])])[0]
                difference = np.abs(lr.astype(np.int16) - decode_png(row["lr_png"]).astype(np.int16))
                if difference.max() > tolerance:
                    mismatches.append({"id": row["id"], "pixels": int((difference > tolerance).sum()),
                                       "max_difference": int(difference.max())})
                checked += 1
    return {"checked": checked, "mismatches": mismatches}


if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
