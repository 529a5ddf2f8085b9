"""CLIPModel parity with transformers, CLIP image preprocessing, and the CLIP score formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from codi_jax.data.tokenizer import load_tokenizer
from codi_jax.metrics import MetricUnavailable
from codi_jax.metrics import clip_score as cs

IMAGE_SIZE = 32
CAPTIONS = ["a red sphere left of a blue box", "a green cylinder", "a blue box on a plane", "a red box"]


def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tok = load_tokenizer("builtin:scenes")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_act="quick_gelu")
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8, hidden_act="gelu")
    ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                         projection_dim=16)).eval()
    folder = tmp_path_factory.mktemp("clip_model")
    ref.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    model, params, tokenizer = cs.load_clip(str(folder))
    return dict(ref=ref, model=model, params=params, tokenizer=tokenizer, folder=folder)


def test_embeddings_parity(loaded):
    model, params, ref = loaded["model"], loaded["params"], loaded["ref"]
    pixels = np.random.default_rng(0).standard_normal((3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    ids = cs.tokenize(loaded["tokenizer"], CAPTIONS[:3], 16)
    out = jax.jit(model.apply)({"params": params}, ids, pixels)
    with torch.no_grad():
        ref_out = ref(input_ids=torch.from_numpy(ids).long(), pixel_values=nchw(pixels))
    assert np.abs(np.asarray(out.image_embeds) - ref_out.image_embeds.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(out.text_embeds) - ref_out.text_embeds.numpy()).max() <= 1e-4
    np.testing.assert_allclose(out.logits_per_image, ref_out.logits_per_image.numpy(), atol=1e-3)
    img, txt = cs._embed(model, params, jnp.asarray(pixels), jnp.asarray(ids))  # unnormalised projections
    with torch.no_grad():
        assert np.abs(np.asarray(img) - ref.get_image_features(pixel_values=nchw(pixels)).pooler_output.numpy()
                      ).max() <= 1e-4
        assert np.abs(np.asarray(txt) - ref.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
                      .numpy()).max() <= 1e-4


def test_clip_score_matches_torch_embeddings(loaded):
    model, params, tokenizer, ref = loaded["model"], loaded["params"], loaded["tokenizer"], loaded["ref"]
    images = np.random.default_rng(1).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    result = cs.clip_score(model, params, tokenizer, images, CAPTIONS, batch_size=3)  # 3 + 1 padded
    pixels = cs.preprocess_images(jnp.asarray(images), IMAGE_SIZE)
    ids = cs.tokenize(tokenizer, CAPTIONS, 16)
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=nchw(pixels)).pooler_output.numpy().astype(np.float64)
        txt = ref.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output.numpy().astype(np.float64)
    cos = (img * txt).sum(-1) / np.linalg.norm(img, axis=-1) / np.linalg.norm(txt, axis=-1)
    np.testing.assert_allclose(result.per_sample, cos, atol=1e-5)
    assert abs(result.score - np.mean(np.maximum(100 * cos, 0))) <= 1e-3
    assert abs(result.cosine - cos.mean()) <= 1e-5
    float_result = cs.clip_score(model, params, tokenizer, images / 255.0, CAPTIONS, batch_size=4)
    np.testing.assert_allclose(float_result.per_sample, result.per_sample, atol=1e-5)


def test_score_formula():
    r = cs.clip_score_from_embeddings([[2.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [-3.0, 0.0]])
    np.testing.assert_allclose(r.per_sample, [np.sqrt(0.5), -1.0], rtol=1e-6)
    assert r.score == pytest.approx(100 * np.sqrt(0.5) / 2)  # the negative pair is clamped to 0
    assert r.cosine == pytest.approx((np.sqrt(0.5) - 1) / 2)
    with pytest.raises(ValueError, match="matching"):
        cs.clip_score_from_embeddings(np.ones((2, 3)), np.ones((3, 3)))


def _processor_pixels(images):
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    pil = [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]  # grey "L" -> RGB there
    return proc(images=pil, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("shape", [(2, 64, 80, 3), (2, 24, 20, 3), (2, 300, 200, 3), (2, 32, 32, 1)])
def test_preprocessing_matches_clip_image_processor(shape):
    # Noise is the hardest case for resampling (overshoot clipped at every pass); one grey level of rounding allowed.
    images = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    want = _processor_pixels(images)
    got = np.asarray(cs.preprocess_images(jnp.asarray(images), IMAGE_SIZE)).transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1 / 255 / min(cs.CLIP_STD) + 1e-5


def test_preprocessing_smooth_image_any_shape():
    # A smooth image never overshoots, so even where Pillow runs the height pass first we agree to a grey level.
    yy, xx = np.meshgrid(np.linspace(0, 1, 100), np.linspace(0, 1, 37), indexing="ij")
    img = np.stack([np.sin(3 * yy + 2 * xx), np.cos(5 * xx), yy * xx], -1) * 100 + 128
    images = np.round(img[None]).astype(np.uint8)
    want = _processor_pixels(images)
    got = np.asarray(cs.preprocess_images(jnp.asarray(images), IMAGE_SIZE)).transpose(0, 3, 1, 2)
    assert np.abs(got - want).max() <= 1 / 255 / min(cs.CLIP_STD) + 1e-5


def test_bad_input(loaded, tmp_path):
    with pytest.raises(MetricUnavailable, match="CLIP"):
        cs.load_clip(None)
    with pytest.raises(FileNotFoundError):
        cs.load_clip(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cs.clip_score(loaded["model"], loaded["params"], loaded["tokenizer"], -np.ones((1, 8, 8, 3)), ["a box"])
    with pytest.raises(ValueError, match="one caption per image"):
        cs.clip_score(loaded["model"], loaded["params"], loaded["tokenizer"], np.zeros((2, 8, 8, 3)), ["a box"])
