"""The degradation pipeline: records, replay, and the behaviour of each stage."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import skimage.data
import torch

import basicsr_compat  # noqa: F401
from basicsr.data.degradations import add_poisson_noise_pt
from degradations import DegradationConfig, Degrader, apply, build_kernel, sample
from degradations.degrader import poisson_noise
from tests.support import photo

PRIMITIVES = ["opencv", "basicsr"]
KERNEL_SPECS = [
    {"type": "iso", "size": 7, "sigma_x": 1.3, "sigma_y": 1.3, "theta": 0.0, "beta": None, "pad_to": 21},
    {"type": "aniso", "size": 19, "sigma_x": 2.8, "sigma_y": 0.6, "theta": 0.7, "beta": None, "pad_to": 21},
    {"type": "generalized_aniso", "size": 11, "sigma_x": 1.9, "sigma_y": 1.1, "theta": -2.0, "beta": 0.7,
     "pad_to": 21},
    {"type": "plateau_iso", "size": 13, "sigma_x": 2.2, "sigma_y": 2.2, "theta": 0.0, "beta": 1.5, "pad_to": 15},
    {"type": "sinc", "size": 9, "cutoff": 1.4, "pad_to": 21},
]


@pytest.fixture(scope="module")
def crops():
    return np.stack([photo(256, 256, seed) for seed in range(6)])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0


@pytest.mark.parametrize("primitives", PRIMITIVES)
@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: s["type"])
def test_blurring_a_delta_image_returns_the_kernel(primitives, spec):
    kernel = build_kernel(spec)
    size = kernel.shape[0]
    delta = torch.zeros(1, 3, 48, 48)
    delta[..., 24, 24] = 1.0
    out = Degrader(primitives).blur(delta, kernel[None])
    half = size // 2
    # The kernels are point-symmetric, so correlation and convolution agree; 1e-6 is float32 rounding.
    np.testing.assert_allclose(out[0, 1, 24 - half:24 + half + 1, 24 - half:24 + half + 1].numpy(), kernel, atol=1e-6)
    assert out[0].sum().item() == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: s["type"])
def test_opencv_blur_equals_basicsr_filter2d(spec):
    image = to_tensor(photo(120, 90, 3))
    kernel = build_kernel(spec)[None]
    fast = Degrader("opencv").blur(image, kernel)
    reference = Degrader("basicsr").blur(image, kernel)
    # Same kernel, same reflect padding; OpenCV sums in a different order (DFT for large kernels).
    assert torch.max(torch.abs(fast - reference)).item() < 1e-5


@pytest.mark.parametrize("primitives", PRIMITIVES)
def test_jpeg_error_shrinks_as_quality_rises(primitives):
    image = to_tensor(photo(128, 128, 4))
    degrader = Degrader(primitives)
    errors = [torch.mean((degrader.jpeg(image, q) - image) ** 2).item() for q in (30, 50, 70, 90)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 2


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "rocket"])
def test_real_jpeg_matches_diffjpeg_at_the_same_quality(name):
    image = to_tensor(np.ascontiguousarray(getattr(skimage.data, name)()[:256, :256]))
    real, approx = Degrader("opencv"), Degrader("basicsr")
    for quality in (30, 60, 95):
        real_out, approx_out = real.jpeg(image, quality), approx.jpeg(image, quality)
        real_error = torch.mean((real_out - image) ** 2).item()
        approx_error = torch.mean((approx_out - image) ** 2).item()
        # Same quantisation tables and 4:2:0 subsampling. libjpeg's smoother chroma upsampling
        # loses up to ~17 % less than DiffJPEG's pixel repetition on these photographs (measured
        # 0.83-1.0); allow 20 %. The two decodes are closer to each other (33-43 dB) than either
        # is to the original at low quality.
        assert real_error == pytest.approx(approx_error, rel=0.20)
        psnr_between = -10 * math.log10(torch.mean((real_out - approx_out) ** 2).item())
        assert psnr_between > 32


@pytest.mark.parametrize("gray", [False, True])
def test_gaussian_noise_has_the_requested_standard_deviation(gray):
    flat = torch.full((1, 3, 256, 256), 0.5)
    noisy = Degrader().add_noise(flat, {"kind": "gaussian", "sigma": 20.0, "gray": gray, "seed": 11})
    noise = noisy - flat
    # 196,608 samples: the std estimate's relative standard error is 1/sqrt(2N) = 0.16 %; allow 1 %.
    assert noise.std().item() == pytest.approx(20.0 / 255.0, rel=0.01)
    assert abs(noise.mean().item()) < 5 * (20.0 / 255.0) / math.sqrt(noise.numel())
    channels_equal = torch.equal(noise[:, 0], noise[:, 1]) and torch.equal(noise[:, 1], noise[:, 2])
    assert channels_equal == gray


@pytest.mark.parametrize("gray", [False, True])
def test_fast_poisson_noise_is_basicsrs_noise(gray):
    image = to_tensor(photo(90, 70, 6))
    torch.manual_seed(5)
    reference = add_poisson_noise_pt(image, scale=1.7, gray_noise=1.0 if gray else 0.0, clip=True, rounds=False)
    torch.manual_seed(5)
    fast = torch.clamp(image + poisson_noise(image, 1.7, gray), 0, 1)
    assert torch.equal(fast, reference)


def test_same_seed_same_record_and_bytes_different_seeds_differ(crops):
    records = [sample(seed) for seed in (1, 2, 3)]
    assert records[0] == sample(1)
    assert json.loads(json.dumps(records[0])) == records[0]
    assert records[0] != records[1]
    first = apply(crops[:3], records)
    again = apply(crops[:3], [json.loads(json.dumps(r)) for r in records])
    assert np.array_equal(first, again)
    other = apply(crops[:3], [sample(seed) for seed in (4, 5, 6)])
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("primitives", PRIMITIVES)
def test_output_is_uint8_and_a_quarter_of_the_size(crops, primitives):
    lr = Degrader(primitives).apply(crops[:3], [sample(seed) for seed in range(3)])
    assert lr.dtype == np.uint8 and lr.shape == (3, 64, 64, 3)
    assert lr.std() > 5  # an image, not a constant


def test_record_frequencies_follow_the_configured_probabilities():
    config = DegradationConfig()
    records = [sample(seed, config) for seed in range(3000)]
    kinds = Counter(r["stage1"]["kernel"]["type"] for r in records)
    n = len(records)
    # Sinc replaces a blur kernel with probability 0.1; the rest follow kernel_prob. 4 binomial stds.
    for kind, prob in zip(config.kernel_list, config.kernel_prob):
        expected = n * (1 - config.sinc_prob) * prob
        assert abs(kinds[kind] - expected) < 4 * math.sqrt(expected) + 1, kind
    assert abs(kinds["sinc"] - n * config.sinc_prob) < 4 * math.sqrt(n * 0.1 * 0.9)
    assert all(r["stage2"] is not None for r in records)  # UPSR always applies stage 2
    no_blur2 = sum(r["stage2"]["kernel"] is None for r in records)
    assert abs(no_blur2 - n * 0.2) < 4 * math.sqrt(n * 0.2 * 0.8)
    qualities = [r["stage1"]["jpeg_quality"] for r in records]
    assert min(qualities) == 30 and max(qualities) == 95
    resize = Counter(r["stage1"]["resize"]["direction"] for r in records)
    assert abs(resize["down"] - 0.7 * n) < 4 * math.sqrt(n * 0.7 * 0.3)
    sizes = {r["stage1"]["kernel"]["size"] for r in records}
    assert sizes == set(range(3, 20, 2))


def test_resshift_second_order_probability_is_a_config_value():
    config = DegradationConfig(second_order_prob=0.5)
    skipped = sum(sample(seed, config)["stage2"] is None for seed in range(1000))
    assert abs(skipped - 500) < 4 * math.sqrt(250)


def test_both_primitive_sets_give_the_same_degradation_strength(crops):
    # Real JPEG vs DiffJPEG and DFT vs direct filtering must not shift the data distribution:
    # the mean fidelity of LR to a clean downscale agrees within 0.5 dB over 24 records.
    records = [sample(seed) for seed in range(100, 124)]
    hr = np.concatenate([crops] * 4)
    clean = torch.nn.functional.interpolate(torch.from_numpy(hr).permute(0, 3, 1, 2).float(), scale_factor=0.25,
                                            mode="area").permute(0, 2, 3, 1).numpy()

    def mean_psnr(lr):
        mse = ((lr.astype(np.float64) - clean) ** 2).mean(axis=(1, 2, 3))
        return float(np.mean(10 * np.log10(255.0**2 / mse)))

    assert mean_psnr(Degrader("opencv").apply(hr, records)) == pytest.approx(
        mean_psnr(Degrader("basicsr").apply(hr, records)), abs=0.5)


def test_bad_inputs_are_refused(crops):
    with pytest.raises(ValueError, match="records"):
        apply(crops[:2], [sample(0)])
    with pytest.raises(ValueError, match="uint8"):
        apply(crops[:1].astype(np.float32), [sample(0)])
    with pytest.raises(ValueError, match="version"):
        apply(crops[:1], [{**sample(0), "version": 99}])
    with pytest.raises(ValueError, match="CPU"):
        Degrader("opencv", "cuda")
