"""Task conditions, Real-ESRGAN degradation statistics, inpaint masks, tokenizers and the text cache."""

import json

import numpy as np
import pytest
from scipy import ndimage

from codi_jax import tasks
from codi_jax.data import degradations, masks, scenes, tokenizer
from codi_jax.tasks import depth as depth_task
from codi_jax.tasks import inpaint as inpaint_task


@pytest.fixture(scope="module")
def record():
    return scenes.render_example(0, 2, "train", 32, edit=True)


@pytest.mark.parametrize("task,channels", [("depth", 1), ("sr", 3), ("inpaint", 4), ("edit", 3), ("t2i", 0)])
def test_condition_shape_and_range(record, task, channels):
    ex = tasks.make_example(task, record, np.random.default_rng(0))
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.float32
    assert -1 <= ex["image"].min() and ex["image"].max() <= 1
    if channels == 0:
        assert "cond" not in ex
        return
    c = ex["cond"]
    assert c.shape == (32, 32, channels) and c.dtype == np.float32
    assert -1 <= c.min() and c.max() <= 1 and c.std() > 0.05


def test_depth_condition_is_disparity_near_bright(record):
    c = depth_task.disparity_condition(record)[..., 0]
    near, far = np.unravel_index(record["depth"].argmin(), c.shape), np.unravel_index(record["depth"].argmax(), c.shape)
    assert c[near] == pytest.approx(1.0) and c[far] == pytest.approx(-1.0)
    # Monotone: ordering of disparity is the reverse ordering of depth.
    order = np.argsort(record["depth"].ravel())
    assert np.all(np.diff(c.ravel()[order]) <= 1e-6)


def test_inpaint_condition_hides_the_holes(record):
    image = tasks.to_signed(record["image"])
    mask = masks.random_mask(np.random.default_rng(1), 32, 32, 0.3)
    c = inpaint_task.inpaint_condition(image, mask)
    assert np.all(c[mask > 0, :3] == 0) and np.allclose(c[mask == 0, :3], image[mask == 0])
    assert set(np.unique(c[..., 3])) == {-1.0, 1.0}


def test_edit_condition_is_the_input_image(record):
    ex = tasks.make_example("edit", record, np.random.default_rng(0))
    assert np.array_equal(ex["cond"], tasks.to_signed(record["input_image"]))
    assert np.array_equal(ex["image"], tasks.to_signed(record["image"]))


@pytest.mark.parametrize("fraction", [0.15, 0.4])
def test_masks_cover_the_configured_fraction(fraction):
    rng = np.random.default_rng(0)
    cover = [masks.random_mask(rng, 32, 32, fraction).mean() for _ in range(150)]
    assert abs(np.mean(cover) - fraction) < 0.02
    assert np.std(cover) < 0.05  # each mask is near the target, not just the average


