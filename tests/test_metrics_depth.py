"""Depth controllability metric: the error definitions against direct computations, the bootstrap, the estimator's
safetensors round trip, and the shipped estimator on held-out test scenes (the test that fails if it does not work)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.metrics import MetricUnavailable, depth, stats
from codi_jax.metrics.train_depth import render_set, shuffled
from codi_jax.models.dense_unet import DenseUNet, DenseUNetConfig


def _reference_errors(pred, cond):
    """Straightforward per-image computation: pixel loops for delta1, np.linalg.lstsq for the alignment."""
    out = {"rmse": [], "si_rmse": [], "delta1": []}
    for p, c in zip(pred, cond):
        p, c = (p.astype(np.float64).ravel() + 1) / 2, (c.astype(np.float64).ravel() + 1) / 2
        out["rmse"].append(np.sqrt(np.mean((p - c) ** 2)))
        (s, t), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), c, rcond=None)
        out["si_rmse"].append(np.sqrt(np.mean((s * p + t - c) ** 2)))
        hits = 0
        for a, b in zip(0.1 + 0.9 * p, 0.1 + 0.9 * c):
            hits += max(a / b, b / a) < 1.25
        out["delta1"].append(hits / p.size)
    return {k: np.array(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def maps():
    rng = np.random.default_rng(0)
    cond = rng.uniform(-1, 1, (4, 8, 8)).astype(np.float32)
    return cond, np.clip(cond + rng.normal(0, 0.3, cond.shape), -1, 1).astype(np.float32)


def test_identical_maps_are_perfect(maps):
    cond, _ = maps
    errs = depth.depth_errors(cond, cond[..., None])  # (N, H, W, 1) is accepted like the batch's 'cond'
    np.testing.assert_allclose(errs["rmse"], 0.0, atol=1e-12)
    np.testing.assert_allclose(errs["si_rmse"], 0.0, atol=1e-7)
    np.testing.assert_array_equal(errs["delta1"], 1.0)


def test_offset_and_scale_are_forgiven_only_by_si_rmse():
    cond = np.tile(np.linspace(-1, 0.5, 8, dtype=np.float32), (2, 8, 1))  # [0, 0.75] in unit scale
    offset = depth.depth_errors(cond + 0.4, cond)  # +0.2 in unit scale
    np.testing.assert_allclose(offset["rmse"], 0.2, rtol=1e-6)
    np.testing.assert_allclose(offset["si_rmse"], 0.0, atol=1e-6)
    scaled = depth.depth_errors((cond + 1) * 0.5 - 1, cond)  # half the unit-scale map
    np.testing.assert_allclose(scaled["si_rmse"], 0.0, atol=1e-6)
    assert np.all(scaled["rmse"] > 0.1)


def test_errors_match_a_direct_computation(maps):
    cond, pred = maps
    errs, ref = depth.depth_errors(pred, cond), _reference_errors(pred, cond)
    for k in ref:
        np.testing.assert_allclose(errs[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)
    assert 0.0 < errs["delta1"].min() and errs["delta1"].max() < 1.0  # the noise moves some pixels past 1.25


def test_constant_prediction_aligns_to_the_mean():
    cond = np.random.default_rng(1).uniform(-1, 1, (3, 5, 5))
    errs = depth.depth_errors(np.zeros_like(cond), cond)
    unit = (cond + 1) / 2
    np.testing.assert_allclose(errs["si_rmse"], unit.reshape(3, -1).std(axis=1), rtol=1e-9)


def test_errors_reject_wrong_ranges_and_shapes(maps):
    cond, pred = maps
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        depth.depth_errors(pred * 255, cond)
    with pytest.raises(ValueError, match="equal shapes"):
        depth.depth_errors(pred[:, :4], cond)


def test_bootstrap_covers_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths, covered = [], 0
    for trial in range(20):
        values = rng.exponential(2.0, 200)  # true mean 2
        est, low, high = stats.bootstrap_ci(values, n_resamples=300, seed=trial)
        assert low < est < high and est == pytest.approx(values.mean())
        covered += low <= 2.0 <= high
    assert covered >= 16  # 95 % nominal: 20 trials miss more than 4 times with probability ~1.6e-2
    for n in (50, 800):
        _, low, high = stats.bootstrap_ci(rng.exponential(2.0, n), n_resamples=300)
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]  # width ~ 1/sqrt(n): a factor 4 expected
    with pytest.raises(ValueError, match="at least 2"):
        stats.bootstrap_ci([1.0])


def test_paired_bootstrap_is_narrower_than_separate_intervals():
    rng = np.random.default_rng(0)
    difficulty = rng.exponential(1.0, 300)  # shared per-image difficulty cancels in the paired difference
    a, b = difficulty + 0.1 + rng.normal(0, 0.02, 300), difficulty + rng.normal(0, 0.02, 300)
    est, low, high = stats.bootstrap_ci_paired(a, b, n_resamples=300)
    assert est == pytest.approx(a.mean() - b.mean()) and low < 0.1 < high
    _, la, ha = stats.bootstrap_ci(a, n_resamples=300)
    assert high - low < 0.1 * (ha - la)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = DenseUNetConfig(image_size=8, channels=(8, 16), norm_groups=4)
    # Random values in the initialised tree's shapes: compiling `init` (threefry) costs ~10 s on a busy CPU.
    shapes = nn.meta.unbox(jax.eval_shape(DenseUNet(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    path = depth.save_depth_estimator(tmp_path_factory.mktemp("depth") / "tiny", config, variables)
    return config, variables, path


def test_save_load_round_trip(tiny):
    config, variables, path = tiny
    module, loaded = depth.load_depth_estimator(path)
    assert module.config == config
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    got = depth.predict((module, loaded), images, batch_size=2)  # exercises the padded last batch
    np.testing.assert_array_equal(got, depth.predict((DenseUNet(config), variables), images, batch_size=2))
    assert got.shape == (3, 8, 8) and got.dtype == np.float32
    direct = DenseUNet(config).apply(variables, jnp.asarray(images, jnp.float32) / 127.5 - 1)[..., 0]
    np.testing.assert_allclose(got, np.asarray(direct), atol=1e-5)  # jit and batching change only rounding
    np.testing.assert_array_equal(depth.predict((module, loaded), images.astype(np.float32) / 127.5 - 1, batch_size=2),
                                  got)


def test_predict_refuses_another_image_size(tiny):
    model = depth.load_depth_estimator(tiny[2])
    with pytest.raises(ValueError, match="trained at 8x8, got 16x16"):
        depth.predict(model, np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        depth.predict(model, np.full((1, 8, 8, 3), 255.0, np.float32))


def test_missing_or_mismatched_weights(tiny, tmp_path):
    with pytest.raises(MetricUnavailable, match="missing model.safetensors, config.json"):
        depth.load_depth_estimator(tmp_path)
    config, variables, path = tiny
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "channels": [8, 24]}))
    from codi_jax.weights.convert import WeightsMismatchError
    with pytest.raises(WeightsMismatchError, match="wrong shape"):
        depth.load_depth_estimator(tmp_path)


@pytest.fixture(scope="module")
def shipped():
    model = depth.load_depth_estimator()  # the shipped weights; a missing file fails here, it is not skipped
    images, cond = render_set("test", 0, 32, model[0].config.image_size)
    return depth.predict(model, images), cond


def test_shipped_estimator_reads_depth_from_held_out_scenes(shipped):
    pred, cond = shipped
    own = {k: v.mean() for k, v in depth.depth_errors(pred, cond).items()}
    chance = {k: v.mean() for k, v in depth.depth_errors(pred, shuffled(cond)).items()}
    const = {k: v.mean() for k, v in depth.depth_errors(np.broadcast_to(cond.mean(0), cond.shape), cond).items()}
    # Scene maps share a ground-plane gradient, so another scene's map is already a fair guess; the estimator must
    # be far better than that and than the best constant map (the test set's own mean, an optimistic baseline).
    assert own["rmse"] < 0.5 * chance["rmse"] and own["rmse"] < 0.5 * const["rmse"], (own, chance, const)
    assert own["si_rmse"] < 0.5 * chance["si_rmse"], (own, chance)
    assert own["delta1"] > chance["delta1"] + 0.1, (own, chance)
    assert own["rmse"] < 0.06, own
