"""The Ray Train machinery shared by ``upsr train`` and ``upsr train-aux``.

Driver side, ``fit`` opens the dataset and the MLflow run and runs a ``TorchTrainer``. Worker
side, ``worker_loop`` runs a job's ``Task`` (the network, its loss, validation and what a
checkpoint exports) with AdamW, linear warm-up, optional gradient clipping, a parameter EMA,
optional autocast (a GradScaler for fp16), the non-finite guard and checkpoints.

Invariants the loop keeps:

- ``ray.train.report`` is a barrier, so every worker reports at the same steps; only rank 0
  puts files in the checkpoint (the weights are identical on all ranks under DDP).
- Whether a step is skipped as non-finite is decided on all ranks together (one all-reduce of
  the loss and a flag), so no rank waits in a gradient all-reduce that the others skip.
- All randomness of step ``s`` on rank ``r`` (timesteps, noise, flips) comes from generators
  seeded with ``(train.seed, r, s)``: a resumed run draws what an uninterrupted one would
  have drawn, without storing generator states. (The data order after a resume starts a
  new epoch.)
- Validation runs on rank 0 only, with the EMA weights; the other ranks wait at the next
  collective.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipelines import config as config_module
from pipelines import storage
from pipelines.errors import UserError, last_line
from pipelines.config import Config, PlateauConfig, TrainConfig
from pipelines.images import derive_seed
from pipelines.optimization import (autocast_context, backward_over_micro_batches, build_optimizer,
                                    configure_matmul, maybe_compile, resolve_precision)
from pipelines.train_data import (TrainingData, augment, ingest_config, iter_batches, open_training_data,
                                  validation_batches)

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"


class NonFiniteTraining(RuntimeError):
    """Too many consecutive non-finite steps: the run diverged."""


class TrainingFailed(RuntimeError):
    """The Ray Train run failed; the message carries the workers' errors."""


class Task(Protocol):
    """What a training job plugs into ``worker_loop``."""

    model: nn.Module

    def losses(self, model: nn.Module, lr: torch.Tensor, hr: torch.Tensor,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Loss terms, "loss" the one to minimise; ``model`` is the (DDP-wrapped) trained net."""

    def validate(self, ema_model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], step: int,
                 logger: Any) -> dict[str, float]:
        """Validation metrics of the EMA model; may log images through ``logger``."""

    def export(self, ema_model: nn.Module, folder: Path) -> None:
        """Write the job's deliverable (weights others load) into a checkpoint folder."""


@dataclass(frozen=True)
class TrainingJob:
    """What tells ``upsr train`` and ``upsr train-aux`` apart: the job's name, its config section
    (``train`` or ``aux_train``) and its task, built on every worker as
    ``task(config, device, **task_options)``."""

    name: str
    section: str
    task: Callable[..., Task]

    def settings(self, config: Config) -> TrainConfig:
        return getattr(config, self.section)


@dataclass
class LoopState:
    step: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    # train.plateau: the best value of its metric so far and the validations since it improved.
    plateau_best: float | None = None
    plateau_best_step: int = 0
    validations_without_gain: int = 0


def ema_update(decay: float, warmup: bool) -> Callable:
    """``AveragedModel``'s multi_avg_fn: a fixed decay, or one ramped as min(decay, (1 + n) / (10 + n))."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # Called once per dtype group. Integer buffers (attention position indices) are copied:
        # torch's own EMA would round index * decay + index * (1 - decay) down by one now and then.
        if not torch.is_floating_point(ema_params[0]):
            torch._foreach_copy_(ema_params, params)
            return
        updates = int(num_averaged)
        step_decay = min(decay, (1 + updates) / (10 + updates)) if warmup else decay
        torch._foreach_lerp_(ema_params, params, 1.0 - step_decay)

    return update


def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    return factor


def save_training_state(folder: Path, model: nn.Module, ema: AveragedModel, optimizer: torch.optim.Optimizer,
                        scheduler: Any, scaler: torch.amp.GradScaler, state: LoopState, config_yaml: str) -> None:
    """Weights as safetensors; optimizer, scheduler, scaler and counters in a file that loads
    with ``torch.load(weights_only=True)`` (tensors and plain values only)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / MODEL_FILE))
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(folder / EMA_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "step": state.step, "nonfinite_steps": state.nonfinite_steps,
                "consecutive_nonfinite": state.consecutive_nonfinite, "plateau_best": state.plateau_best,
                "plateau_best_step": state.plateau_best_step,
                "validations_without_gain": state.validations_without_gain}, folder / STATE_FILE)
    (folder / CONFIG_FILE).write_text(config_yaml)


