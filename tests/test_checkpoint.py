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
    config_path = tiny_checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["denoiser"]["model_channels"] = 16
    config_path.write_text(json.dumps(config))
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


def test_config_values_are_checked_on_load(tiny_checkpoint):
    config_path = tiny_checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["denoiser"]["window_sizes"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*window_sizes"):
        load_checkpoint(tiny_checkpoint)


def test_a_pickle_in_place_of_the_weights_is_refused_not_unpickled(tiny_checkpoint):
    import hashlib

    weights = tiny_checkpoint / "weights.safetensors"
    torch.save({"denoiser.input_conv.weight": torch.zeros(1)}, weights)
    format_path = tiny_checkpoint / "format.json"
    info = json.loads(format_path.read_text())
    info["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # a consistent forgery
    format_path.write_text(json.dumps(info))
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
