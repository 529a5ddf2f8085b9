"""PSNR/SSIM against tf.image.psnr / tf.image.ssim (same window, constants and valid-region mean)."""

import jax
import numpy as np
import pytest

from codi_jax.metrics import image


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf
    return tf


def _pair(rng, shape, noise):
    h, w = shape[-3], shape[-2]
    coarse = rng.uniform(0, 1, (*shape[:-3], h // 4 + 1, w // 4 + 1, shape[-1]))
    x = coarse.repeat(4, -3).repeat(4, -2)[..., :h, :w, :]
    x = np.clip(0.8 * x + 0.2 * rng.uniform(0, 1, shape), 0, 1)
    y = np.clip(x + rng.normal(0, noise, shape), 0, 1)
    return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_float_images_match_tensorflow(tf, noise):
    rng = np.random.default_rng(0)
    x, y = _pair(rng, (3, 40, 33, 3), noise)
    ours_ssim = np.asarray(image.ssim(x, y, data_range=1.0))
    ref_ssim = tf.image.ssim(x, y, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03).numpy()
    ours_psnr = np.asarray(image.psnr(x, y, data_range=1.0))
    ref_psnr = tf.image.psnr(x, y, max_val=1.0).numpy()
    print(f"\nnoise {noise}: SSIM {ours_ssim} max diff {np.abs(ours_ssim - ref_ssim).max():.2e}; "
          f"PSNR {ours_psnr} max diff {np.abs(ours_psnr - ref_psnr).max():.2e}")
    np.testing.assert_allclose(ours_ssim, ref_ssim, atol=1e-4)
    np.testing.assert_allclose(ours_psnr, ref_psnr, atol=1e-4)
    assert ours_ssim.shape == (3,) and np.all(ours_ssim < 0.999)


def test_uint8_grayscale_and_batch_dims_match_tensorflow(tf):
    rng = np.random.default_rng(1)
    x, y = _pair(rng, (2, 2, 24, 30, 1), 0.1)
    x8, y8 = np.round(x * 255).astype(np.uint8), np.round(y * 255).astype(np.uint8)
    ours_ssim = np.asarray(image.ssim(x8, y8, data_range=255))
    ref_ssim = tf.image.ssim(x8.astype(np.float32), y8.astype(np.float32), max_val=255.0).numpy()
    ours_psnr = np.asarray(image.psnr(x8, y8, data_range=255))
    ref_psnr = tf.image.psnr(x8, y8, max_val=255).numpy()
    assert ours_ssim.shape == (2, 2)
    np.testing.assert_allclose(ours_ssim, ref_ssim, atol=1e-4)
    np.testing.assert_allclose(ours_psnr, ref_psnr, atol=1e-4)


def test_psnr_closed_form_identity_and_jit():
    x = np.zeros((1, 16, 16, 3), np.float32)
    y = np.full_like(x, 0.1)  # MSE 0.01 -> 20 dB
    assert float(image.psnr(x, y)[0]) == pytest.approx(20.0, abs=1e-4)
    assert np.isinf(float(image.psnr(x, x)[0]))
    rng = np.random.default_rng(2)
    a, b = _pair(rng, (2, 16, 16, 3), 0.1)
    assert np.asarray(image.ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
    jitted = jax.jit(image.ssim)(a, b)
    np.testing.assert_allclose(jitted, image.ssim(a, b), atol=1e-6)


def test_bad_input_raises():
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="equal shapes"):
        image.ssim(x, x[..., :2])
    with pytest.raises(ValueError, match="at least 11x11"):
        image.ssim(np.zeros((1, 8, 16, 3)), np.zeros((1, 8, 16, 3)))
    with pytest.raises(ValueError, match="data_range=255"):
        image.psnr(x.astype(np.uint8), x.astype(np.uint8), data_range=1.0)
    with pytest.raises(ValueError, match="NHWC"):
        image.as_unit_float(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image.as_unit_float(np.full((1, 4, 4, 3), 255.0))
    np.testing.assert_array_equal(image.as_unit_float(np.full((1, 2, 2, 3), 255, np.uint8)), 1.0)
