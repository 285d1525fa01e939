"""The UPSR checkpoint: a folder of plain files, safe to load from anywhere.

    weights.safetensors  denoiser tensors under "denoiser.", aux-net tensors under "aux."
    config.json          the resolved denoiser, aux, diffusion, weight and inference sections
    schedule.json        the etas the model was trained with
    format.json          format name and version, and the SHA-256 of every other file

Nothing is unpickled, and every file is checked against its SHA-256 before it is read, so a
changed config (a different sampler, tau or seed) is refused like changed weights. The
networks' sizes are checked before any memory is allocated for them. ``format.json`` is
written last, so an interrupted save is detected as an incomplete folder. ``upsr.load`` also accepts URIs such as ``models:/upsr@champion``
through resolvers that other packages register (``register_uri_resolver``), so this library
never imports a tracking client itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic.dataclasses import dataclass as pydantic_dataclass
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from upsr.aux_net import build_aux_net
from upsr.config import AuxConfig, DenoiserConfig, DiffusionConfig, InferenceConfig, NoiseWeightConfig
from upsr.denoiser import build_denoiser
from upsr.diffusion import UNWDiffusion
from upsr.config_loader import SECTION, ConfigError, from_dict, to_dict
from upsr.inference import UPSRPipeline

FORMAT_NAME = "upsr-checkpoint"
# 2: the denoiser has the release's layout (module names, head, Swin shift rule and buffers).
FORMAT_VERSION = 2
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
SCHEDULE_FILE = "schedule.json"
FORMAT_FILE = "format.json"
DENOISER_PREFIX = "denoiser."
AUX_PREFIX = "aux."
# Ten times the paper's denoiser and aux net together: a config asking for more is refused
# before anything is allocated (a tampered or mistyped model_channels would otherwise take
# the machine's memory).
MAX_PARAMETERS = 1_250_000_000

UriResolver = Callable[[str], "str | Path"]
_URI_RESOLVERS: dict[str, UriResolver] = {}
# A URI scheme of two or more letters, so that Windows drive letters stay paths.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, tampered with or of another format; names the file."""


@pydantic_dataclass(config=SECTION)
class CheckpointConfig:
    """Everything needed to rebuild the pipeline; the content of ``config.json``."""

    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    weight: NoiseWeightConfig = field(default_factory=NoiseWeightConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


def register_uri_resolver(prefix: str, resolver: UriResolver) -> None:
    """Let ``upsr.load`` accept URIs starting with ``prefix`` (e.g. "models:/"): ``resolver(uri)``
    returns a local checkpoint folder (downloading it if needed)."""
    _URI_RESOLVERS[prefix] = resolver


def resolve_checkpoint_path(path_or_uri: str | Path) -> Path:
    if isinstance(path_or_uri, Path):
        return path_or_uri
    for prefix in sorted(_URI_RESOLVERS, key=len, reverse=True):
        if path_or_uri.startswith(prefix):
            return Path(_URI_RESOLVERS[prefix](path_or_uri))
    scheme = _SCHEME.match(path_or_uri)
    if scheme:
        known = ", ".join(sorted(_URI_RESOLVERS)) or "none"
        raise CheckpointError(f"{path_or_uri}: no resolver is registered for {scheme.group(1)}: URIs "
                              f"(registered prefixes: {known}); register one with "
                              "upsr.checkpoint.register_uri_resolver or pass a local checkpoint folder")
    return Path(path_or_uri)


def save_checkpoint(folder: str | Path, denoiser: nn.Module, aux_net: nn.Module, diffusion: UNWDiffusion,
                    config: CheckpointConfig, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the checkpoint folder (created if needed; existing checkpoint files are replaced).

    ``extra_files`` (name -> content) are stored beside the others and covered by the checksums.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FORMAT_FILE).unlink(missing_ok=True)  # the folder is incomplete until format.json is back
    tensors = {DENOISER_PREFIX + name: tensor for name, tensor in denoiser.state_dict().items()}
    tensors.update({AUX_PREFIX + name: tensor for name, tensor in aux_net.state_dict().items()})
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
              str(folder / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    # The aux weights live in weights.safetensors now; a path here would point at another machine.
    stored = replace(config, aux=replace(config.aux, weights=None, weights_key=None))
    _write_json(folder / CONFIG_FILE, to_dict(stored))
    _write_json(folder / SCHEDULE_FILE, {"etas": diffusion.etas.tolist(), "kappa": diffusion.kappa})
    for name, content in (extra_files or {}).items():
        (folder / name).write_bytes(content)
    names = [WEIGHTS_FILE, CONFIG_FILE, SCHEDULE_FILE, *(extra_files or {})]
    _write_json(folder / FORMAT_FILE, {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                       "files": {name: file_sha256(folder / name) for name in names}})
    return folder


@dataclass
class StoredCheckpoint:
    """A checkpoint folder's content, checked but not yet built into networks."""

    folder: Path
    config: CheckpointConfig
    diffusion: UNWDiffusion
    denoiser_state: dict[str, torch.Tensor]
    aux_state: dict[str, torch.Tensor]


def inspect_checkpoint(path_or_uri: str | Path) -> StoredCheckpoint:
    """A checkpoint folder checked without loading its tensors: format, every file's checksum,
    the config and schedule. ``denoiser_state`` and ``aux_state`` are left empty."""
    folder = resolve_checkpoint_path(path_or_uri)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (it does not exist or is a file)")
    format_info = _read_json(folder / FORMAT_FILE, "is this an UPSR checkpoint folder?")
    if format_info.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{folder / FORMAT_FILE}: format is {format_info.get('format')!r}, "
                              f"not {FORMAT_NAME!r}: this folder holds something else")
    if format_info.get("version") == 1:
        raise CheckpointError(f"{folder / FORMAT_FILE}: format version 1 was written before the denoiser took the "
                              "release's layout; its weights do not fit this code: retrain or re-import the model")
    if format_info.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / FORMAT_FILE}: format version {format_info.get('version')!r} is not "
                              f"supported by this code (it reads version {FORMAT_VERSION})")
    checksums = format_info.get("files")
    if not isinstance(checksums, dict):
        raise CheckpointError(f"{folder / FORMAT_FILE} lists no file checksums")
    for name in (WEIGHTS_FILE, CONFIG_FILE, SCHEDULE_FILE):
        if name not in checksums:
            raise CheckpointError(f"{folder / FORMAT_FILE} has no checksum for {name}")
    for name, expected in checksums.items():
        path = folder / name
        if Path(name).name != name:
            raise CheckpointError(f"{folder / FORMAT_FILE} names {name!r}, not a file of this folder")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path} does not match the checksum in {FORMAT_FILE}: "
                                  "the file was truncated or modified after saving")
    try:
        config = from_dict(CheckpointConfig, _read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE))
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    schedule = _read_json(folder / SCHEDULE_FILE)
    try:
        diffusion = UNWDiffusion(torch.tensor(schedule["etas"], dtype=torch.float64), schedule["kappa"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / SCHEDULE_FILE}: not a valid schedule: {error}") from None
    if diffusion.num_steps != config.diffusion.steps:
        raise CheckpointError(f"{folder / SCHEDULE_FILE} has {diffusion.num_steps} etas but "
                              f"{CONFIG_FILE} says diffusion.steps = {config.diffusion.steps}")
    return StoredCheckpoint(folder, config, diffusion, {}, {})


def read_checkpoint(path_or_uri: str | Path) -> StoredCheckpoint:
    """The configs, schedule and tensors of a checkpoint folder (or a URI a resolver maps to one)."""
    stored = inspect_checkpoint(path_or_uri)
    weights_path = stored.folder / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path} cannot be read: {error}") from None
    stored.denoiser_state = _with_prefix(tensors, DENOISER_PREFIX, weights_path)
    stored.aux_state = _with_prefix(tensors, AUX_PREFIX, weights_path)
    return stored


