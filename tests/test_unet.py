"""UNet parity vs diffusers UNet2DConditionModel (SD1- and SD2-style tiny random models), residuals, CoDi mixing,
round trip through save_diffusers, bf16/remat variants and the loader's errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from codi_jax.models import unet as unet_lib
from codi_jax.weights import WeightsMismatchError, load_diffusers, save_diffusers

TOL = 1e-4
SD1 = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
           attention_head_dim=4, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# SD2 style: linear projections, per-block head counts, upcast attention, 2 transformer layers, mixed block types.
SD2 = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=(1, 2), cross_attention_dim=24,
           attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
           transformer_layers_per_block=(2, 1), flip_sin_to_cos=False, freq_shift=1,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def torch_unet(kw, seed):
    torch.manual_seed(seed)
    m = TorchUNet(**kw).eval()
    with torch.no_grad():  # perturb every tensor so zero biases / unit norms cannot hide a mapping mistake
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def inputs(ctx_dim, batch=2, size=8, seed=0):
    r = np.random.RandomState(seed)
    return (r.randn(batch, 4, size, size).astype(np.float32), np.array([3, 801])[:batch],
            r.randn(batch, 5, ctx_dim).astype(np.float32))


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    m = torch_unet(SD1, 0)
    folder = tmp_path_factory.mktemp("sd1_unet")
    m.save_pretrained(folder, safe_serialization=True)
    module, params = load_diffusers(str(folder), "unet")
    # One compile per call form: with residuals (zeros = the plain model), mixing, features only.
    with_res = jax.jit(lambda p, x, t, c, d, m: module.apply({"params": p}, x, t, c, d, m))
    return m, folder, module, params, with_res


SD1_SKIPS = [(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4)]  # conv_in, resnet+attn, downsample, resnet (NCHW)


def test_sd1_parity_with_and_without_residuals(sd1):
    m, _, module, params, with_res = sd1
    x, t, ctx = inputs(32, seed=1)
    r = np.random.RandomState(5)
    for scale in (0.0, 1.0):  # zero residuals: the plain UNet
        down = [scale * r.randn(2, *s).astype(np.float32) for s in SD1_SKIPS]
        mid = scale * r.randn(2, 64, 4, 4).astype(np.float32)
        with torch.no_grad():
            kw = {} if scale == 0 else dict(
                down_block_additional_residuals=tuple(torch.from_numpy(d) for d in down),
                mid_block_additional_residual=torch.from_numpy(mid))
            ref = m(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample.numpy()
        out = nchw(with_res(params, nhwc(x), t, ctx, [nhwc(d) for d in down], nhwc(mid)))
        assert np.abs(out - ref).max() <= TOL, (scale, np.abs(out - ref).max())


def test_features_and_mixing(sd1):
    """features_only gives h_theta; mixing (eq. 12) equals adding the residual mu (h_eta - h_theta)."""
    _, _, module, params, with_res = sd1
    x, t, ctx = inputs(32, seed=2)
    skips, mid = jax.jit(lambda p: module.apply({"params": p}, nhwc(x), t, ctx, features_only=True))(params)
    assert [s.shape[1:] for s in skips] == [(h, w, c) for c, h, w in SD1_SKIPS]
    assert mid.shape == (2, 4, 4, 64)
    r = np.random.RandomState(7)
    h_eta = (tuple(jnp.asarray(r.randn(*s.shape), jnp.float32) for s in skips),
             jnp.asarray(r.randn(*mid.shape), jnp.float32))
    mix = jax.jit(lambda p, f, mu: module.apply({"params": p}, nhwc(x), t, ctx, mix_features=f, mix_weight=mu))
    mu = 0.3
    mixed = np.asarray(mix(params, h_eta, mu))
    as_res = np.asarray(with_res(params, nhwc(x), t, ctx, [mu * (e - s) for e, s in zip(h_eta[0], skips)],
                                 mu * (h_eta[1] - mid)))
    assert np.abs(mixed - as_res).max() <= 1e-5
    zero_res = [jnp.zeros_like(s) for s in skips]
    plain = np.asarray(with_res(params, nhwc(x), t, ctx, zero_res, jnp.zeros_like(mid)))
    at_zero = np.asarray(mix(params, h_eta, 0.0))
    # Same arithmetic; the two compiled graphs fuse differently, so allow float32 rounding.
    assert np.abs(at_zero - plain).max() <= 1e-5
    assert np.abs(mixed - plain).max() > 1e-3
    with pytest.raises(ValueError, match="skip tensors"):
        module.apply({"params": params}, nhwc(x), t, ctx, mix_features=(h_eta[0][:-1], h_eta[1]), mix_weight=mu)


def test_sd2_parity_and_round_trip(tmp_path):
    m = torch_unet(SD2, 1)
    m.save_pretrained(tmp_path / "src", safe_serialization=True)
    module, params = load_diffusers(str(tmp_path / "src"), "unet")
    assert module.config.heads == (2, 4) and module.config.use_linear_projection
    x, t, ctx = inputs(24, seed=3)
    t = np.array(417)  # scalar timestep, broadcast over the batch as diffusers does
    with torch.no_grad():
        ref = m(torch.from_numpy(x), torch.tensor(417), torch.from_numpy(ctx)).sample.numpy()
    out = nchw(jax.jit(module.apply)({"params": params}, nhwc(x), t, ctx))
    assert np.abs(out - ref).max() <= TOL, np.abs(out - ref).max()

    # Round trip: our export loads in diffusers with no missing/unexpected keys and gives the same outputs.
    save_diffusers(str(tmp_path / "out"), "unet", module, params)
    m2, info = TorchUNet.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref2 = m2.eval()(torch.from_numpy(x), torch.tensor(417), torch.from_numpy(ctx)).sample.numpy()
    assert np.abs(ref2 - ref).max() <= 1e-6


def test_pipeline_folder_and_errors(sd1, tmp_path):
    m, folder, module, params, _ = sd1
    # A pipeline folder: model_index.json + unet/ subfolder; save keeps model_index.json untouched.
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    save_diffusers(str(pipe), "unet", module, params)
    assert (pipe / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((pipe / "model_index.json").read_text()) == {"_class_name": "StableDiffusionPipeline"}
    _, p2 = load_diffusers(str(pipe), "unet")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)))

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers(str(tmp_path), "unet")  # neither a component nor a pipeline folder
    with pytest.raises(ValueError, match="unknown component"):
        load_diffusers(str(folder), "tokenizer")

    # Unsupported options are named.
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        unet_lib.from_diffusers_config({**cfg, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_lib.from_diffusers_config({**cfg, "class_embed_type": "timestep"})

    # A mis-shaped and a missing tensor are both named.
    from safetensors.torch import save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    del sd["down_blocks.0.attentions.0.proj_in.bias"]
    sd["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsMismatchError) as e:
        load_diffusers(str(bad), "unet")
    msg = str(e.value)
    assert "down_blocks.0.attentions.0.proj_in.bias" in msg and "missing" in msg
    assert "conv_in.weight" in msg and "(32, 4, 1, 1)" in msg and "mis-shaped" in msg

    # Pickle-only folders are refused, never unpickled.
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text(json.dumps(cfg))
    (pk / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
    with pytest.raises(ValueError, match="pickle"):
        load_diffusers(str(pk), "unet")


def test_presets_and_configs():
    """Presets are valid and round-trip through the diffusers config format (bf16/remat runs: test_conditional)."""
    for c in (unet_lib.UNetConfig.preset("sd15"), unet_lib.UNetConfig.preset("sd21"), unet_lib.UNetConfig.preset("tiny")):
        assert unet_lib.UNetConfig.from_diffusers(c.to_diffusers()) == c
    assert unet_lib.UNetConfig.preset("sd21").heads == (5, 10, 20, 20)
    assert unet_lib.UNetConfig.preset("sd15").heads == (8, 8, 8, 8)
    # SD1.5 parameter count matches the real model (859.52 M) without allocating it.
    shapes = jax.eval_shape(lambda: unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.preset("sd15")).init(
        jax.random.key(0), *unet_lib.init_inputs(unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.preset("sd15")))))
    n = sum(np.prod(p.shape) for p in jax.tree.leaves(shapes))
    assert n == 859_520_964, n
    sd21 = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.preset("sd21"))
    shapes = jax.eval_shape(lambda: sd21.init(jax.random.key(0), *unet_lib.init_inputs(sd21)))
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(shapes)) == 865_910_724  # diffusers' count for SD 2.1
    # config.json lists become tuples (the config is a hashable module attribute).
    c = unet_lib.UNetConfig.from_diffusers({**unet_lib.UNetConfig.preset("sd21").to_diffusers(),
                                            "only_cross_attention": [False] * 4, "sample_size": [96, 96]})
    assert hash(c) == hash(unet_lib.UNetConfig.preset("sd21")) and c == unet_lib.UNetConfig.preset("sd21")
    with pytest.raises(ValueError, match="SDXL"):
        unet_lib.UNetConfig(transformer_layers_per_block=[[1, 2], 1, 1, 1])
    with pytest.raises(ValueError, match="divisible"):
        unet_lib.UNetConfig.preset("tiny", attention_head_dim=7)
