"""benchmarks/gpu_check.py in its CPU mode: every part runs for real at tiny sizes (the training
step eager and compiled, the sampler, synth, a short training run through Ray Train and MLflow,
and an evaluation), so that the script a GPU machine runs once cannot rot without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = ["train_step", "sampler", "synth", "train", "evaluate"]


@pytest.mark.slow
def test_the_cpu_mode_runs_every_part_and_writes_its_tables(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(out), "--device", "cpu",
                                "--tiny"], capture_output=True, text=True, timeout=900,
                               env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-5000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["tiny"] is True and list(results["parts"]) == PARTS
    for part, outcome in results["parts"].items():
        assert "error" not in outcome and outcome["rows"], part
    steps = results["parts"]["train_step"]["rows"]
    assert [row["compile"] for row in steps] == ["off", "aot_eager"]
    assert all(row["samples_per_s"] > 0 and row["gflop_per_sample"] > 0 for row in steps)
    [trained] = results["parts"]["train"]["rows"]
    assert trained["loss_last_fifth"] < trained["loss_first_fifth"] and trained["checkpoint_reloads"]
    assert results["parts"]["evaluate"]["rows"][0]["images_per_s"] > 0
    # The GPU actors' row says why it has no figure instead of leaving it out.
    assert results["parts"]["synth"]["rows"][-1]["note"] == "not measured: --device cpu"
    table = (out / "gpu_check.md").read_text()
    assert all(f"## {part}" in table for part in PARTS) and "FAILED" not in table
    assert table in completed.stdout


@pytest.mark.parametrize("arguments, message", [
    (["--device", "cpu", "--tiny", "--parts", "nonsense"], "unknown part(s) ['nonsense']"),
    (["--device", "cuda"], "--device cuda: no CUDA device is visible"),
])
def test_what_cannot_run_is_an_error_not_a_skip(tmp_path, arguments, message):
    if "cuda" in arguments:
        import torch

        if torch.cuda.is_available():
            pytest.fail("this test expects a machine without a GPU, as CI is")
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(tmp_path), *arguments],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and message in completed.stderr
