"""benchmarks/data_path.py end to end at a tiny size: synthesis, the one-core loop, the Ray Data
ingest on a local Ray of its own (in a subprocess: the session's Ray, if any, is left alone),
and the report's tables."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("data_path_benchmark", REPO / "benchmarks" / "data_path.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_cores_per_gpu_model():
    benchmark = load_benchmark()
    # 0.95 X / r: a GPU at 400 samples/s, loaders at 200 samples/s per core.
    assert benchmark.cores_per_gpu(400, 200, 0.05) == pytest.approx(1.9)
    # With an epoch barrier the GPU idles for the whole decode: X / (X + n r) <= 5 % needs 19x the cores.
    assert benchmark.cores_per_gpu(400, 200, 0.05, barrier=True) == pytest.approx(38.0)


@pytest.mark.slow
def test_data_path_benchmark_tiny(capsys):
    benchmark = load_benchmark()
    text = benchmark.main(["--rows", "36", "--crop", "64", "--batch-size", "4", "--ray-cpus", "1", "--epochs", "1",
                           "--warmup-epochs", "0", "--passes", "1", "--gpu-samples-per-s", "300"])
    printed = capsys.readouterr().out
    assert text and text in printed
    assert "HR 64x64 / LR 16x16" in text
    assert "36 rows" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| (1) one process on one core") for line in rows)
    assert any(line.startswith("| (2) Ray Data ingest, local Ray of 1 CPU") for line in rows)
    sizing = [line for line in rows if line.startswith("| 300 ")]
    assert len(sizing) == 2, sizing  # one row per model: streaming and epoch barrier
