"""The checkpoint folder: round trip through upsr.load, tampering and foreign folders, URI resolvers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import upsr
from upsr import checkpoint
from upsr.checkpoint import CheckpointError, load_checkpoint, register_uri_resolver
from upsr.inference import UPSRPipeline


def test_round_trip_gives_identical_outputs(tiny_checkpoint, tiny_parts, tiny_config):
    denoiser, aux_net, diffusion = tiny_parts  # the fixture saved exactly these networks
    in_memory = UPSRPipeline(denoiser, aux_net, diffusion, tiny_config.weight, tiny_config.inference)
    loaded = upsr.load(tiny_checkpoint)
    assert isinstance(loaded, upsr.UPSRPipeline)
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == [
        "config.json", "format.json", "schedule.json", "weights.safetensors"]
    torch.testing.assert_close(loaded.diffusion.etas, diffusion.etas, rtol=0, atol=0)
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = in_memory.upscale(lr)
    assert torch.equal(loaded.upscale(lr), expected)
    assert expected.std() > 0  # the checkpoint's output conv is not zero: outputs carry the weights


def test_truncated_weights_are_detected(tiny_checkpoint):
    weights = tiny_checkpoint / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="weights.safetensors.*truncated or modified"):
        load_checkpoint(tiny_checkpoint)


def test_weights_that_do_not_fit_the_config_are_detected(tiny_checkpoint):
    edit_config(tiny_checkpoint, lambda c: c["denoiser"].update(model_channels=16))
    forge(tiny_checkpoint, "config.json")
    with pytest.raises(CheckpointError, match="weights.safetensors does not fit .*config.json"):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("missing", ["config.json", "schedule.json", "weights.safetensors", "format.json"])
def test_a_missing_file_is_named(tiny_checkpoint, missing):
    (tiny_checkpoint / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing} is missing"):
        load_checkpoint(tiny_checkpoint)


def test_version_mismatch_and_foreign_folders(tiny_checkpoint, tmp_path):
    format_path = tiny_checkpoint / "format.json"
    info = json.loads(format_path.read_text())
    format_path.write_text(json.dumps({**info, "version": 99}))
    with pytest.raises(CheckpointError, match="format.json: format version 99 is not supported"):
        load_checkpoint(tiny_checkpoint)

    foreign = tmp_path / "some-other-model"
    foreign.mkdir()
    (foreign / "format.json").write_text(json.dumps({"format": "diffusers", "version": 1}))
    with pytest.raises(CheckpointError, match="format.json: format is 'diffusers'"):
        load_checkpoint(foreign)
    (foreign / "format.json").write_text("not json")
    with pytest.raises(CheckpointError, match="format.json is not valid JSON"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def forge(folder, name: str) -> None:
    """Record ``name``'s current checksum in format.json: a consistent forgery, as someone with
    write access to the storage could make."""
    import hashlib

    format_path = folder / "format.json"
    info = json.loads(format_path.read_text())
    info["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    format_path.write_text(json.dumps(info))


def edit_config(folder, edit) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("name, edit", [
    ("config.json", lambda folder: edit_config(folder, lambda c: c["inference"].update(sampler="ancestral"))),
    ("config.json", lambda folder: edit_config(folder, lambda c: c["weight"].update(tau=0.5))),
    ("schedule.json", lambda folder: (folder / "schedule.json").write_text('{"etas": [0.5, 0.9], "kappa": 1.0}')),
])
def test_every_file_is_checked_against_its_checksum(tiny_checkpoint, name, edit):
    edit(tiny_checkpoint)
    with pytest.raises(CheckpointError, match=f"{name} does not match the checksum"):
        load_checkpoint(tiny_checkpoint)


def test_config_values_are_checked_on_load(tiny_checkpoint):
    edit_config(tiny_checkpoint, lambda c: c["denoiser"].update(window_sizes=8))
    forge(tiny_checkpoint, "config.json")
    with pytest.raises(CheckpointError, match="config.json.*window_sizes"):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["denoiser"].update(model_channels=20480, norm_groups=32), "denoiser section asks for .* parameters"),
    (lambda c: c["aux"].update(arch="NoSuchNet"), "aux section does not describe a network.*NoSuchNet"),
    (lambda c: c["aux"]["options"].update(num_feet=3), "aux section does not describe a network"),
    (lambda c: c["aux"].update(options={**c["aux"]["options"], "num_feat": 2**20}), "aux section asks for"),
])
def test_a_forged_config_fails_before_allocating(tiny_checkpoint, edit, message):
    edit_config(tiny_checkpoint, edit)
    forge(tiny_checkpoint, "config.json")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tiny_checkpoint)


def test_a_weights_path_in_a_forged_config_is_ignored(tiny_checkpoint):
    edit_config(tiny_checkpoint, lambda c: c["aux"].update(weights="/nonexistent/aux.pth"))
    forge(tiny_checkpoint, "config.json")
    assert load_checkpoint(tiny_checkpoint).upscale(np.zeros((16, 16, 3), np.uint8)).shape == (64, 64, 3)


def test_a_pickle_in_place_of_the_weights_is_refused_not_unpickled(tiny_checkpoint):
    weights = tiny_checkpoint / "weights.safetensors"
    torch.save({"denoiser.input_conv.weight": torch.zeros(1)}, weights)
    forge(tiny_checkpoint, "weights.safetensors")
    with pytest.raises(CheckpointError, match="weights.safetensors cannot be read"):
        load_checkpoint(tiny_checkpoint)


def test_uri_schemes_need_a_registered_resolver(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_URI_RESOLVERS", {})
    with pytest.raises(CheckpointError, match="no resolver is registered for models: URIs"):
        upsr.load("models:/upsr@champion")

    copy = tmp_path / "downloaded"
    shutil.copytree(tiny_checkpoint, copy)
    requested = []
    register_uri_resolver("models:/", lambda uri: (requested.append(uri), copy)[1])
    pipeline = upsr.load("models:/upsr@champion")
    assert requested == ["models:/upsr@champion"]
    out = pipeline.upscale(np.zeros((16, 16, 3), np.uint8))
    assert out.shape == (64, 64, 3)