def _high_freq_fraction(img):
    g = img.mean(-1)
    power = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
    h, w = g.shape
    yy, xx = np.mgrid[-h // 2:h // 2, -w // 2:w // 2]
    return power[np.hypot(yy / (h / 2), xx / (w / 2)) > 0.5].sum() / power.sum()


def _flat_noise(img, flat):
    g = img.mean(-1)
    r = g - ndimage.uniform_filter(g, 5)
    return np.sqrt((r[flat] ** 2).mean())


def _subpixel_ids(scene, size):
    """(size, size, 4): the object each of a pixel's 2x2 rays hits in render(..., supersample=2): its rays are those
    of the pixel centres of a render at twice the size (offsets (i + 0.5) / 2 are the centres of the 2x2 sub-pixels)."""
    ids = scenes._centre_hits(scene, 2 * size, 2 * size)[2]
    return ids.reshape(size, 2, size, 2).transpose(0, 2, 1, 3).reshape(size, size, 4)


def test_object_mask_is_one_objects_pixels_grown_by_one_pixel():
    for i in range(8):
        ids = scenes.render_example(0, i, "test", 32)["ids"]
        hole = masks.make_mask(np.random.default_rng(i), 32, 32, "object", 0.3, ids) > 0
        grown = {k: masks.dilate(ids == k, masks.OBJECT_DILATION) for k in np.unique(ids[ids >= 0])}
        matches = [k for k, g in grown.items() if np.array_equal(hole, g)]
        assert len(matches) == 1, (i, matches)
        k = matches[0]
        assert hole[ids == k].all() and not (hole & ~masks.dilate(ids == k, 1)).any()
    # The object is drawn uniformly among the visible ones: every object of a 3-object scene comes up.
    ids = next(e["ids"] for e in (scenes.render_example(0, j, "test", 32) for j in range(50))
               if len(np.unique(e["ids"][e["ids"] >= 0])) == 3)
    chosen = {int(ids[masks.object_mask(np.random.default_rng(s), ids, dilation=0) > 0][0]) for s in range(30)}
    assert chosen == {0, 1, 2}


def test_dilate_grows_by_chebyshev_distance():
    point = np.zeros((7, 7), bool)
    point[0, 3] = True
    np.testing.assert_array_equal(masks.dilate(point, 0), point)
    want = np.zeros((7, 7), bool)
    want[0:3, 1:6] = True  # two pixels in every direction, clipped at the top border
    np.testing.assert_array_equal(masks.dilate(point, 2), want)


def test_object_holes_take_in_the_anti_aliased_edge():
    """The one-pixel ring is there for the anti-aliased edge (OBJECT_DILATION): over 100 test scenes, of the pixels
    that any of the 2x2 rays of the rendered image finds the object in, at most 0.1 % escape the hole, each with at
    most half of its rays on the object (slivers seen past an occluder's edge, between pixel centres)."""
    escaped = touched = 0
    for i in range(100):
        scene = scenes.sample_scene(0, i, "test")
        ids, sub = scenes.render(scene, 32, 32, supersample=1)["ids"], _subpixel_ids(scene, 32)
        for k in range(len(scene.objects)):
            rays = (sub == k).sum(-1)
            out = (rays > 0) & ~masks.dilate(ids == k, masks.OBJECT_DILATION)
            escaped, touched = escaped + out.sum(), touched + (rays > 0).sum()
            assert np.all(rays[out] <= 2), (i, k)
    assert escaped <= 1e-3 * touched, (escaped, touched)
    # Without the ring, edge pixels that show the object would stay in the known region.
    scene = scenes.sample_scene(0, 0, "test")
    ids, sub = scenes.render(scene, 32, 32, supersample=1)["ids"], _subpixel_ids(scene, 32)
    assert ((sub == 0).any(-1) & (ids != 0)).sum() > 0


def test_object_masks_fall_back_to_random_ones_and_random_draws_as_before():
    sky = np.full((32, 32), -2, np.int32)  # a scene with no visible object
    assert masks.object_mask(np.random.default_rng(0), sky) is None
    fallback = masks.make_mask(np.random.default_rng(4), 32, 32, "object", 0.3, sky)
    np.testing.assert_array_equal(fallback, masks.random_mask(np.random.default_rng(4), 32, 32, 0.3))
    assert 0.1 < fallback.mean() < 0.6
    rng = np.random.default_rng(4)
    rng.random()  # 'mixed' draws object-or-random first; either way this scene gets a random mask
    np.testing.assert_array_equal(masks.make_mask(np.random.default_rng(4), 32, 32, "mixed", 0.3, sky),
                                  masks.random_mask(rng, 32, 32, 0.3))
    # 'random' is today's stream, draw for draw: the masks of existing runs and evaluations do not move.
    np.testing.assert_array_equal(masks.make_mask(np.random.default_rng(9), 32, 32, "random", 0.3),
                                  masks.random_mask(np.random.default_rng(9), 32, 32, 0.3))
    with pytest.raises(ValueError, match="mask_kind='object' needs the renderer's object ids"):
        masks.make_mask(np.random.default_rng(0), 32, 32, "object")
    with pytest.raises(ValueError, match="mask_kind must be one of"):
        masks.make_mask(np.random.default_rng(0), 32, 32, "boxes")


def test_mixed_masks_are_half_object_half_random():
    ids = scenes.render_example(0, 1, "test", 32)["ids"]
    objects = {k: masks.dilate(ids == k, masks.OBJECT_DILATION) for k in np.unique(ids[ids >= 0])}
    kinds = [any(np.array_equal(m > 0, g) for g in objects.values())
             for m in (masks.make_mask(np.random.default_rng(s), 32, 32, "mixed", 0.3, ids) for s in range(200))]
    assert 0.4 < np.mean(kinds) < 0.6


def test_sr_degradation_statistics():
    """Degraded-and-upsampled images lose high frequencies, and carry more noise than a clean bicubic down-up."""
    hf_in, hf_out, noise_deg, noise_bic = [], [], [], []
    for i in range(16):
        img = scenes.render_example(0, i, "train", 64)["image"].astype(np.float32) / 255
        g = img.mean(-1)
        # Noise is measured where the clean image is flat, so blur cannot hide it and edges cannot fake it.
        flat = ndimage.uniform_filter((g - ndimage.uniform_filter(g, 5)) ** 2, 9) < 1e-4
        cond = degradations.sr_condition(img, np.random.default_rng(i), 4)
        assert cond.shape == img.shape and 0 <= cond.min() and cond.max() <= 1
        bicubic = degradations.resize(degradations.resize(img, 16, 16, "bicubic"), 64, 64, "bicubic")
        hf_in.append(_high_freq_fraction(img))
        hf_out.append(_high_freq_fraction(cond))
        noise_deg.append(_flat_noise(cond, flat))
        noise_bic.append(_flat_noise(bicubic, flat))
    assert np.mean(hf_out) < 0.5 * np.mean(hf_in)
    assert np.mean(noise_deg) > 2 * np.mean(noise_bic)


def test_degradation_is_deterministic_and_x4():
    img = scenes.render_example(0, 0, "train", 32)["image"].astype(np.float32) / 255
    a = degradations.degrade(img, np.random.default_rng(5))
    b = degradations.degrade(img, np.random.default_rng(5))
    assert a.shape == (8, 8, 3) and np.array_equal(a, b)


@pytest.mark.parametrize("scale", [2, 8])
def test_degradation_second_stage_follows_the_scale(scale, monkeypatch):
    """basicsr resizes the second stage relative to ori_size / scale: at x2 and x8 as at x4, not a fixed /4."""
    img = scenes.render_example(0, 0, "train", 32)["image"].astype(np.float32) / 255
    sizes = []
    real_resize = degradations.resize
    monkeypatch.setattr(degradations, "resize", lambda x, h, w, mode="bicubic": sizes.append((h, w)) or
                        real_resize(x, h, w, mode))
    lo, hi = degradations.DegradationConfig().resize_range2
    for seed in range(6):
        sizes.clear()
        out = degradations.degrade(img, np.random.default_rng(seed), scale)
        assert out.shape == (32 // scale, 32 // scale, 3)
        second = sizes[1][0]  # resizes: first stage, second stage, final
        assert max(1, int(32 / scale * lo)) <= second <= int(32 / scale * hi)


def test_bicubic_degradation_is_a_plain_downsampling():
    img = scenes.render_example(0, 0, "train", 32)["image"].astype(np.float32) / 255
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    low = degradations.degrade(img, rng, 4, kind="bicubic")
    assert rng.bit_generator.state == state  # draws nothing: every epoch sees the same input
    assert np.allclose(low, np.clip(degradations.resize(img, 8, 8, "bicubic"), 0, 1))
    with pytest.raises(ValueError, match="sr degradation must be one of"):
        degradations.degrade(img, rng, 4, kind="jpeg")
    ex = tasks.make_example("sr", {"image": (img * 255).astype(np.uint8)}, rng,
                            options=tasks.Options(sr_scale=4, sr_degradation="bicubic"), extras=True)
    assert ex["lowres"].shape == (8, 8, 3) and ex["cond"].shape == (32, 32, 3)


def test_kernels_are_normalised():
    cfg = degradations.DegradationConfig()
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = degradations.random_mixed_kernel(rng, 11, cfg, cfg.blur_sigma)
        assert k.shape == (11, 11) and k.sum() == pytest.approx(1.0)
    s = degradations.sinc_kernel(np.pi / 3, 13)
    assert s.sum() == pytest.approx(1.0) and s[6, 6] == s.max()


def test_builtin_tokenizer_is_clip_shaped():
    tok = tokenizer.load_tokenizer(tokenizer.BUILTIN_SCENES)
    assert len(tok) == tokenizer.builtin_vocab_size()
    for w in scenes.caption_words():
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    cap = scenes.caption(scenes.sample_scene(0, 0))
    ids = tokenizer.tokenize(tokenizer.BUILTIN_SCENES, [cap, ""], 77)
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    bos, eos = tok.convert_tokens_to_ids("<|startoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    n = len(cap.replace(",", " ,").split())
    assert ids[0, 0] == bos and ids[0, n + 1] == eos and np.all(ids[0, n + 1:] == eos)  # CLIP pads with eos
    assert ids[1, 0] == bos and np.all(ids[1, 1:] == eos)
    # Words outside the grammar fall back to byte tokens and still round-trip.
    odd = tok("a zebra on mars")["input_ids"]
    assert tok.decode(odd, skip_special_tokens=True).strip() == "a zebra on mars"


def test_tokenizer_folder_round_trip(tmp_path):
    tok = tokenizer.load_tokenizer(tokenizer.BUILTIN_SCENES)
    tok.save_pretrained(tmp_path / "tok")
    caps = ["a red sphere left of a blue box", "make the green cylinder shiny"]
    np.testing.assert_array_equal(tokenizer.tokenize(str(tmp_path / "tok"), caps),
                                  tokenizer.tokenize(tokenizer.BUILTIN_SCENES, caps))
    # Stable Diffusion's tokenizer/ layout: vocab.json + merges.txt (no tokenizer.json).
    vocab, merges = tokenizer.builtin_vocab_and_merges()
    sd = tmp_path / "sd_tokenizer"
    sd.mkdir()
    (sd / "vocab.json").write_text(json.dumps(vocab))
    (sd / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    np.testing.assert_array_equal(tokenizer.tokenize(str(sd), caps), tokenizer.tokenize(tokenizer.BUILTIN_SCENES, caps))
    with pytest.raises(ValueError, match="tokenizer"):
        tokenizer.load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="vocab.json"):
        tokenizer.load_tokenizer(str(tmp_path / "empty"))


def test_scene_captions_fit_25_tokens():
    tok = tokenizer.load_tokenizer(tokenizer.BUILTIN_SCENES)
    lengths = [len(tok(scenes.caption(scenes.sample_scene(0, i)))["input_ids"]) for i in range(150)]
    assert max(lengths) <= 25 and min(lengths) >= 5


def test_text_dropout_empties_some_captions(record):
    caps = [tasks.make_example("depth", record, np.random.default_rng(i), text_dropout=0.3)["caption"]
            for i in range(200)]
    frac = np.mean([c == "" for c in caps])
    assert 0.2 < frac < 0.4 and record["caption"] in caps
