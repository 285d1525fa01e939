"""Parity with the authors' release: state-dict layouts, parameter counts, reading their options and
checkpoint files, and ``upsr import-official`` end to end.

``tests/data/release_*_layout.json`` list every key, shape and kind (parameter or buffer) of the
release's ``UNetModelSwin`` and ``ATD`` built from its options (001_UPSR_RealSR_x4.yml), taken from
its code; no code of the release is here. The checkpoints imported below are randomly initialised
networks of ours saved the way the release saves (its layout is ours), at reduced widths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from upsr.aux_net import build_aux_net
from upsr.config import AuxConfig, DenoiserConfig
from upsr.denoiser import build_denoiser, count_parameters
from upsr.release import ReleaseImportError, import_release, read_options, read_state_dict

DATA = Path(__file__).parent / "data"


def layout(module: torch.nn.Module) -> dict[str, tuple[list[int], str]]:
    parameters = dict(module.named_parameters())
    return {key: (list(value.shape), "parameter" if key in parameters else "buffer")
            for key, value in module.state_dict().items()}


def release_layout(name: str) -> tuple[dict[str, tuple[list[int], str]], int]:
    data = json.loads((DATA / f"release_{name}_layout.json").read_text())
    return {key: (shape, kind) for key, shape, kind in data["state_dict"]}, data["parameters"]


def test_paper_denoiser_has_the_release_layout_key_for_key():
    expected, parameters = release_layout("denoiser")
    with torch.device("meta"):
        denoiser = build_denoiser(DenoiserConfig())
    assert layout(denoiser) == expected
    assert count_parameters(denoiser) == parameters == 119_418_319


def test_paper_aux_net_is_the_release_atd_key_for_key():
    expected, parameters = release_layout("atd")
    aux = build_aux_net(AuxConfig())
    assert layout(aux.net) == expected
    assert count_parameters(aux.net) == parameters == 2_532_360


# A release options file at reduced widths (GroupNorm32 keeps 32 groups, so widths are multiples of 32).
TINY_OPTIONS = {
    "network_g": {"target": "basicsr.archs.swin_unet_arch.UNetModelSwin", "params": {
        "image_size": 64, "in_channels": 48, "model_channels": 32, "out_channels": 3,
        "attention_resolutions": [64, 32], "dropout": 0, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
        "conv_resample": True, "dims": 2, "use_fp16": False, "num_head_channels": 16, "use_scale_shift_norm": True,
        "resblock_updown": False, "swin_depth": 2, "swin_embed_dim": 32, "window_size": 8, "mlp_ratio": 2,
        "cond_lq": True, "lq_size": 64, "num_feat": 16}},
    "diffusion": {"un": 0.1, "min_noise": 0.4, "target": "models.script_util.create_gaussian_diffusion", "params": {
        "sf": 4, "schedule_name": "exponential", "schedule_kwargs": {"power": 0.2}, "etas_end": 0.99, "steps": 5,
        "min_noise_level": 0.2, "kappa": 2.5, "weighted_mse": False, "predict_type": "xstart",
        "timestep_respacing": None, "scale_factor": 1.0, "normalize_input": True, "latent_flag": False}},
    "network_mse": {"target": "basicsr.archs.atd_real_arch.ATD", "params": {
        "upscale": 4, "in_chans": 3, "img_size": 64, "embed_dim": 16, "depths": [2], "num_heads": [2],
        "window_size": 8, "category_size": 32, "num_tokens": 8, "reducted_dim": 4, "convffn_kernel_size": 3,
        "img_range": 1.0, "mlp_ratio": 1, "upsampler": "pixelshuffledirect", "resi_connection": "1conv"}},
    "val": {"chop_size": 64, "chop_stride": 48},
}


@pytest.fixture
def release_files(tmp_path):
    """Options, denoiser and aux checkpoints as the release writes them (random weights)."""
    options = tmp_path / "options.yml"
    options.write_text(yaml.safe_dump(TINY_OPTIONS))
    model = read_options(options)
    torch.manual_seed(0)
    denoiser = build_denoiser(model.denoiser_config)
    with torch.no_grad():  # zero-initialised out-convs made non-zero, so that t and every block matter
        for parameter in denoiser.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    aux = build_aux_net(model.aux_config)
    torch.save({"params_ema": denoiser.state_dict(), "params": {}}, tmp_path / "upsr.pth")
    torch.save({"params": aux.net.state_dict()}, tmp_path / "atd_real.pth")
    return {"options": options, "denoiser": tmp_path / "upsr.pth", "aux": tmp_path / "atd_real.pth",
            "denoiser_net": denoiser, "aux_net": aux, "model": model}


def test_options_map_onto_our_config(release_files):
    model = release_files["model"]
    assert model.denoiser_config == DenoiserConfig(
        image_size=64, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=32, swin_dim=32,
        swin_heads=2, window_size=8, mlp_ratio=2.0, shift_mask="release", head_channels=16)
    assert model.aux_config.arch == "ATD" and model.aux_config.options["embed_dim"] == 16
    assert (model.weight_config.tau, model.weight_config.floor) == (0.1, 0.4)
    assert model.diffusion.etas.sqrt().tolist() == pytest.approx([0.031623, 0.430011, 0.633908, 0.816602, 0.99],
                                                                 abs=1e-6)
    assert (model.inference_config.tile, model.inference_config.stride, model.inference_config.tiling) == (
        64, 48, "release")
    published = read_options(None)
    assert published.denoiser_config == DenoiserConfig() and published.aux_config == AuxConfig()


@pytest.mark.parametrize("layout_name", ["params_ema", "params", "bare with module. prefix"])
def test_the_three_checkpoint_layouts_import(release_files, tmp_path, layout_name):
    state = release_files["denoiser_net"].state_dict()
    stored = {"params_ema": {"params_ema": state, "params": {}}, "params": {"params": state},
              "bare with module. prefix": {f"module.{key}": value for key, value in state.items()}}[layout_name]
    path = tmp_path / "denoiser.pth"
    torch.save(stored, path)
    assert read_state_dict(path).keys() == state.keys()
    model = import_release(path, release_files["aux"], release_files["options"])
    for key, value in state.items():
        assert torch.equal(model.denoiser.state_dict()[key], value), key


def corrupt(state: dict, how: str) -> dict:
    state = dict(state)
    key = next(k for k in state if k.endswith("conv_last.weight"))
    if how == "missing":
        del state[key]
    elif how == "unexpected":
        state["conv_extra.weight"] = torch.zeros(1)
    elif how == "shape":
        state[key] = torch.zeros(3, 3, 1, 1)
    elif how == "buffer":
        index = next(k for k in state if k.endswith("relative_position_index"))
        state[index] = state[index].flip(0)
    return state


@pytest.mark.parametrize("how, message", [
    ("missing", "lacks key 'conv_last.weight'"),
    ("unexpected", "has unexpected key 'conv_extra.weight'"),
    ("shape", r"'conv_last.weight' has shape \(3, 3, 1, 1\)"),
    ("buffer", "relative_position_index' differs from the value the denoiser computes"),
])
def test_bad_checkpoints_are_named_and_nothing_is_written(release_files, tmp_path, how, message):
    from cli.main import main

    path = tmp_path / "bad.pth"
    torch.save({"params_ema": corrupt(release_files["denoiser_net"].state_dict(), how)}, path)
    with pytest.raises(ReleaseImportError, match=f"bad.pth: .*{message}"):
        import_release(path, release_files["aux"], release_files["options"])
    out = tmp_path / "imported"
    assert main(["import-official", "--denoiser", str(path), "--aux", str(release_files["aux"]),
                 "--options", str(release_files["options"]), "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".imported*"))


class NotATensor:
    pass


def test_pickled_objects_and_non_tensors_are_refused(tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"params": {"weight": NotATensor()}}, pickled)
    with pytest.raises(ReleaseImportError, match="pickled.pth: refused: it holds objects other than tensors"):
        read_state_dict(pickled)
    text = tmp_path / "text.pth"
    torch.save({"params": {"weight": "not a tensor"}}, text)
    with pytest.raises(ReleaseImportError, match="entry 'weight' is a str, not a tensor"):
        read_state_dict(text)
    with pytest.raises(ReleaseImportError, match="no such file"):
        read_state_dict(tmp_path / "absent.pth")


@pytest.mark.parametrize("section, key, value, message", [
    ("network_g", "attention_resolutions", [64], "network_g.params.attention_resolutions"),
    ("network_g", "num_res_blocks", [1, 2], "network_g.params.num_res_blocks"),
    ("network_g", "resblock_updown", True, "network_g.params.resblock_updown = True is not supported"),
    ("network_g", "not_an_option", 1, "network_g.params.not_an_option: unknown option"),
    ("diffusion", "predict_type", "epsilon", "diffusion.params.predict_type = 'epsilon' is not supported"),
])
def test_unsupported_options_are_named(tmp_path, section, key, value, message):
    options = json.loads(json.dumps(TINY_OPTIONS))
    options[section]["params"][key] = value
    path = tmp_path / "options.yml"
    path.write_text(yaml.safe_dump(options))
    with pytest.raises(ReleaseImportError, match=f"options.yml: {message}"):
        read_options(path)


@pytest.mark.slow
def test_import_official_end_to_end_and_register(release_files, tmp_path, monkeypatch):
    """The CLI writes a folder that ``upsr.load`` samples exactly as the in-memory release nets do,
    and registers it in MLflow."""
    import upsr
    from cli.main import main
    from upsr.inference import UPSRPipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "imported"
    assert main(["import-official", "--denoiser", str(release_files["denoiser"]), "--aux", str(release_files["aux"]),
                 "--options", str(release_files["options"]), "--out", str(out), "--register", "upsr-release"]) == 0
    assert json.loads((out / "release_source.json").read_text())["denoiser"]["file"] == "upsr.pth"

    model = release_files["model"]
    reference = UPSRPipeline(release_files["denoiser_net"].eval(), release_files["aux_net"].eval(), model.diffusion,
                             model.weight_config, model.inference_config)
    lr = torch.rand(1, 3, 80, 40)  # a side above the release's chop_size (64): tiled as the release tiles
    noise = torch.randn(1, 3, 320, 160)
    for loaded in (upsr.load(out), upsr.load("models:/upsr-release@challenger")):
        assert loaded.inference_config.tiling == "release"
        torch.testing.assert_close(loaded.upscale(lr, noise=noise), reference.upscale(lr, noise=noise),
                                   rtol=0, atol=1e-6)
    # The registered pyfunc model is code plus the checkpoint folder: nothing of it is pickled.
    import mlflow

    downloaded = Path(mlflow.artifacts.download_artifacts("models:/upsr-release/1", dst_path=str(tmp_path / "dl")))
    assert (downloaded / "MLmodel").exists() and not list(downloaded.rglob("*.pkl"))
    image = (torch.rand(16, 24, 3) * 255).to(torch.uint8).numpy()
    served = mlflow.pyfunc.load_model("models:/upsr-release@challenger").predict(image)
    assert served.shape == (64, 96, 3) and (served == upsr.load(out).upscale(image)).all()
    # An existing folder is refused, and --overwrite replaces only a checkpoint folder of ours.
    arguments = ["import-official", "--denoiser", str(release_files["denoiser"]), "--aux", str(release_files["aux"]),
                 "--options", str(release_files["options"])]
    assert main(arguments + ["--out", str(out)]) == 2
    assert main(arguments + ["--out", str(out), "--overwrite"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(arguments + ["--out", str(other), "--overwrite"]) == 2
    assert (other / "notes.txt").read_text() == "mine"
