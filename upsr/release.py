"""The authors' release (LabShuHangGU/UPSR): its options file and checkpoint files, read into ours.

The release ships a denoiser checkpoint (``network_g``: ``UNetModelSwin``), an aux-net checkpoint
(``network_mse``: ATD) and an options YAML naming both architectures and the diffusion. Our
networks have the same state-dict layout (``upsr.denoiser``, ``upsr.atd``), so importing is
reading: map the options onto our config sections, check every tensor against the network they
describe, and load strictly. Nothing is unpickled (``torch.load(weights_only=True)``).

A checkpoint file is, as the release's own loader reads it: a dict with ``params_ema``, else
``params``, else a bare state dict; a leading ``module.`` is stripped from every key.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from upsr.aux_net import AuxSR, build_aux_net, freeze
from upsr.config import AuxConfig, DenoiserConfig, DiffusionConfig, InferenceConfig, NoiseWeightConfig
from upsr.denoiser import build_denoiser
from upsr.diffusion import UNWDiffusion

IMAGE_CHANNELS = 3
# The options the release's test path reads that we model (everything else is training-only
# or must hold the value our code assumes; see _require).
_DENOISER_OPTIONS = {
    "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
    "dropout", "channel_mult", "conv_resample", "dims", "use_fp16", "num_heads", "num_head_channels",
    "use_scale_shift_norm", "resblock_updown", "swin_depth", "swin_embed_dim", "window_size", "mlp_ratio",
    "patch_norm", "cond_lq", "lq_size", "num_feat",
}


class ReleaseImportError(ValueError):
    """A release file cannot be imported; the message names the file and the key or option."""


@dataclass
class ReleaseModel:
    """What the options describe, and the networks loaded with the release's weights."""

    denoiser_config: DenoiserConfig
    aux_config: AuxConfig
    diffusion_config: DiffusionConfig
    weight_config: NoiseWeightConfig
    inference_config: InferenceConfig
    denoiser: nn.Module | None = None
    aux_net: AuxSR | None = None

    @property
    def diffusion(self) -> UNWDiffusion:
        return UNWDiffusion.from_config(self.diffusion_config)


def read_options(path: str | Path | None) -> ReleaseModel:
    """Our config sections for the release's options file; ``None``: the release's published values
    (which are this project's defaults)."""
    if path is None:
        return ReleaseModel(DenoiserConfig(), AuxConfig(), DiffusionConfig(), NoiseWeightConfig(),
                            InferenceConfig(tiling="release"))
    path = Path(path)
    try:
        options = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ReleaseImportError(f"{path}: cannot be read as YAML: {error}") from None
    if not isinstance(options, dict):
        raise ReleaseImportError(f"{path}: expected a YAML mapping of options, got {type(options).__name__}")
    try:
        diffusion, weight, scale = _diffusion(_section(options, "diffusion"))
        return ReleaseModel(
            denoiser_config=_denoiser(_section(_section(options, "network_g"), "params", "network_g."), scale),
            aux_config=_aux(_section(options, "network_mse")),
            diffusion_config=diffusion,
            weight_config=weight,
            inference_config=_inference(options.get("val") or {}),
        )
    except (ValueError, TypeError) as error:
        raise ReleaseImportError(f"{path}: {error}") from None


