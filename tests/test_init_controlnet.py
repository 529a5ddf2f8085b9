"""config.init_controlnet: PE-CoDi / finetune start from a diffusers ControlNet. The Recipe's initial 'control' params
reproduce diffusers' ControlNetModel residuals, and the conditional UNet diffusers' UNet fed those residuals; every
misfit is refused before any work, in one line that names the path."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from codi_jax import recipes
from codi_jax import config as config_lib
from codi_jax.testing import tiny_config

TOL = 1e-4
HINT = (8, 16, 16)  # 4x like the tiny VAE, and not the tiny config's (16, 32, 32): the ControlNet's hint net must win


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def depth_config(teacher, controlnet, mode="pe_codi"):
    return tiny_config("depth", teacher, mode=mode, init_controlnet=controlnet)


def perturb(model, scale, seed):
    """Random weights everywhere, zero convs and the hint net's zero conv_out included: a mapping mistake shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_teacher(path):
    """A random tiny SD-layout pipeline with codi_jax.testing.make_random_pipeline's configs (our tiny presets, the
    builtin tokenizer), built and saved by torch: the same folder without compiling three Flax inits (~1 min on 2
    busy cores)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from codi_jax.data import load_tokenizer
    from codi_jax.models import clip, unet, vae

    tok = load_tokenizer("builtin:scenes")
    text = clip.CLIPTextEncoder(clip.CLIPTextConfig.preset(
        "tiny", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=77))
    text_cfg = {k: v for k, v in clip.to_diffusers_config(text).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg)).save_pretrained(f"{path}/text_encoder")
    AutoencoderKL.from_config(vae.to_diffusers_config(vae.AutoencoderKL(vae.VAEConfig.preset("tiny")))).save_pretrained(
        f"{path}/vae")
    unet_cfg = unet.UNetConfig.preset("tiny", cross_attention_dim=text.config.hidden_size)
    u = UNet2DConditionModel.from_config(unet_cfg.to_diffusers())
    perturb(u, 0.05, 0).save_pretrained(f"{path}/unet")
    tok.save_pretrained(f"{path}/tokenizer")
    with open(f"{path}/model_index.json", "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"]}, f)
    return path, u


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import ControlNetModel

    teacher, unet = torch_teacher(str(tmp_path_factory.mktemp("teacher")))
    cn = perturb(ControlNetModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=HINT),
                 0.05, 1)
    folder = str(tmp_path_factory.mktemp("controlnet"))
    cn.save_pretrained(folder, safe_serialization=True)
    return teacher, folder, unet, cn


@pytest.fixture(scope="module", params=["pe_codi", "finetune"])
def case(folders, request):
    teacher, folder, unet, cn = folders
    config = depth_config(teacher, folder, mode=request.param)
    recipe = recipes.make(config, "/nonexistent-workdir")
    r = np.random.RandomState(0)
    z = r.randn(2, 4, 8, 8).astype(np.float32)
    t = np.array([17, 803])
    ctx = r.randn(2, 6, unet.config.cross_attention_dim).astype(np.float32)
    cond = r.uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        args = [torch.from_numpy(a) for a in (z, t, ctx)]
        down, mid = cn(*args, torch.from_numpy(cond), return_dict=False)
        out = unet(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    ref = ([d.numpy() for d in down], mid.numpy(), out.numpy())
    return config, recipe, (z, t, ctx, cond), ref


def test_control_params_reproduce_diffusers_residuals(case):
    from codi_jax.models.controlnet import ControlNetModel

    config, recipe, (z, t, ctx, cond), (ref_down, ref_mid, _) = case
    if config.mode == "pe_codi":  # the UNet frozen, only the ControlNet trains
        assert set(recipe.initial_params) == {"control"} and "unet" in recipe.frozen_host
    else:  # finetune trains the UNet beside the ControlNet
        assert set(recipe.initial_params) == {"control", "unet"}
    assert tuple(config.model.hint_channels) == HINT  # the ControlNet's hint net replaced the config's
    control = ControlNetModel(recipe.model.config.control)
    down, mid = jax.jit(control.apply)({"params": recipe.initial_params["control"]}, nhwc(z), t, ctx, nhwc(cond))
    assert len(down) == len(ref_down)
    diff = max(max(float(np.abs(nchw(a) - b).max()) for a, b in zip(down, ref_down)),
               float(np.abs(nchw(mid) - ref_mid).max()))
    print(f"max |residual - diffusers| = {diff:.2e}")
    assert diff <= TOL
    assert min(float(np.abs(b).max()) for b in ref_down) > 1e-2  # the zero convs were randomised: a real comparison


def test_conditional_unet_matches_diffusers_unet_with_residuals(case):
    config, recipe, (z, t, ctx, cond), (*_, ref_out) = case
    params = recipe._merge(recipe.initial_params, recipe.frozen_host)
    out = jax.jit(recipe.model.apply)({"params": params}, nhwc(z), t, ctx, nhwc(cond))
    diff = float(np.abs(nchw(out) - ref_out).max())
    print(f"max |conditional UNet - diffusers UNet(residuals)| = {diff:.2e}")
    assert diff <= TOL


def _variant(src, dst, **changes):
    """A copy of the ControlNet folder with config.json changed (None deletes a key)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)
    return str(dst)


