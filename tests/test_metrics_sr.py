"""SR metrics against scikit-image (MATLAB rgb2ycbcr luma, PSNR, Gaussian SSIM) on BasicSR's conventions."""

import numpy as np
import pytest
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from codi_jax.metrics import sr

SCALE = 4


def _ssim(a, b, **kw):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                 **kw)


@pytest.fixture(scope="module")
def images():
    """Smooth-ish 32x32 targets, noisy outputs and the targets' area-downsampled low-res inputs, float32 in [0, 1]."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 1, (3, 8, 8, 3))
    real = np.clip(0.7 * coarse.repeat(4, 1).repeat(4, 2) + 0.3 * rng.uniform(0, 1, (3, 32, 32, 3)), 0, 1)
    fake = np.clip(real + rng.normal(0, [[[[0.03]]], [[[0.1]]], [[[0.25]]]], real.shape), 0, 1)
    lowres = real.reshape(3, 8, 4, 8, 4, 3).mean(axis=(2, 4))
    return fake.astype(np.float32), real.astype(np.float32), lowres.astype(np.float32)


@pytest.fixture(scope="module")
def scores(images):
    fake, real, lowres = images
    return sr.sr_scores(fake, real, lowres, scale=SCALE)


def test_rgb_to_y_matches_matlab_rgb2ycbcr():
    rgb = np.random.default_rng(1).uniform(0, 1, (2, 5, 7, 3)).astype(np.float32)
    rgb[0, 0, 0], rgb[0, 0, 1] = 0.0, 1.0  # black -> 16/255, white -> 235/255
    y = sr.rgb_to_y(rgb)
    assert y.shape == (2, 5, 7, 1)
    np.testing.assert_allclose(y[..., 0], rgb2ycbcr(rgb.astype(np.float64))[..., 0] / 255.0, atol=1e-5)
    np.testing.assert_allclose(y[0, 0, :2, 0], [16 / 255, 235 / 255], atol=1e-5)


def test_y_and_rgb_scores_match_skimage_on_cropped_images(images, scores):
    fake, real, _ = images
    assert set(scores) == {"psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y", "lr_rmse"}
    for i in range(len(fake)):
        f, r = fake[i, SCALE:-SCALE, SCALE:-SCALE].astype(np.float64), real[i, SCALE:-SCALE, SCALE:-SCALE]
        r = r.astype(np.float64)
        assert f.shape == (24, 24, 3)
        fy, ry = rgb2ycbcr(f)[..., 0] / 255.0, rgb2ycbcr(r)[..., 0] / 255.0
        assert scores["psnr_y"][i] == pytest.approx(peak_signal_noise_ratio(ry, fy, data_range=1.0), abs=1e-4)
        assert scores["ssim_y"][i] == pytest.approx(_ssim(fy, ry), abs=1e-5)
        assert scores["psnr_rgb"][i] == pytest.approx(peak_signal_noise_ratio(r, f, data_range=1.0), abs=1e-4)
        assert scores["ssim_rgb"][i] == pytest.approx(_ssim(f, r, channel_axis=-1), abs=1e-5)
    # The noise levels rise across the batch, so the scores must fall: per-image values, not a batch mean.
    for key in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
        assert scores[key].shape == (3,) and scores[key].dtype == np.float64
        assert np.all(np.diff(scores[key]) < 0), (key, scores[key])


def test_crop_border_changes_the_region_scored(images, scores):
    fake, real, lowres = images
    uncropped = sr.sr_scores(fake, real, lowres, scale=SCALE, crop_border=0)
    ref = peak_signal_noise_ratio(real[0].astype(np.float64), fake[0].astype(np.float64), data_range=1.0)
    assert uncropped["psnr_rgb"][0] == pytest.approx(ref, abs=1e-3)
    assert uncropped["psnr_rgb"][0] != pytest.approx(scores["psnr_rgb"][0], abs=1e-3)
    np.testing.assert_array_equal(uncropped["lr_rmse"], scores["lr_rmse"])  # lr_rmse is never cropped


def test_lr_rmse_zero_for_nearest_upsampling_and_exact_for_a_perturbation(images):
    _, real, lowres = images
    nearest = lowres.repeat(SCALE, 1).repeat(SCALE, 2)
    assert np.all(sr.sr_scores(nearest, real, lowres, scale=SCALE)["lr_rmse"] < 1e-6)
    # +0.1 on one pixel of image 1 moves one low-res pixel of one channel by 0.1 / 16.
    bumped = nearest.copy()
    bumped[1, 5, 9, 2] += 0.1
    want = np.sqrt((0.1 / SCALE ** 2) ** 2 / (8 * 8 * 3))
    got = sr.sr_scores(bumped, real, lowres, scale=SCALE)["lr_rmse"]
    np.testing.assert_allclose(got, [0.0, want, 0.0], atol=1e-7)
    # The area-downsampled ground truth is consistent with these inputs (the fixture built them that way).
    assert np.all(sr.sr_scores(real, real, lowres, scale=SCALE)["lr_rmse"] < 1e-6)


def test_downsample_is_block_mean():
    const = np.full((2, 12, 8, 3), 0.37, np.float32)
    out = sr.downsample(const, 4)
    assert out.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(out, 0.37, atol=1e-7)
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) / 16
    np.testing.assert_allclose(sr.downsample(x, 2)[0, ..., 0], np.array([[2.5, 4.5], [10.5, 12.5]]) / 16)
    np.testing.assert_allclose(sr.downsample(np.full((1, 4, 4, 3), 51, np.uint8), 2), 0.2, atol=1e-7)  # 51 / 255
    with pytest.raises(ValueError, match=r"scale=3.*\(2, 12, 8, 3\)"):
        sr.downsample(const, 3)


def test_uint8_and_float_inputs_agree(images):
    fake, real, lowres = images
    q = [np.round(a * 255).astype(np.uint8) for a in (fake, real, lowres)]
    from_uint8 = sr.sr_scores(*q, scale=SCALE)
    from_float = sr.sr_scores(*[a.astype(np.float32) / 255 for a in q], scale=SCALE)
    for key in sr.SCORE_NAMES:
        np.testing.assert_allclose(from_uint8[key], from_float[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_crop_errors_name_the_shapes():
    x = np.zeros((1, 16, 20, 3), np.float32)
    with pytest.raises(ValueError, match=r"crop_border=3 leaves 10x14 of images of shape \(1, 16, 20, 3\)"):
        sr.crop(x, 3)
    with pytest.raises(ValueError, match=r"crop_border=8 leaves 0x4"):
        sr.crop(x, 8)
    with pytest.raises(ValueError, match="crop_border must be an integer"):
        sr.crop(x, -1)
    assert sr.crop(x, 2).shape == (1, 12, 16, 3)
    lowres = np.zeros((1, 4, 5, 3), np.float32)
    with pytest.raises(ValueError, match=r"crop_border=4 leaves 8x12"):
        sr.sr_scores(x, x, lowres, scale=4)


def test_shape_errors_name_the_shapes(images):
    fake, real, lowres = images
    with pytest.raises(ValueError, match=r"fake \(3, 32, 32, 3\), real \(2, 32, 32, 3\), lowres \(3, 8, 8, 3\)"):
        sr.sr_scores(fake, real[:2], lowres, scale=SCALE)
    with pytest.raises(ValueError, match=r"lowres \(3, 16, 16, 3\)"):
        sr.sr_scores(fake, real, lowres.repeat(2, 1).repeat(2, 2), scale=SCALE)
    with pytest.raises(ValueError, match=r"scale=3.*fake \(3, 32, 32, 3\)"):
        sr.sr_scores(fake, real, lowres, scale=3)
    with pytest.raises(ValueError, match=r"scale must be an integer >= 1, got 0"):
        sr.sr_scores(fake, real, lowres, scale=0)
