"""ControlNet parity vs diffusers ControlNetModel (residuals), the raw-feature (mu-form) encoder, round trip, errors."""

import json


import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet

from codi_jax.models import controlnet as cn_lib
from codi_jax.weights import load_diffusers, save_diffusers

TOL = 1e-4
KW = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
          norm_num_groups=8, use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          conditioning_channels=2, conditioning_embedding_out_channels=(8, 16))


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(0)
    m = TorchControlNet(**KW).eval()
    with torch.no_grad():  # zero convs and zero biases would hide mapping mistakes: perturb everything
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("controlnet")
    m.save_pretrained(folder, safe_serialization=True)
    module, params = load_diffusers(str(folder), "controlnet")
    r = np.random.RandomState(0)
    x = r.randn(2, 4, 8, 8).astype(np.float32)
    cond = r.rand(2, 2, 16, 16).astype(np.float32)
    ctx = r.randn(2, 5, 32).astype(np.float32)
    t = np.array([7, 640])
    with torch.no_grad():
        ref_down, ref_mid = m(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(cond),
                              conditioning_scale=0.7, return_dict=False)
    ref = ([d.numpy() for d in ref_down], ref_mid.numpy())
    return m, folder, module, params, (x, t, ctx, cond), ref


def max_diff(down, mid, ref):
    return max(max(np.abs(nchw(a) - b).max() for a, b in zip(down, ref[0])), np.abs(nchw(mid) - ref[1]).max())


def test_parity(case):
    _, _, module, params, (x, t, ctx, cond), ref = case
    down, mid = jax.jit(module.apply)({"params": params}, nhwc(x), t, ctx, nhwc(cond), 0.7)
    assert len(down) == len(ref[0]) == 4
    assert max_diff(down, mid, ref) <= TOL


def test_raw_features_are_the_zero_convs_inputs(case):
    """zero_convs=False returns h_eta; applying the checkpoint's 1x1 convs to it gives diffusers' residuals."""
    m, _, module, params, (x, t, ctx, cond), ref = case
    raw = cn_lib.ControlNetModel(cn_lib.ControlNetConfig.from_diffusers(dict(m.config), zero_convs=False))
    raw_params = {k: v for k, v in params.items() if not k.startswith("controlnet_") or k.endswith("_embedding")}
    skips, mid = jax.jit(raw.apply)({"params": raw_params}, nhwc(x), t, ctx, nhwc(cond))
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}

    def conv1x1(h, name):
        w, b = sd[name + ".weight"][:, :, 0, 0], sd[name + ".bias"]
        return (np.einsum("bhwc,oc->bhwo", np.asarray(h), w) + b) * 0.7

    down = [conv1x1(s, f"controlnet_down_blocks.{i}") for i, s in enumerate(skips)]
    assert max_diff(down, conv1x1(mid, "controlnet_mid_block"), ref) <= TOL
    with pytest.raises(ValueError, match="no diffusers equivalent"):
        cn_lib.to_diffusers_config(raw)


def test_round_trip_and_errors(case, tmp_path):
    m, folder, module, params, (x, t, ctx, cond), ref = case
    save_diffusers(str(tmp_path / "out"), "controlnet", module, params)
    m2, info = TorchControlNet.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        down, mid = m2.eval()(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                              torch.from_numpy(cond), conditioning_scale=0.7, return_dict=False)
    assert max(np.abs(a.numpy() - b).max() for a, b in zip(down, ref[0])) <= 1e-6
    assert np.abs(mid.numpy() - ref[1]).max() <= 1e-6

    with pytest.raises(ValueError, match="2x the latent size"):
        module.apply({"params": params}, nhwc(x), t, ctx, nhwc(cond)[:, :8, :8])
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="addition_embed_type"):
        cn_lib.from_diffusers_config({**cfg, "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="UNetMidBlock2D"):
        cn_lib.from_diffusers_config({**cfg, "mid_block_type": "UNetMidBlock2D"})


def test_sd15_size():
    """The SD1.5 ControlNet built from the UNet preset has diffusers' parameter count (361,279,120)."""
    from codi_jax.models.unet import UNetConfig
    module = cn_lib.ControlNetModel(cn_lib.ControlNetConfig.from_unet(UNetConfig.preset("sd15")))
    shapes = jax.eval_shape(module.init, jax.random.key(0), *cn_lib.init_inputs(module))
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(shapes)) == 361_279_120
