"""Inpainting metrics (codi_jax/metrics/inpaint.py) against scikit-image and hand-computed values, and the inpaint
row's metrics as evaluate calls them."""

import types

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from codi_jax import tasks
from codi_jax.metrics import inpaint
from codi_jax.tasks import inpaint as inpaint_task


@pytest.fixture(scope="module")
def images():
    """Three smooth 24x24 targets, outputs with noise rising across the batch, and holes: a box, a box touching the
    image's corner (where the SSIM map's window is reflected) and a free-form mask."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 1, (3, 6, 6, 3))
    real = np.clip(0.7 * coarse.repeat(4, 1).repeat(4, 2) + 0.3 * rng.uniform(0, 1, (3, 24, 24, 3)), 0, 1)
    fake = np.clip(real + rng.normal(0, [[[[0.02]]], [[[0.08]]], [[[0.2]]]], real.shape), 0, 1)
    hole = np.zeros((3, 24, 24), bool)
    hole[0, 6:14, 8:20] = True
    hole[1, :9, :7] = True
    hole[2] = rng.uniform(size=(24, 24)) < 0.3
    return fake.astype(np.float32), real.astype(np.float32), hole


def test_region_psnr_matches_skimage_on_the_regions_pixels(images):
    fake, real, hole = images
    scores = inpaint.inpaint_scores(fake, real, hole)
    for i in range(3):
        f, r = fake[i].astype(np.float64), real[i].astype(np.float64)
        want_hole = peak_signal_noise_ratio(r[hole[i]], f[hole[i]], data_range=1.0)
        want_known = peak_signal_noise_ratio(r[~hole[i]], f[~hole[i]], data_range=1.0)
        assert scores["psnr_hole"][i] == pytest.approx(want_hole, abs=1e-9)
        assert scores["psnr_known"][i] == pytest.approx(want_known, abs=1e-9)
    assert np.all(np.diff(scores["psnr_hole"]) < 0) and np.all(np.diff(scores["psnr_known"]) < 0)  # per image


def test_hole_ssim_is_skimages_full_ssim_map_averaged_over_the_hole(images):
    fake, real, hole = images
    got = inpaint.hole_ssim(fake, real, hole)
    for i in range(3):
        _, full = structural_similarity(fake[i].astype(np.float64), real[i].astype(np.float64), full=True,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                        channel_axis=-1)
        assert got[i] == pytest.approx(full.mean(axis=-1)[hole[i]].mean(), abs=1e-9)
    assert np.all(np.diff(got) < 0)
    # Not the whole image's SSIM: the hole's own pixels only.
    assert got[0] != pytest.approx(inpaint.ssim_map(fake, real)[0].mean(), abs=1e-4)


def test_ground_truth_scores_the_cap_and_a_changed_hole_leaves_the_known_region_exact(images):
    _, real, hole = images
    same = inpaint.inpaint_scores(real, real, hole)
    np.testing.assert_array_equal(same["psnr_known"], inpaint.PSNR_CAP)
    np.testing.assert_array_equal(same["psnr_hole"], inpaint.PSNR_CAP)
    np.testing.assert_allclose(same["ssim_hole"], 1.0, atol=1e-12)
    filled = np.where(hole[..., None], 1.0 - real, real)  # only the hole changes
    changed = inpaint.inpaint_scores(filled, real, hole)
    np.testing.assert_array_equal(changed["psnr_known"], inpaint.PSNR_CAP)
    assert np.all(changed["psnr_hole"] < 20) and np.all(changed["ssim_hole"] < 0.9)
    # One uint8 level off in one pixel of the known region is a finite PSNR below the cap, not the cap.
    u8 = np.round(real * 255).astype(np.uint8)
    nudged = u8.copy()
    nudged[0, 23, 23, 0] += 1 if nudged[0, 23, 23, 0] < 255 else -1
    known = inpaint.region_psnr(nudged, u8, ~hole)
    n = 3 * (~hole[0]).sum()
    assert known[0] == pytest.approx(10 * np.log10(n * 255.0 ** 2), abs=1e-9) and known[0] < inpaint.PSNR_CAP
    np.testing.assert_array_equal(known[1:], inpaint.PSNR_CAP)


def test_empty_regions_have_no_score_and_uint8_agrees_with_float(images):
    fake, real, hole = images
    hole = hole.copy()
    hole[1] = False
    hole[2] = True
    scores = inpaint.inpaint_scores(fake, real, hole)
    assert np.isnan(scores["psnr_hole"][1]) and np.isnan(scores["ssim_hole"][1]) and np.isnan(scores["psnr_known"][2])
    assert np.isfinite(scores["psnr_known"][1]) and np.isfinite(scores["psnr_hole"][2])
    u8 = [np.round(a * 255).astype(np.uint8) for a in (fake, real)]
    from_u8 = inpaint.inpaint_scores(*u8, images[2])
    from_float = inpaint.inpaint_scores(*[a.astype(np.float32) / 255 for a in u8], images[2])
    for key in inpaint.SCORE_NAMES:
        np.testing.assert_allclose(from_u8[key], from_float[key], rtol=1e-6, err_msg=key)


def test_label_agreement_counts_the_holes_pixels_only():
    real = np.zeros((2, 4, 4), np.int32)
    real[:, 1:3, 1:3] = 5  # a 2x2 object
    fake = real.copy()
    fake[0, 1, 1] = 0  # one of its four pixels missed
    fake[0, 0, 0] = 7  # outside the hole: does not count
    fake[1] = 0  # the object not drawn back at all
    hole = np.zeros((2, 4, 4), bool)
    hole[:, 1:3, 1:4] = True  # the object and two background pixels beside it
    np.testing.assert_allclose(inpaint.label_agreement(fake, real, hole), [5 / 6, 2 / 6])
    assert np.isnan(inpaint.label_agreement(fake, real, np.zeros_like(hole))).all()
    with pytest.raises(ValueError, match=r"\(2, 4, 4\), \(2, 4, 4\) and \(2, 4\)"):
        inpaint.label_agreement(fake, real, hole[..., 0])


def test_hole_of_reads_the_conditions_mask_channel():
    rng = np.random.default_rng(3)
    image = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
    mask = (rng.uniform(size=(16, 16)) < 0.4).astype(np.float32)
    cond = inpaint_task.inpaint_condition(image, mask)[None]
    np.testing.assert_array_equal(inpaint.hole_of(cond)[0], mask > 0)
    with pytest.raises(ValueError, match=r"\(N, H, W, 4\).*\(1, 16, 16, 3\)"):
        inpaint.hole_of(cond[..., :3])


def _scorer(real_u8, hole, segmenter=None):
    mask = hole.astype(np.float32)
    cond = np.stack([inpaint_task.inpaint_condition(tasks.to_signed(r), m) for r, m in zip(real_u8, mask)])
    return types.SimpleNamespace(real=real_u8, cond=cond, seed=0, segmenter=segmenter, extras={})


def test_the_rows_metrics_have_intervals_and_directions(images):
    fake, real, hole = images
    fake_u8, real_u8 = (np.round(a * 255).astype(np.uint8) for a in (fake, real))
    scorer = _scorer(real_u8, hole)
    got = inpaint_task.TASK.metrics(scorer, fake_u8)
    assert set(got) == {f"{m}{s}" for m in inpaint.SCORE_NAMES for s in ("", "_ci")}
    per_image = inpaint.inpaint_scores(fake_u8, real_u8, hole)
    for m in inpaint.SCORE_NAMES:
        assert got[m] == pytest.approx(per_image[m].mean()) and got[f"{m}_ci"][0] <= got[m] <= got[f"{m}_ci"][1]
    assert all(tasks.lower_is_better()[m] is False for m in (*inpaint.SCORE_NAMES, "hole_label_agreement"))
    assert inpaint_task.TASK.metrics(scorer, real_u8) == {}  # the ground truth against itself says nothing
    # An image without a hole is left out of the hole's scores, not averaged in as NaN.
    no_hole = hole.copy()
    no_hole[1] = False
    got = inpaint_task.TASK.metrics(_scorer(real_u8, no_hole), fake_u8)
    assert got["psnr_hole"] == pytest.approx(np.mean(inpaint.inpaint_scores(fake_u8, real_u8, no_hole)["psnr_hole"][
        [0, 2]]))


def test_hole_label_agreement_reads_the_segmenter_on_output_and_ground_truth(images, monkeypatch):
    from codi_jax.metrics import captions

    _, real, hole = images
    real_u8 = np.round(real * 255).astype(np.uint8)
    seen = []

    def segment(model, images_u8):  # a stand-in reader: labels from the red channel's brightness
        seen.append((model, images_u8))
        return (images_u8[..., 0] > 127).astype(np.int32)

    monkeypatch.setattr(captions, "segment", segment)
    flipped = np.where(hole[..., None], 255 - real_u8, real_u8)
    got = inpaint_task.TASK.metrics(_scorer(real_u8, hole, segmenter="reader"), flipped)
    want = inpaint.label_agreement(segment(None, flipped), segment(None, real_u8), hole)
    assert got["hole_label_agreement"] == pytest.approx(want.mean()) and want.mean() < 0.1
    assert {id(images_u8) for model, images_u8 in seen[:2]} == {id(flipped), id(real_u8)}
    assert all(model == "reader" for model, _ in seen[:2])
    assert "hole_label_agreement" in inpaint_task.TASK.segmenter_metrics


def test_mean_fill_paints_the_hole_in_the_known_regions_rounded_mean(images):
    _, real, hole = images
    real_u8 = np.round(real * 255).astype(np.uint8)
    filled = inpaint.mean_fill(real_u8, hole)
    assert filled.dtype == np.uint8 and filled.shape == real_u8.shape
    for i in range(3):
        np.testing.assert_array_equal(filled[i][~hole[i]], real_u8[i][~hole[i]])
        want = np.round(real_u8[i][~hole[i]].astype(np.float64).mean(axis=0))
        np.testing.assert_array_equal(filled[i][hole[i]], np.broadcast_to(want, (hole[i].sum(), 3)))
    tiny = np.array([[[[10, 0, 255], [20, 1, 255]], [[31, 2, 0], [200, 200, 200]]]], np.uint8)
    corner = np.array([[[False, False], [False, True]]])
    np.testing.assert_array_equal(inpaint.mean_fill(tiny, corner)[0, 1, 1], [20, 1, 170])  # (10+20+31)/3 = 20.33
    np.testing.assert_array_equal(inpaint.mean_fill(tiny, np.ones_like(corner)), 128)  # nothing known: mid-grey


def test_the_rows_mean_fill_reference_keeps_the_known_region_exact(images):
    _, real, hole = images
    real_u8 = np.round(real * 255).astype(np.uint8)
    scorer = _scorer(real_u8, hole)
    refs = inpaint_task.TASK.references(real_u8, scorer.cond, {})
    assert list(refs) == [inpaint_task.MEAN_FILL]
    np.testing.assert_array_equal(refs[inpaint_task.MEAN_FILL], inpaint.mean_fill(real_u8, hole))
    got = inpaint_task.TASK.metrics(scorer, refs[inpaint_task.MEAN_FILL])
    assert got["psnr_known"] == inpaint.PSNR_CAP and got["psnr_known_ci"] == [inpaint.PSNR_CAP] * 2
    assert got["psnr_hole"] < 30


def test_the_shipped_segmenter_tells_an_object_drawn_back_from_a_mean_fill():
    """hole_label_agreement with the real reader, on 32 test scenes: the ground truth with a little noise agrees
    nearly everywhere in the hole, the mean fill far less, and far less in an object's hole than in a random one,
    whose pixels are mostly background that a mean colour already reads as."""
    from codi_jax.data import masks, scenes
    from codi_jax.metrics import captions

    recs = [scenes.render_example(0, i, "test", 32) for i in range(32)]
    real = np.stack([r["image"] for r in recs])
    noisy = np.clip(real.astype(int) + np.random.default_rng(0).integers(-6, 7, real.shape), 0, 255).astype(np.uint8)
    model = captions.load_segmenter()
    agree = {}
    for kind in ("object", "random"):
        hole = np.stack([masks.make_mask(np.random.default_rng(i), 32, 32, kind, 0.3, r["ids"]) > 0
                         for i, r in enumerate(recs)])
        segmented = captions.segment(model, np.concatenate([real, noisy, inpaint.mean_fill(real, hole)]))
        truth, near, fill = np.split(segmented, 3)
        agree[kind] = {"noisy": inpaint.label_agreement(near, truth, hole).mean(),
                       "mean fill": inpaint.label_agreement(fill, truth, hole).mean()}
    assert agree["object"]["noisy"] > 0.95 and agree["random"]["noisy"] > 0.95, agree
    assert agree["object"]["mean fill"] < 0.5 < agree["random"]["mean fill"], agree