def _section(options: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = options.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{prefix}{key}: missing or not a mapping")
    return value


def _require(section: str, options: dict[str, Any], key: str, expected: Any, default: Any = None) -> None:
    value = options.get(key, default)
    if value != expected:
        raise ValueError(f"{section}.{key} = {value!r} is not supported (this code builds {key} = {expected!r})")


def _denoiser(params: dict[str, Any], scale: int) -> DenoiserConfig:
    section = "network_g.params"
    unknown = sorted(set(params) - _DENOISER_OPTIONS)
    if unknown:
        raise ValueError(f"{section}.{unknown[0]}: unknown option of UNetModelSwin")
    for key in ("image_size", "model_channels", "in_channels", "out_channels", "channel_mult", "num_res_blocks"):
        if not isinstance(params.get(key), (int, list)) or isinstance(params.get(key), bool):
            raise ValueError(f"{section}.{key}: missing or not a number (list)")
    for key, expected, default in (("in_channels", IMAGE_CHANNELS * scale**2, None), ("out_channels", 3, None),
                                   ("conv_resample", True, True), ("dims", 2, 2), ("resblock_updown", False, False),
                                   ("use_scale_shift_norm", True, False), ("cond_lq", True, True),
                                   ("patch_norm", False, False)):
        _require(section, params, key, expected, default)
    image_size = params.get("image_size")
    _require(section, params, "lq_size", image_size, 256)
    channel_mult = tuple(params["channel_mult"])
    levels = [image_size // 2**level for level in range(len(channel_mult))]
    if sorted(params.get("attention_resolutions", []), reverse=True) != levels:
        raise ValueError(f"{section}.attention_resolutions = {params.get('attention_resolutions')!r} is not supported "
                         f"(this code puts a Swin layer at every level: {levels})")
    blocks = params.get("num_res_blocks")
    if isinstance(blocks, list):
        if len(set(blocks)) != 1:
            raise ValueError(f"{section}.num_res_blocks = {blocks!r}: levels with different counts are not supported")
        blocks = blocks[0]
    embed_dim = params.get("swin_embed_dim", 96)
    head_channels = params.get("num_head_channels", -1)
    heads = params.get("num_heads", 1) if head_channels == -1 else embed_dim // head_channels
    return DenoiserConfig(
        scale=scale, image_size=image_size, model_channels=params["model_channels"], channel_mult=channel_mult,
        num_res_blocks=blocks, norm_groups=32, dropout=float(params.get("dropout", 0)), swin_dim=embed_dim,
        swin_heads=heads, swin_depth=params.get("swin_depth", 2), window_size=params.get("window_size", 8),
        mlp_ratio=float(params.get("mlp_ratio", 2.0)), shift_mask="release", head_channels=params.get("num_feat", 64),
        use_sr_condition=True,
    )


def _aux(network: dict[str, Any]) -> AuxConfig:
    target = network.get("target")
    if not isinstance(target, str) or not target:
        raise ValueError("network_mse.target: missing (e.g. basicsr.archs.atd_real_arch.ATD)")
    options = network.get("params") or {}
    if not isinstance(options, dict):
        raise ValueError("network_mse.params: not a mapping")
    # The release pads the LR to a multiple of 64 before g; odd sizes are left to the net, as there.
    return AuxConfig(arch=target.rsplit(".", 1)[-1], options=dict(options), pad_multiple=1)


def _diffusion(section: dict[str, Any]) -> tuple[DiffusionConfig, NoiseWeightConfig, int]:
    params = _section(section, "params", "diffusion.")
    name = "diffusion.params"
    for key, expected, default in (("schedule_name", "exponential", None), ("predict_type", "xstart", "xstart"),
                                   ("normalize_input", True, None), ("latent_flag", False, True),
                                   ("weighted_mse", False, False)):
        _require(name, params, key, expected, default)
    steps = params.get("steps", 1000)
    if params.get("timestep_respacing") not in (None, steps):
        raise ValueError(f"{name}.timestep_respacing = {params['timestep_respacing']!r} is not supported "
                         f"(sampling runs all {steps} steps)")
    diffusion = DiffusionConfig(
        steps=steps, kappa=float(params.get("kappa", 1.0)),
        power=float((params.get("schedule_kwargs") or {}).get("power", 0)),
        min_noise_level=float(params.get("min_noise_level", 0.01)), eta_end=float(params.get("etas_end", 0.99)),
        eta_1_cap=0.001)  # the release caps sqrt(eta_1) at sqrt(0.001) in code, not in its options
    weight = NoiseWeightConfig(family="linear", tau=float(section.get("un", 0)),
                               floor=float(section.get("min_noise", 0)))
    return diffusion, weight, int(params.get("sf", 4))


def _inference(val: dict[str, Any]) -> InferenceConfig:
    defaults = InferenceConfig()
    return InferenceConfig(tile=val.get("chop_size", defaults.tile), stride=val.get("chop_stride", defaults.stride),
                           tiling="release")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a release checkpoint file, as the release's loader picks them."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseImportError(f"{path}: no such file")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ReleaseImportError(f"{path}: refused: it holds objects other than tensors and plain values "
                                 f"(only weights_only files are loaded): {str(error).splitlines()[0]}") from None
    except Exception as error:  # truncated or foreign files raise many different types
        raise ReleaseImportError(f"{path}: cannot be read as a PyTorch checkpoint: {error}") from None
    if isinstance(stored, dict):
        for key in ("params_ema", "params"):
            if key in stored:
                stored = stored[key]
                break
    if not isinstance(stored, dict):
        raise ReleaseImportError(f"{path}: expected a state dict (or a dict with params_ema/params), "
                                 f"got {type(stored).__name__}")
    state = {}
    for key, value in stored.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ReleaseImportError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = value
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load ``state`` into ``module`` or raise naming the first key that does not fit.

    Buffers the architecture derives (relative position indices, attention masks) must equal
    ours: a different value means the file was made by other code, and loading it would
    silently change the attention.
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    for keys, kind in ((missing, "lacks key"), (unexpected, "has unexpected key")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ReleaseImportError(f"{path}: {kind} {keys[0]!r}{more} for the {what} its options describe")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ReleaseImportError(f"{path}: {key!r} has shape {tuple(state[key].shape)}, the {what} its options "
                                     f"describe has {tuple(tensor.shape)}")
    for key, _ in module.named_buffers():
        if key in expected and not torch.equal(state[key].to(expected[key].dtype), expected[key]):
            raise ReleaseImportError(f"{path}: buffer {key!r} differs from the value the {what} computes; "
                                     "the file was not written by this architecture")
    module.load_state_dict(state, strict=True)


def import_release(denoiser_path: str | Path, aux_path: str | Path,
                   options_path: str | Path | None = None) -> ReleaseModel:
    """The release's networks with its weights, and the config sections that rebuild them."""
    model = read_options(options_path)
    try:
        denoiser = build_denoiser(model.denoiser_config)
        aux_net = build_aux_net(model.aux_config)
    except ValueError as error:
        raise ReleaseImportError(f"{options_path or 'the release options'}: {error}") from None
    load_strict(denoiser, read_state_dict(denoiser_path), denoiser_path, "denoiser")
    load_strict(aux_net.net, read_state_dict(aux_path), aux_path, f"aux net ({model.aux_config.arch})")
    model.denoiser = denoiser.eval().requires_grad_(False)
    model.aux_net = freeze(aux_net)
    return model
