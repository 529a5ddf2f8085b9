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