def load_checkpoint(path_or_uri: str | Path, device: torch.device | str = "cpu") -> UPSRPipeline:
    """The pipeline stored in a checkpoint folder (or a URI a registered resolver maps to one)."""
    stored = read_checkpoint(path_or_uri)
    config_path = stored.folder / CONFIG_FILE
    denoiser = build_within_limit(build_denoiser, stored.config.denoiser, config_path, "denoiser")
    # The aux weights are in weights.safetensors: a path in the config would point elsewhere.
    aux_config = replace(stored.config.aux, weights=None, weights_key=None)
    aux_net = build_within_limit(build_aux_net, aux_config, config_path, "aux")
    weights_path = stored.folder / WEIGHTS_FILE
    load_state(denoiser, stored.denoiser_state, weights_path)
    load_state(aux_net, stored.aux_state, weights_path)
    for module in (denoiser, aux_net):
        module.requires_grad_(False)
    pipeline = UPSRPipeline(denoiser, aux_net, stored.diffusion, stored.config.weight, stored.config.inference)
    return pipeline.to(device)


def build_within_limit(build: Callable[[Any], nn.Module], config: Any, path: Path, section: str) -> nn.Module:
    """``build(config)``, after counting its parameters on the meta device (no memory) against
    ``MAX_PARAMETERS``; a config that cannot be built is a ``CheckpointError`` naming the section."""
    try:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in build(config).parameters())
        if parameters > MAX_PARAMETERS:
            raise CheckpointError(f"{path}: the {section} section asks for {parameters:,} parameters, more than "
                                  f"{MAX_PARAMETERS:,}: refusing to allocate it")
        return build(config)
    except (ValueError, TypeError, KeyError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the {section} section does not describe a network this code builds: "
                              f"{error}") from None


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``format.json`` of ours (any version)."""
    try:
        return json.loads((folder / FORMAT_FILE).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def load(path_or_uri: str | Path, device: torch.device | str = "cpu") -> UPSRPipeline:
    """``upsr.load``: a ready ``UPSRPipeline`` from a checkpoint folder or a registered URI."""
    return load_checkpoint(path_or_uri, device)


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    state = {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path} holds no tensors under {prefix!r}")
    return state


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict loading, a mismatch reported as a ``CheckpointError`` naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the networks described in {CONFIG_FILE}: {error}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _read_json(path: Path, hint: str = "") -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing" + (f" ({hint})" if hint else ""))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