def _one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_wrong_conditioning_channels(folders, tmp_path):
    teacher, folder, *_ = folders
    bad = _variant(folder, tmp_path / "rgb", conditioning_channels=3)
    with pytest.raises(ValueError) as e:
        depth_config(teacher, bad)
    _one_line(e, "config.init_controlnet", bad, "conditioning_channels", "'depth' has 1")


def test_mode_codi_and_cm_are_refused(folders):
    teacher, folder, *_ = folders
    with pytest.raises(ValueError) as e:
        depth_config(teacher, folder, mode="codi")
    _one_line(e, "config.init_controlnet", "no zero convs")
    with pytest.raises(ValueError) as e:
        depth_config(teacher, folder, mode="cm")
    _one_line(e, "config.init_controlnet", "config.init_from")


def test_missing_path_is_an_error_and_not_created(folders, tmp_path):
    teacher, *_ = folders
    missing = str(tmp_path / "no" / "controlnet")
    with pytest.raises(FileNotFoundError) as e:
        depth_config(teacher, missing)
    _one_line(e, missing)
    assert not os.path.exists(tmp_path / "no")


def test_not_a_controlnet_and_pickle_only(folders, tmp_path):
    teacher, folder, *_ = folders
    with pytest.raises(ValueError) as e:
        depth_config(teacher, os.path.join(teacher, "unet"))
    _one_line(e, "config.init_controlnet", "UNet2DConditionModel", "not a ControlNetModel")
    with pytest.raises(FileNotFoundError) as e:  # a pipeline without controlnet/
        depth_config(teacher, teacher)
    _one_line(e, "config.init_controlnet", "controlnet/config.json")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError) as e:
        depth_config(teacher, str(pickled))
    _one_line(e, "config.init_controlnet", "pickle")


def test_encoder_and_hint_must_fit_the_teacher(folders, tmp_path):
    """Checked from config.json files at the Recipe's start, before any weights are read."""
    teacher, folder, *_ = folders
    wide = _variant(folder, tmp_path / "wide", cross_attention_dim=64)
    with pytest.raises(ValueError) as e:
        recipes.make(depth_config(teacher, wide), "/nonexistent-workdir")
    _one_line(e, f"config.init_controlnet={wide!r}", "cross_attention_dim")
    coarse = _variant(folder, tmp_path / "coarse", conditioning_embedding_out_channels=[8, 16])
    with pytest.raises(ValueError) as e:
        recipes.make(depth_config(teacher, coarse), "/nonexistent-workdir")
    _one_line(e, f"config.init_controlnet={coarse!r}", "2x", "4x")


def test_keeps_channel_order_and_global_pooling(folders, tmp_path):
    teacher, folder, *_ = folders
    variant = _variant(folder, tmp_path / "bgr", controlnet_conditioning_channel_order="bgr",
                       global_pool_conditions=True)
    control = recipes.make(depth_config(teacher, variant, mode="finetune"), "/nonexistent-workdir").model.config.control
    assert control.controlnet_conditioning_channel_order == "bgr" and control.global_pool_conditions


def test_init_from_together_is_refused(folders):
    teacher, folder, *_ = folders
    c = depth_config(teacher, "")
    c.mode, c.init_controlnet, c.init_from = "finetune", folder, "/some/run"
    with pytest.raises(ValueError) as e:
        config_lib.finalize(c)
    _one_line(e, "config.init_controlnet", "init_from")



def test_resume_keeps_the_controlnets_hint_net(case, tmp_path):
    """The recipe replaces model.hint_channels with the ControlNet's hint net and the run saves the config it settled;
    the restart's config still has the default at the workdir check, before any recipe. The restart must go on (the
    same model), while one whose hint net genuinely differs is still refused."""
    from codi_jax import checkpoint, train

    settled, recipe, *_ = case  # recipes.make has settled this config, as in train.setup before the first save
    assert tuple(settled.model.hint_channels) == HINT
    saver = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    saver.save(1, {"w": np.zeros(2, np.float32)}, config=train._config_json(settled))  # what train() saves
    saver.close()
    restart = depth_config(settled.teacher, settled.init_controlnet, mode=settled.mode)  # the same command again
    assert tuple(restart.model.hint_channels) != HINT  # the default: the recipe has not run yet
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    train._check_workdir(restart, ckpt)  # no refusal
    ckpt.close()
    # Without the ControlNet the config's own hint net (16, 32, 32) is another model: refused, in one line.
    other = tiny_config("depth", settled.teacher, mode=settled.mode)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError) as e:
        train._check_workdir(other, ckpt)
    _one_line(e, "other model settings", "model.hint_channels=[8, 16, 16] there, [16, 32, 32] here")
