"""The paper's no-reference metrics through pyiqa (upsr.no_reference_metrics), without Ray.

The weights here are RANDOM (tests.support.write_random_iqa_weights: pyiqa's own networks, seeded
random initialisation, saved under the file names the lookup expects), so the scores show that each
metric is built from local files and scores images; their values are not the paper's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import photo, write_random_iqa_weights
from upsr.no_reference_metrics import NAMES, NoReferenceMetrics, resolve, weight_files


def as_batch(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """RANDOM weights of all four metrics in one folder, and timm's ViT-B/8 (MANIQA's trunk) in a
    Hugging Face cache of its own, which huggingface_hub uses while these tests run."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("iqa")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(root / "hf"))
        yield write_random_iqa_weights(root / "weights", NAMES, root / "hf")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_metric_builds_from_random_weights_and_scores_deterministically(random_weights, name):
    """RANDOM weights: finite scores, the same for the same image, different for another one."""
    plan = resolve([name], random_weights)
    assert plan.not_computed == {} and set(plan.files) == {name}
    assert all(Path(path).is_file() for path in plan.files[name].values())
    # MANIQA on one 224x224 crop instead of pyiqa's 20: a ViT-B/8 pass takes seconds on a CPU core.
    metrics = NoReferenceMetrics(plan.files, options={"maniqa": {"test_sample": 1}})
    first, second = photo(192, 200, 1), photo(192, 200, 2)
    both = metrics(as_batch(first, second))[name]
    again = metrics(as_batch(first))[name]
    assert both.dtype == torch.float64 and both.shape == (2,)
    assert all(math.isfinite(value) for value in both.tolist())
    assert again[0].item() == pytest.approx(both[0].item(), rel=1e-5, abs=1e-6)
    assert both[0].item() != pytest.approx(both[1].item(), rel=1e-4, abs=1e-6)


def test_missing_weights_are_not_computed_naming_the_paths_looked_for(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    folder = tmp_path / "empty"
    plan = resolve(NAMES, folder)
    assert plan.not_computed["clipiqa"] == f"weights not found at {folder / 'RN50.pt'}"
    assert plan.not_computed["musiq"] == f"weights not found at {folder / 'musiq_koniq_ckpt-e95806b9.pth'}"
    trunk = tmp_path / "hf" / "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"
    assert plan.not_computed["maniqa"] == f"weights not found at {folder / 'ckpt_koniq10k.pt'}, {trunk}"
    # NIQE's pristine model falls back to basicsr's copy: still computed.
    assert plan.files == {"niqe": {}} and "basicsr" in plan.describe()["niqe"]
    # Without a folder: where pyiqa itself keeps them.
    hub = Path(torch.hub.get_dir())
    assert weight_files("musiq")["weights"] == hub / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"
    assert weight_files("clipiqa")["backbone"] == hub / "clip" / "RN50.pt"


def test_niqe_without_its_file_uses_basicsrs_pristine_model_nan_when_flat_or_small():
    import basicsr_compat  # noqa: F401  (must precede basicsr)
    from basicsr.metrics.niqe import calculate_niqe

    image = photo(192, 224, 3)
    niqe = NoReferenceMetrics(resolve(["niqe"], "/nonexistent").files)
    scores = niqe(torch.cat([as_batch(image), torch.full((1, 3, 192, 224), 0.5)]))["niqe"]
    # pyiqa's and basicsr's implementations differ in details, not in the model: within a few percent.
    assert scores[0].item() == pytest.approx(calculate_niqe(image[..., ::-1], crop_border=0), rel=0.03)
    assert math.isnan(scores[1].item())
    assert math.isnan(niqe(as_batch(image)[..., :191, :])["niqe"].item())


def test_an_unknown_metric_is_a_config_error_naming_the_key():
    from pipelines import config as config_module
    from upsr.config_loader import ConfigError

    assert config_module.load(None, []).evaluate.no_reference_metrics == NAMES
    with pytest.raises(ConfigError, match=r"evaluate\.no_reference_metrics\[1\]: 'brisque' is not one of"):
        config_module.load(None, ["evaluate.no_reference_metrics=[musiq, brisque]"])