@contextlib.contextmanager
def private_copy(checkpoint) -> Iterator[Path]:
    """A Ray Train checkpoint as a local folder that no other process writes to.

    ``Checkpoint.as_directory`` shares one download per node, but a rank that finds the download
    finished downloads again into the same folder, over files another rank is still reading
    (a resume from S3 failed here with torch.load's "file read failed"). Each rank gets its own
    copy; a local checkpoint is read in place.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="upsr-resume-") as folder:
        yield Path(checkpoint.to_directory(folder))


def restore_training_state(folder: Path, model: nn.Module, ema: AveragedModel, optimizer: torch.optim.Optimizer,
                           scheduler: Any, scaler: torch.amp.GradScaler) -> LoopState:
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(folder / MODEL_FILE), device=str(device)))
    ema.load_state_dict(load_file(str(folder / EMA_FILE), device=str(device)))
    saved = torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    return LoopState(saved["step"], saved["nonfinite_steps"], saved["consecutive_nonfinite"],
                     saved.get("plateau_best"), saved.get("plateau_best_step", 0),
                     saved.get("validations_without_gain", 0))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # gloo and NCCL both reduce tensors on the process group's device kind.
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def train_worker(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of both jobs; ``loop_config`` is what ``fit`` passed: the job, and
    the config, tracking URI and task options as object-store references."""
    import ray.train

    from pipelines.tracking import start_system_metrics

    config: Config = ray.get(loop_config["config"])
    monitor = start_system_metrics(config.mlflow, loop_config["mlflow_run_id"], ray.get(loop_config["tracking_uri"]),
                                   ray.train.get_context().get_world_rank(), ray.train.get_checkpoint() is not None)
    try:
        train_steps(loop_config, config)
    finally:
        if monitor is not None:
            monitor.finish()


