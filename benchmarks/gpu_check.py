"""The GPU check: one command that exercises every GPU path and measures it, writing
``gpu_check.json`` and ``gpu_check.md`` to the folder it is given.

Parts (``--parts``, all by default; a part that cannot run here fails, it never skips):

- ``train_step``: the paper-size denoiser's training step (configs/upsr_x4.yaml, its frozen ATD
  aux net, LPIPS term included) as the Ray Train workers run it (pipelines/optimization.py: the
  fused AdamW, TF32, bf16 autocast), at batch 16 and 32, torch.compile off and on: samples/s,
  TFLOP/s from ``torch.utils.flop_counter`` (the aux net's and LPIPS's forward passes included),
  MFU against ``--peak-tflops`` (989: the H100/H200's dense bf16), peak memory, and the first
  step's time (compilation included).
- ``sampler``: the 5-step sampler at 64->256 (batch 1 and 16) and the tiled 256->1024 upscale,
  ms per image (benchmarks/sample.py's measurement).
- ``synth``: ``upsr synth`` of the sample photographs with degradation on GPU actors against CPU
  actors on the same machine: crops/s.
- ``train``: a 200-step training run of the tiny config through ``upsr train`` (Ray Train, bf16 on
  the GPU, MLflow): the loss must fall and the exported checkpoint must reload and upscale.
- ``evaluate``: ``upsr evaluate`` of that checkpoint on 64 synthesised crops (4 with ``--tiny``),
  on a GPU actor: images/s.

The last three need Ray and MLflow; ``train_step`` and ``sampler`` need only PyTorch and the
project's ``upsr`` package. Weights are random (no downloads): speed does not depend on them.

    python benchmarks/gpu_check.py OUT                          # one GPU; under 8 minutes on an H200
    python benchmarks/gpu_check.py OUT --device cpu --tiny      # every part, tiny sizes (CI runs this)
    python benchmarks/gpu_check.py OUT --parts train_step,sampler

``--tiny`` uses the tiny config's sizes everywhere (a one-level denoiser for the compiled step,
whose CPU compilation would otherwise take minutes) and fewer steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PARTS = ("train_step", "sampler", "synth", "train", "evaluate")
log = logging.getLogger("benchmarks.gpu_check")


@dataclass
class Check:
    device: torch.device
    tiny: bool
    workdir: Path
    peak_tflops: float

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()):
    from pipelines import config as config_module

    return config_module.load(REPO / "configs" / name, list(overrides))


# The tiny check's step: one level and one res-block, compiled by dynamo and AOT autograd without
# inductor's code generation (minutes of C++ compilation on 2 CPU cores; tests/test_optimization.py
# runs inductor once). What it proves on a CPU: the denoiser's forward and backward trace into graphs.
TINY_STEP = ("denoiser.channel_mult=[1]", "denoiser.num_res_blocks=1")
COMPILE_BACKEND_TINY = "aot_eager"


def train_step(check: Check) -> list[dict[str, Any]]:
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.optimization import (autocast_context, backward_over_micro_batches, build_optimizer,
                                        configure_matmul, maybe_compile, resolve_precision)
    from upsr.aux_net import build_aux_net, freeze
    from upsr.denoiser import build_denoiser, count_parameters
    from upsr.diffusion import UNWDiffusion
    from upsr.losses import DiffusionLoss
    from upsr.objective import UPSRObjective

    # LPIPS's backbone is random here: its cost is the same as the pretrained one's.
    config = (load_config("tiny.yaml", TINY_STEP) if check.tiny
              else load_config("upsr_x4.yaml", ["loss.allow_random_backbone=true"]))
    batches, hr_side = ((2,), 64) if check.tiny else ((16, 32), 256)
    timed_steps, warmup = (2, 1) if check.tiny else (10, 3)
    device = check.device
    configure_matmul(device)
    precision = resolve_precision(config.train.precision, device)
    autocast = autocast_context(precision, device)
    torch.manual_seed(0)
    denoiser = build_denoiser(config.denoiser).to(device)
    aux = freeze(build_aux_net(config.aux)).to(device)
    objective = UPSRObjective(aux, UNWDiffusion.from_config(config.diffusion), config.weight,
                              DiffusionLoss(config.loss).to(device), config.denoiser.use_sr_condition,
                              config.denoiser.scale)
    optimizer = build_optimizer(denoiser.parameters(), config.train.lr, config.train.weight_decay, device)
    generator = torch.Generator(device).manual_seed(0)
    scale = config.denoiser.scale
    backend = COMPILE_BACKEND_TINY if check.tiny else "inductor"
    flops_per_sample: dict[int, float] = {}
    rows = []
    for compiled in (False, True):
        net = maybe_compile(denoiser, compiled, backend)

        def loss_terms(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            with autocast:
                return objective(net, *batch, generator)

        for batch in batches:
            hr = torch.rand(batch, 3, hr_side, hr_side, device=device)  # images in [0, 1]
            lr = torch.nn.functional.interpolate(hr, scale_factor=1 / scale, mode="area")

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                result = backward_over_micro_batches(net, [(lr, hr)], loss_terms, lambda loss: loss,
                                                     lambda values: values)
                if not result.finite:
                    raise RuntimeError(f"non-finite loss at batch {batch} (compile {compiled})")
                optimizer.step()

            check.reset_peak_memory()
            started = time.perf_counter()
            step()  # compiles, when compiled
            check.synchronize()
            first_step_s = time.perf_counter() - started
            if batch not in flops_per_sample:
                with FlopCounterMode(display=False) as counter:
                    step()
                flops_per_sample[batch] = counter.get_total_flops() / batch
            for _ in range(warmup):
                step()
            times = []
            for _ in range(timed_steps):
                check.synchronize()
                started = time.perf_counter()
                step()
                check.synchronize()
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times)
            tflops = flops_per_sample[batch] * batch / seconds / 1e12
            rows.append({"config": "tiny (one level)" if check.tiny else "paper (upsr_x4.yaml)",
                         "denoiser_params_m": count_parameters(denoiser) / 1e6, "aux": config.aux.arch,
                         "precision": precision, "compile": backend if compiled else "off", "batch": batch,
                         "hr_side": hr_side,
                         "ms_per_step": 1000 * seconds, "samples_per_s": batch / seconds, "tflops": tflops,
                         "mfu": tflops / check.peak_tflops if check.cuda else None,
                         "gflop_per_sample": flops_per_sample[batch] / 1e9,
                         "first_step_s": first_step_s, "peak_memory_gib": check.peak_memory_gib()})
            log.info("train_step: %s", rows[-1])
    return rows


def sampler(check: Check) -> list[dict[str, Any]]:
    from sample import Case, run_case

    if check.tiny:
        tiny = load_config("tiny.yaml")
        untiled = replace(tiny, inference=replace(tiny.inference, tile=512, stride=448))
        tiled = replace(tiny, inference=replace(tiny.inference, tile=32, stride=16))  # 2 x 2 tiles
        cases = [Case("tiny 16->64 DDIM-5", untiled, 16, 1), Case("tiny 16->64 DDIM-5", untiled, 16, 2),
                 Case("tiny 48->192 tiled", tiled, 48, 1)]
    else:
        paper = load_config("upsr_x4.yaml")
        cases = [Case("paper 64->256 DDIM-5", paper, 64, 1), Case("paper 64->256 DDIM-5", paper, 64, 16),
                 Case("paper 256->1024 tiled", paper, 256, 1)]
    rows = []
    for case in cases:
        result = run_case(case, check.device.type, repeats=1 if check.tiny else 3)
        rows.append({"case": case.name, "batch": case.batch, "ms_per_image": result.ms_per_image,
                     "network_calls": result.calls_per_run, "gflop_per_image": result.gflop_per_image,
                     "tflops": result.tflops, "peak_memory_gib": result.peak_gib})
        log.info("sampler: %s", rows[-1])
    return rows


class RayParts:
    """synth -> train -> evaluate share a local Ray, an MLflow file and the synthesised crops."""

    def __init__(self, check: Check):
        self.check = check
        self.root = check.workdir / "ray_parts"
        self.photos = None
        self.data_uri: str | None = None
        self.checkpoint: Path | None = None

    def config(self, *overrides: str):
        return load_config("tiny.yaml", [f"mlflow.tracking_uri=sqlite:///{self.root / 'mlflow.db'}",
                                         f"train.storage_path={self.root / 'ray_results'}",
                                         f"evaluate.output_dir={self.root / 'evaluations'}", *overrides])

    def start(self) -> None:
        from pipelines.ray_env import init_ray
        from pipelines.synth import export_sample_photos

        if self.photos is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.photos = export_sample_photos(self.root / "photos")
            init_ray(self.config().ray)

    def synth(self) -> list[dict[str, Any]]:
        from pipelines.synth import synthesize

        self.start()
        crops = 2 if self.check.tiny else 16
        modes = [("CPU actors", ["degradation.device=cpu", "synth.actor_gpus=0"])]
        if self.check.cuda:
            modes.append(("GPU actors", ["degradation.device=cuda", "synth.actor_gpus=0.25"]))
        rows = []
        for name, overrides in modes:
            out = self.root / f"crops_{len(rows)}"
            started = time.perf_counter()
            manifest = synthesize(str(self.photos), str(out),
                                  self.config(f"synth.crops_per_image={crops}", *overrides))
            seconds = time.perf_counter() - started
            count = manifest["counts"]["rows"]
            rows.append({"actors": name, "crops": count, "seconds": seconds, "crops_per_s": count / seconds})
            log.info("synth: %s", rows[-1])
            self.data_uri = self.data_uri or str(out)
        if not self.check.cuda:
            rows.append({"actors": "GPU actors", "crops": None, "seconds": None, "crops_per_s": None,
                         "note": "not measured: --device cpu"})
        return rows

    def train(self) -> list[dict[str, Any]]:
        from mlflow.tracking import MlflowClient

        from pipelines.train import EXPORT_FOLDER, train
        from upsr.checkpoint import load_checkpoint

        if self.data_uri is None:
            self.synth()
        steps = 16 if self.check.tiny else 200
        overrides = [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.validate_every={steps}",
                     "train.log_every=10", "train.num_workers=1", f"train.use_gpu={str(self.check.cuda).lower()}",
                     "train.cpus_per_worker=1", "train.lr=0.002", "train.warmup_steps=0",
                     # Held in the object store: each epoch of the few crops reshuffles, not re-reads.
                     "train_data.materialize=true"]
        overrides.append(f"train.batch_size={16 if self.check.cuda else 2}")
        if self.check.cuda:
            overrides.append("train.precision=bf16")
        config = self.config(*overrides)
        started = time.perf_counter()
        result = train(self.data_uri, None, config, "gpu-check")
        seconds = time.perf_counter() - started
        history = [m.value for m in sorted(MlflowClient(config.mlflow.tracking_uri).get_metric_history(
            result.run_id, "loss"), key=lambda m: m.step)]
        fifth = max(1, len(history) // 5)
        first, last = statistics.mean(history[:fifth]), statistics.mean(history[-fifth:])
        if not last < first:
            raise RuntimeError(f"train: the loss did not fall over {steps} steps ({first:.4f} -> {last:.4f})")
        self.checkpoint = Path(result.checkpoint_uri) / EXPORT_FOLDER
        pipeline = load_checkpoint(self.checkpoint, self.check.device)
        image = pipeline.upscale(torch.rand(1, 3, 16, 16, device=self.check.device), seed=0)
        if image.shape[-1] != 16 * config.denoiser.scale or not torch.isfinite(image).all():
            raise RuntimeError(f"train: the reloaded checkpoint upscaled to {tuple(image.shape)} / non-finite values")
        row = {"steps": steps, "precision": config.train.precision if self.check.cuda else "fp32",
               "batch": config.train.batch_size, "loss_first_fifth": first, "loss_last_fifth": last,
               "seconds": seconds, "checkpoint_reloads": True}
        log.info("train: %s", row)
        return [row]

    def eval_pairs(self, count: int) -> str:
        """The first ``count`` synthesised crops as an eval set of pairs (lr/ and hr/ PNGs)."""
        import pyarrow.parquet as pq

        from pipelines.dataset import open_dataset

        folder = self.root / f"eval_{count}"
        rows = pq.read_table(open_dataset(self.data_uri).shard_paths, columns=["id", "lr_png", "hr_png"])
        for row in rows.slice(0, count).to_pylist():
            name = row["id"].replace("/", "_").replace("#", "_") + ".png"
            for side in ("lr", "hr"):
                (folder / side).mkdir(parents=True, exist_ok=True)
                (folder / side / name).write_bytes(row[f"{side}_png"])
        return str(folder)

    def evaluate(self) -> list[dict[str, Any]]:
        from pipelines.eval_set import open_eval_set
        from pipelines.evaluate import evaluate
        from pipelines.registry import ModelRef

        if self.checkpoint is None:
            self.train()
        config = self.config("evaluate.side_by_side=0",
                             f"evaluate.actor_gpus={1 if self.check.cuda else 0}")
        model = ModelRef(uri=str(self.checkpoint), load_uri=str(self.checkpoint))
        eval_set = open_eval_set(self.eval_pairs(4 if self.check.tiny else 64))
        started = time.perf_counter()
        result = evaluate(model, eval_set, config, str(self.root / "evaluation.parquet"))
        seconds = time.perf_counter() - started
        if not result.complete:
            raise RuntimeError(f"evaluate: incomplete: {result.problems}")
        images = result.table.num_rows
        row = {"actor": "GPU" if self.check.cuda else "CPU", "images": images, "seconds": seconds,
               "images_per_s": images / seconds,
               "upscale_s_per_image": result.summary["seconds"]["upscale_mean"]}
        log.info("evaluate: %s", row)
        return [row]


def markdown(results: dict[str, Any], header: str) -> str:
    lines = [header, ""]
    for part, outcome in results.items():
        lines.append(f"## {part}")
        lines.append("")
        if "error" in outcome:
            lines += [f"FAILED: {outcome['error']}", ""]
            continue
        rows = outcome["rows"]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for row in rows:
            lines.append("| " + " | ".join(format_value(row.get(c)) for c in columns) + " |")
        lines += ["", f"({outcome['seconds']:.1f} s)", ""]
    return "\n".join(lines)


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if 0 < abs(value) < 1:
            return f"{value:.3f}"
        return f"{value:,.1f}"
    return str(value)


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and few steps (CPU check, CI)")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS), help=f"comma-separated: {','.join(PARTS)}")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu --tiny for the CPU check)")
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    header = (f"# GPU check: {device_name}, torch {torch.__version__}{', tiny' if args.tiny else ''}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="upsr-gpu-check-") as workdir:
        check = Check(torch.device(args.device), args.tiny, Path(workdir), args.peak_tflops)
        ray_parts = RayParts(check)
        runners: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "train_step": lambda: train_step(check), "sampler": lambda: sampler(check),
            "synth": ray_parts.synth, "train": ray_parts.train, "evaluate": ray_parts.evaluate}
        try:
            for part in args.parts:
                log.info("part %s", part)
                started = time.perf_counter()
                try:
                    results[part] = {"rows": runners[part](), "seconds": time.perf_counter() - started}
                except Exception as error:  # noqa: BLE001  (every part is reported; the exit code says it failed)
                    log.error("part %s FAILED:\n%s", part, traceback.format_exc())
                    results[part] = {"error": f"{type(error).__name__}: {error}",
                                     "seconds": time.perf_counter() - started}
                (args.out / "gpu_check.json").write_text(json.dumps(
                    {"device": device_name, "torch": torch.__version__, "tiny": args.tiny, "parts": results},
                    indent=2) + "\n")
                (args.out / "gpu_check.md").write_text(markdown(results, header))
        finally:
            if ray_parts.photos is not None:
                import ray

                ray.shutdown()
    print(markdown(results, header))
    failed = [part for part, outcome in results.items() if "error" in outcome]
    if failed:
        log.error("failed parts: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
