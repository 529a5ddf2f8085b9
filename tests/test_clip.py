"""CLIP text encoder: parity with transformers' CLIPTextModel, weight import/export round trip, presets, options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from codi_jax.models import clip
from codi_jax.weights import load_diffusers, save_diffusers

VOCAB, LENGTH = 100, 12
# Two variants cover both activations and both pooling rules: legacy eos_token_id=2 pools at the argmax id;
# otherwise at the first eos. eos=50 is not the largest id, so the two rules pick different tokens below.
VARIANTS = {"quick_gelu": dict(hidden_act="quick_gelu", eos_token_id=2),
            "gelu": dict(hidden_act="gelu", eos_token_id=50)}
ALLOWED_AXES = {"embed", "mlp", "heads", "vocab", "position", "conv_in", "conv_out", "norm", None}


def _input_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(3, LENGTH))
    ids[:, 0] = 1
    ids[0, 4] = 50      # first eos early, larger ids after it
    ids[1, 7:] = 50     # eos used as padding
    ids[2, -1] = 50
    ids[0, 9] = 99
    return ids


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {name: _build(name, tmp_path_factory) for name in VARIANTS}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def loaded(request, models):
    return models[request.param]


def _build(variant, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=1,
                                      pad_token_id=0, **VARIANTS[variant])
    ref = transformers.CLIPTextModel(cfg).eval()
    folder = tmp_path_factory.mktemp(f"clip_{variant}")
    ref.save_pretrained(folder, safe_serialization=True)
    module, params = load_diffusers(str(folder), "text_encoder")
    ids = _input_ids()
    with torch.no_grad():
        out = ref(torch.from_numpy(ids))
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x, return_pooled=True))
    return dict(ref=ref, module=module, params=params, ids=ids, out=out, apply=apply, tmp=tmp_path_factory)


def test_parity_with_transformers(loaded):
    last, pooled = loaded["apply"](loaded["params"], loaded["ids"])
    ref = loaded["out"]
    assert last.shape == (3, LENGTH, 32)
    assert np.abs(np.asarray(last) - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max() <= 1e-4


def test_default_apply_returns_last_hidden_state(loaded):
    last = jax.jit(loaded["module"].apply)({"params": loaded["params"]}, loaded["ids"][:1])
    assert np.abs(np.asarray(last) - loaded["out"].last_hidden_state.numpy()[:1]).max() <= 1e-4


def test_padding_mask_parity(loaded):
    mask = np.ones_like(loaded["ids"])
    mask[1, 7:] = 0
    last = jax.jit(loaded["module"].apply)({"params": loaded["params"]}, loaded["ids"], mask)
    with torch.no_grad():
        ref = loaded["ref"](torch.from_numpy(loaded["ids"]), attention_mask=torch.from_numpy(mask))
    assert np.abs(np.asarray(last) - ref.last_hidden_state.numpy()).max() <= 1e-4


def test_round_trip_save_load(loaded):
    folder = loaded["tmp"].mktemp("clip_export")
    save_diffusers(str(folder), "text_encoder", loaded["module"], loaded["params"])
    back = transformers.CLIPTextModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = back(torch.from_numpy(loaded["ids"]))
    assert np.abs(out.last_hidden_state.numpy() - loaded["out"].last_hidden_state.numpy()).max() <= 1e-6
    assert np.abs(out.pooler_output.numpy() - loaded["out"].pooler_output.numpy()).max() <= 1e-6
    for key in ("hidden_act", "eos_token_id", "num_hidden_layers", "vocab_size", "max_position_embeddings"):
        assert getattr(back.config, key) == getattr(loaded["ref"].config, key)


def test_legacy_prefixed_checkpoint_matches_params(loaded):
    # What SD pipelines on disk hold: 'text_model.'-prefixed keys plus the position_ids buffer.
    sd = {"text_model." + k: v.numpy() for k, v in loaded["ref"].state_dict().items()}
    sd["text_model.embeddings.position_ids"] = np.arange(16)[None]
    prepared = clip.prepare_state_dict(sd)
    from codi_jax.weights import flax_to_torch
    ours = flax_to_torch(loaded["params"])
    assert set(prepared) == set(ours)
    assert all(np.array_equal(prepared[k], ours[k]) for k in ours)


def test_logical_axes_on_every_param(loaded):
    module = loaded["module"]
    boxed = jax.eval_shape(module.init, jax.random.key(0), *clip.init_inputs(module))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert set(leaf.names) <= ALLOWED_AXES and len(leaf.names) == leaf.value.ndim


def test_bf16_and_remat_options(models):
    loaded = models["gelu"]
    params, ids = loaded["params"], loaded["ids"]
    ref = loaded["out"].last_hidden_state.numpy()
    cfg = loaded["module"].config
    remat = clip.CLIPTextEncoder(clip.CLIPTextConfig(**{**cfg.__dict__, "remat": True}))
    np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, ids), ref, atol=1e-4)
    bf16 = clip.CLIPTextEncoder(clip.CLIPTextConfig(**{**cfg.__dict__, "dtype": jnp.bfloat16}))
    out = jax.jit(bf16.apply)({"params": params}, ids)
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1  # LayerNorm output is O(1)


def test_config_validation():
    base = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 32,
            "num_attention_heads": 4}
    assert clip.from_diffusers_config(base).config.hidden_size == 32
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        clip.from_diffusers_config({**base, "architectures": ["CLIPTextModelWithProjection"]})
    with pytest.raises(ValueError, match="hidden_act"):
        clip.from_diffusers_config({**base, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="eos_token_id"):
        clip.from_diffusers_config({**base, "eos_token_id": [2, 3]})


@pytest.mark.parametrize("name, expected", [("sd15", 123_060_480), ("sd21", 340_387_840)])
def test_presets_match_stable_diffusion_sizes(name, expected):
    # Counts of the real SD 1.5 (ViT-L/14 text) and SD 2.1 (OpenCLIP-H text, 23 layers) text encoders.
    module = clip.CLIPTextEncoder(clip.CLIPTextConfig.preset(name))
    shapes = jax.eval_shape(module.init, jax.random.key(0), *clip.init_inputs(module))["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes))) == expected
    d = clip.to_diffusers_config(module)
    assert clip.from_diffusers_config(d).config == module.config


def test_tiny_preset_runs():
    module = clip.CLIPTextEncoder(clip.CLIPTextConfig.preset("tiny"))
    ids = jnp.zeros((2, 77), jnp.int32)
    out, _ = jax.jit(module.init_with_output)(jax.random.key(0), ids)
    assert out.shape == (2, 77, 32) and bool(jnp.all(jnp.isfinite(out)))