def train_steps(loop_config: dict[str, Any], config: Config) -> None:
    """The training loop of one worker: set-up, resume, steps, validation, checkpoints."""
    import ray.train
    import ray.train.torch

    from pipelines.tracking import RunLogger

    job: TrainingJob = loop_config["job"]
    settings = job.settings(config)
    task_options = {key: ray.get(ref) for key, ref in loop_config["task_options"].items()}
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if rank == 0 and loop_config["rank0_setup"] is not None:
        loop_config["rank0_setup"]()
    device = ray.train.torch.get_device()
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    task = job.task(config, device, **task_options)
    model = task.model.to(device)
    if settings.activation_checkpointing:
        if not hasattr(model, "set_activation_checkpointing"):
            raise UserError(f"{job.section}.activation_checkpointing: {type(model).__name__} has no levels to "
                            "checkpoint (only upsr train's Swin-UNet has)")
        model.set_activation_checkpointing(True)
    configure_matmul(device)
    ema = AveragedModel(model, multi_avg_fn=ema_update(settings.ema_decay, settings.ema_warmup), use_buffers=True)
    # AveragedModel's first update would copy the model; the release's EMA starts as a copy of
    # the initial weights and averages from the first step on.
    ema.n_averaged.fill_(1)
    optimizer = build_optimizer((p for p in model.parameters() if p.requires_grad), settings.lr,
                                settings.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(settings.warmup_steps))
    precision = resolve_precision(settings.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_context(precision, device)

    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with private_copy(checkpoint) as folder:
            state = restore_training_state(folder, model, ema, optimizer, scheduler, scaler)
        log.info("rank %d resumed at step %d from %s", rank, state.step, checkpoint.path)
    trained = ray.train.torch.prepare_model(maybe_compile(model, settings.compile), move_to_device=False)
    logger = (RunLogger(config.mlflow, loop_config["mlflow_run_id"], ray.get(loop_config["tracking_uri"]))
              if rank == 0 else None)
    if logger and checkpoint:
        logger.metrics({"resumed_from_step": state.step}, state.step)

    shard = ray.train.get_dataset_shard("train")
    generator = torch.Generator()
    device_generator = torch.Generator(device)
    global_batch = settings.global_batch_size
    window = _Window()
    val_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    best_ema: dict[str, torch.Tensor] | None = None  # train.plateau.restore_best: rank 0's copy
    # Rank 0's latest validation metrics ride along in every report, so that a Ray Tune
    # scheduler watching the run (TuneReportCallback forwards rank 0's metrics) can rank it.
    latest_validation: dict[str, float] = {}
    while state.step < settings.steps:
        # Seeded by the step the epoch starts at: a resumed run reshuffles where it resumed.
        batches = iter_batches(shard, settings.batch_size, config.train_data, device,
                               shuffle_seed=derive_seed(settings.seed, rank, "epoch-at-step", state.step))
        epoch_steps = 0
        while state.step < settings.steps:
            started = time.perf_counter()
            micro_batches = list(itertools.islice(batches, settings.grad_accum_steps))
            if len(micro_batches) < settings.grad_accum_steps:
                break  # the epoch's last, incomplete step is dropped, as a partial batch would be
            data_seconds = time.perf_counter() - started
            epoch_steps += 1
            step = state.step + 1
            generator.manual_seed(derive_seed(settings.seed, rank, step))
            device_generator.manual_seed(derive_seed(settings.seed, rank, step, "device"))
            micro_batches = [augment(lr_images, hr_images, generator) for lr_images, hr_images in micro_batches]
            if rank == 0 and step in settings.debug.inject_nan_at_steps:
                lr_images, hr_images = micro_batches[0]
                micro_batches[0] = lr_images, torch.full_like(hr_images, float("nan"))

            def loss_terms(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
                with autocast:
                    return task.losses(trained, *batch, device_generator)

            optimizer.zero_grad(set_to_none=True)
            accumulated = backward_over_micro_batches(trained, micro_batches, loss_terms, scaler.scale,
                                                      all_reduce_sum)
            finite = accumulated.finite
            grad_norm = float("nan")
            if finite:
                scaler.unscale_(optimizer)
                # An infinite max norm measures without clipping.
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    model.parameters(), settings.grad_clip if settings.grad_clip is not None else math.inf))
                # fp16's scaler skips steps with overflowing gradients itself; elsewhere such a
                # step (the same on every rank: gradients are all-reduced) is a non-finite one.
                finite = math.isfinite(grad_norm) or precision == "fp16"
                if finite:
                    scaler.step(optimizer)
                    scaler.update()
                    ema.update_parameters(model)
            scheduler.step()
            state.step = step
            if finite:
                state.consecutive_nonfinite = 0
                window.add(accumulated.loss_sum_over_ranks / world_size, accumulated.terms, grad_norm)
            else:
                state.nonfinite_steps += 1
                state.consecutive_nonfinite += 1
                log.warning("rank %d: non-finite loss or gradients at step %d, step skipped (%d in a row)",
                            rank, step, state.consecutive_nonfinite)
                if state.consecutive_nonfinite >= settings.max_consecutive_nonfinite:
                    raise NonFiniteTraining(
                        f"{state.consecutive_nonfinite} consecutive non-finite steps (max_consecutive_nonfinite"
                        f" = {settings.max_consecutive_nonfinite}), the last at step {step}: training diverged; "
                        "lower the learning rate or check the data")
            window.time(data_seconds, time.perf_counter() - started)

            if logger and (step % settings.log_every == 0 or step == settings.steps or not finite):
                averages = window.flush(global_batch)
                logger.metrics(averages | {"lr": scheduler.get_last_lr()[0], "nonfinite_steps": state.nonfinite_steps},
                               step)
                # The console's progress (`ray job logs -f` shows it): MLflow has the full record.
                log.info("%s", progress_line(job.name, step, settings.steps, averages, global_batch))
            validating = step % settings.validate_every == 0 or step == settings.steps
            if rank == 0 and validating and loop_config["val_pairs"] is not None:
                if val_batches is None:
                    val_batches = validation_batches(ray.get(loop_config["val_pairs"]), device)
                latest_validation = task.validate(ema.module, iter(val_batches), step, logger)
                logger.metrics(latest_validation, step)
            plateaued = False
            if validating and settings.plateau.metric is not None:
                stop = rank == 0 and plateau_reached(settings.plateau, state, latest_validation, step)
                if rank == 0 and settings.plateau.restore_best and state.plateau_best_step == step:
                    best_ema = {k: v.detach().to("cpu", copy=True) for k, v in ema.module.state_dict().items()}
                plateaued = bool(all_reduce_sum(torch.tensor([float(stop)], device=device)))
            if plateaued and logger:
                log.info("%s: %s has not improved for %d validations (best %.4f at step %d): stopping at step %d "
                         "of %d", job.name, settings.plateau.metric, state.validations_without_gain,
                         state.plateau_best, state.plateau_best_step, step, settings.steps)
                stopped = {"stopped_on_plateau_at_step": step}
                if best_ema is not None:
                    # The checkpoint exports the best validation's model (it is in memory since then).
                    ema.module.load_state_dict(best_ema)
                    stopped["restored_best_from_step"] = state.plateau_best_step
                logger.metrics(stopped, step)
            if step % settings.checkpoint_every == 0 or step == settings.steps or plateaued:
                report(rank, step, state, model, ema, optimizer, scheduler, scaler, task, loop_config["config_yaml"],
                       latest_validation)
                if settings.debug.pid_dir:
                    Path(settings.debug.pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
            if plateaued:
                return
        if epoch_steps == 0:
            raise RuntimeError(f"the train split yields fewer than grad_accum_steps = {settings.grad_accum_steps} "
                               f"batches of {settings.batch_size} rows per worker")


def plateau_reached(plateau: PlateauConfig, state: LoopState, validation: dict[str, float], step: int) -> bool:
    """Rank 0, after the validation at ``step``: count it against ``train.plateau`` and say whether to stop."""
    if plateau.metric not in validation:
        raise UserError(f"plateau.metric: {plateau.metric!r} is not a validation metric of this job "
                        f"(it logs {', '.join(sorted(validation))})")
    value = validation[plateau.metric]
    if plateau.improved(value, state.plateau_best):
        state.plateau_best, state.plateau_best_step, state.validations_without_gain = value, step, 0
    else:
        state.validations_without_gain += 1
    return state.validations_without_gain >= plateau.patience


def report(rank: int, step: int, state: LoopState, model: nn.Module, ema: AveragedModel, optimizer, scheduler,
           scaler, task: Task, config_yaml: str, validation: dict[str, float]) -> None:
    import ray.train

    metrics = {"step": step, "nonfinite_steps": state.nonfinite_steps, **validation}
    name = f"checkpoint_{step:08d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_training_state(Path(folder), model, ema, optimizer, scheduler, scaler, state, config_yaml)
        task.export(ema.module, Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


class _Window:
    """Averages of what happened since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.terms: dict[str, list[float]] = {}
        self.grad_norms: list[float] = []
        self.data_seconds = 0.0
        self.step_seconds = 0.0
        self.steps = 0

    def add(self, loss: float, terms: dict[str, float], grad_norm: float) -> None:
        self.losses.append(loss)
        for key, value in terms.items():
            self.terms.setdefault(key, []).append(value)
        self.grad_norms.append(grad_norm)

    def time(self, data_seconds: float, step_seconds: float) -> None:
        self.data_seconds += data_seconds
        self.step_seconds += step_seconds
        self.steps += 1

    def flush(self, global_batch: int) -> dict[str, float]:
        values: dict[str, float] = {}
        if self.losses:
            values["loss"] = sum(self.losses) / len(self.losses)
            values["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
            values |= {f"rank0_{key}": sum(v) / len(v) for key, v in self.terms.items() if key != "loss"}
        if self.step_seconds > 0:
            values["samples_per_s"] = global_batch * self.steps / self.step_seconds
            values["data_wait_fraction"] = self.data_seconds / self.step_seconds
        self.reset()
        return values


def progress_line(job: str, step: int, total: int, averages: dict[str, float], global_batch: int) -> str:
    """``train step 40/90 (44%): loss 0.0123, 35.2 samples/s, data wait 12%, ETA 0:00:25``, from the
    averages since the last line (``_Window.flush``)."""
    details = [f"loss {averages['loss']:.4g}"] if "loss" in averages else ["no finite step since the last line"]
    rate = averages.get("samples_per_s")
    if rate:
        eta = datetime.timedelta(seconds=round((total - step) * global_batch / rate))
        details += [f"{rate:.1f} samples/s", f"data wait {averages['data_wait_fraction']:.0%}", f"ETA {eta}"]
    return f"{job} step {step}/{total} ({100 * step // total}%): " + ", ".join(details)


# --- driver side -----------------------------------------------------------------------------


@dataclass
class FitResult:
    run_id: str
    checkpoint: Any  # ray.train.Checkpoint of the last step
    checkpoint_uri: str
    data: TrainingData


def storage_settings(settings: TrainConfig, config: Config) -> tuple[str, Any, str]:
    """(storage_path for RunConfig, its filesystem or None, the URI users see)."""
    uri = settings.storage_path or str(Path("runs/ray_results").resolve())
    if storage.is_s3(uri):
        location = storage.locate(uri, config.storage)
        return location.path, location.fs, location.uri
    path = str(Path(uri).expanduser().resolve())
    return path, None, path


def fit(job: TrainingJob, config: Config, data_uri: str, run_name: str, task_options: dict[str, Any] | None = None,
        callbacks: Sequence[Any] = (), run_tags: dict[str, str] | None = None, data: TrainingData | None = None,
        tracking_uri: str | None = None, rank0_setup: Callable[[], None] | None = None,
        publish: Callable[[FitResult], None] | None = None) -> FitResult:
    """Open the data and the MLflow run, train, ``publish`` the result (register the model, log the
    weights), end the run FINISHED and return the last checkpoint. A run that does not get that far
    ends KILLED (Ctrl-C, ``ray job stop``: its last checkpoint resumes it) or FAILED.

    ``task_options`` go to every worker's task through Ray's object store (``--init-from``'s
    weights, for one).

    ``callbacks`` go to Ray Train's RunConfig (``upsr tune`` passes its TuneReportCallback);
    ``run_tags`` are added to the MLflow run (``mlflow.parentRunId`` nests it under a search);
    ``data`` is ``data_uri`` already opened (a search opens and splits it once for all trials);
    ``tracking_uri`` is the MLflow store a search's driver resolved (default: this process's);
    ``rank0_setup`` runs on the rank-0 worker before training (a search registers the worker group).

    The workers get the config and the tracking URI through Ray's object store, credentials
    included; everything written (MLflow params, config files, checkpoints) holds the config
    with credentials taken out (``config.public_dict``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines import tracking
    from pipelines.ray_env import init_ray, require_shared

    settings = job.settings(config)
    init_ray(config.ray)
    # Resolved here, once: the default is a path under the driver's folder, and Ray workers run
    # elsewhere (their own default would point at another database).
    tracking_uri = tracking_uri or tracking.tracking_uri(config.mlflow)
    mlflow_settings = replace(config.mlflow, tracking_uri=tracking_uri)
    if settings.use_gpu and not ray.cluster_resources().get("GPU") and not (config.ray.address
                                                                              or os.environ.get("RAY_ADDRESS")):
        raise UserError(f"{job.name}: use_gpu is true but this local Ray instance has no GPU; "
                        f"set --set {job.section}.use_gpu=false")
    if data is None:
        data = open_training_data(data_uri, config.train_data, config.storage)
    global_batch = settings.global_batch_size
    train_rows = data.train_rows
    if train_rows < global_batch:
        raise UserError(f"{data_uri}: the train split has {train_rows} rows, fewer than one global batch of "
                        f"{global_batch} ({settings.num_workers} workers x {settings.batch_size} x "
                        f"{settings.grad_accum_steps} accumulated)")
    val_pairs = data.validation_pairs(settings.val_batches, settings.batch_size)
    if settings.plateau.metric and not val_pairs:
        raise UserError(f"{job.section}.plateau.metric is set but {data_uri} holds out nothing to validate on "
                        "(train_data.val_fraction)")
    storage_path, filesystem, storage_uri = storage_settings(settings, config)
    require_shared(config.ray, {f"{job.section}.storage_path": storage_uri, "mlflow.tracking_uri": tracking_uri})
    config_yaml = config_module.to_yaml(config)
    mlflow_client = tracking.client(mlflow_settings)
    with tracking.run_ended_unless_done(lambda: tracking.start_run(
            mlflow_settings, run_name, config, job.name, data.dataset.manifest, data.dataset.manifest_hash,
            config_yaml, run_tags), mlflow_client) as run_id:
        tracking.log_run_facts(mlflow_settings, run_id, {
            "global_batch_size": global_batch, "effective_lr": settings.lr, "train_rows": train_rows,
            "val_sources": len(data.val_sources), "train_sources": len(data.train_sources),
            "checkpoint_storage": f"{storage_uri}/{run_name}"})
        tracking.log_dataset_input(mlflow_client, run_id, data.dataset.location.uri,
                                   data.dataset.manifest_hash, "training", {
                                       "rows": data.dataset.manifest["counts"]["rows"], "train_rows": train_rows,
                                       "train_photos": len(data.train_sources), "val_photos": len(data.val_sources)})
        log.info("%s: run %s, %d workers x batch %d x %d accumulated = global batch %d, lr %g, checkpoints under "
                 "%s/%s; MLflow run: %s", job.name, run_name, settings.num_workers, settings.batch_size,
                 settings.grad_accum_steps, global_batch,
                 settings.lr, storage_uri, run_name, tracking.run_page(mlflow_settings, run_id))
        resources = {"CPU": settings.cpus_per_worker} | ({"GPU": settings.gpus_per_worker} if settings.use_gpu else {})
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"job": job, "config": ray.put(config), "config_yaml": config_yaml,
                               "tracking_uri": ray.put(tracking_uri), "mlflow_run_id": run_id,
                               "val_pairs": ray.put(val_pairs) if val_pairs else None,
                               "rank0_setup": rank0_setup,
                               "task_options": {key: ray.put(value) for key, value in (task_options or {}).items()}},
            scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=filesystem,
                                 failure_config=FailureConfig(max_failures=settings.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=settings.num_to_keep),
                                 callbacks=list(callbacks)),
            datasets=data.datasets,
            dataset_config=ingest_config(config.train_data, datasets_to_split=["train"]),
        )
        try:
            result = in_helper_thread(trainer.fit)
        except ray.train.TrainingFailedError as error:
            raise TrainingFailed(f"{job.name} run {run_name} failed: {worker_errors(error)}") from None
        if result.checkpoint is None:
            raise TrainingFailed(f"{job.name} run {run_name} ended without a checkpoint")
        checkpoint_uri = (f"s3://{result.checkpoint.path}" if filesystem is not None else result.checkpoint.path)
        fitted = FitResult(run_id, result.checkpoint, checkpoint_uri, data)
        if publish is not None:
            publish(fitted)
        mlflow_client.set_terminated(run_id, "FINISHED")
    log.info("%s: run %s finished, last checkpoint %s; MLflow run: %s", job.name, run_name, checkpoint_uri,
             tracking.run_page(mlflow_settings, run_id))
    return fitted


def in_helper_thread(call: Callable[[], Any]) -> Any:
    """``call()`` in a helper thread while this one waits, so that Ctrl-C and SIGTERM arrive here as
    KeyboardInterrupt. In the main thread, Ray Train installs its own SIGINT handler, which aborts
    the run and exits the process without letting the job mark its MLflow run."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001  (re-raised in the waiting thread)
            outcome["error"] = error

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def worker_errors(error: Exception) -> str:
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return str(error)
    return "; ".join(f"rank {rank}: {last_line(str(failure)) or type(failure).__name__}"
                     for rank, failure in sorted(failures.items()))
