"""What a real user brings, built offline at test size: a Stable Diffusion folder saved by diffusers itself, a real CLIP
BPE tokenizer, and a folder of real photos with depth maps prepared as docs/data.md says.

- The teacher has SD's structure (four UNet levels, three with cross-attention; an 8x VAE; a CLIP text encoder over
  CLIP's own 49408-token vocabulary) at small widths, random weights, a v-prediction DDIM scheduler with a linear beta
  schedule and 64 px images (sample_size 8 x 8): every one of these differs from the config's no-teacher defaults, so a
  run that ignored the folder would show it.
- The tokenizer's vocabulary and merges are CLIP's (open_clip_torch ships them as bpe_simple_vocab_16e6.txt.gz),
  written as transformers' CLIPTokenizer files, as SD's tokenizer/ holds them.
- The photos are scikit-image's bundled ones; their depth maps come from `python -m codi_jax.data.prepare_depth` with a
  tiny random transformers depth model saved with save_pretrained (no depth model can be downloaded here).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

SIZE = 64
# Differ from the no-teacher defaults (epsilon, scaled_linear 0.00085-0.012, 512 px, the scenes tokenizer).
PREDICTION_TYPE = "v_prediction"
SCHEDULE = {"kind": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}


def clip_bpe_files(out_dir: str) -> str:
    """vocab.json + merges.txt of CLIP's BPE (49408 tokens), built from open_clip's packaged merges as its
    SimpleTokenizer builds them, in the order transformers' CLIPTokenizer files use."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise RuntimeError("open_clip_torch is not installed (requirements-test.txt; .ci/run installs it --no-deps)")
    with gzip.open(os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz"), "rt",
                   encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


def make_sd_teacher(path: str) -> str:
    """A Stable Diffusion pipeline folder as diffusers saves one, SD's structure at test widths."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    bpe = clip_bpe_files(os.path.join(path + "_bpe"))
    tokenizer = CLIPTokenizer(os.path.join(bpe, "vocab.json"), os.path.join(bpe, "merges.txt"), model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=SIZE)
    scheduler = DDIMScheduler(num_train_timesteps=SCHEDULE["num_train_timesteps"], beta_start=SCHEDULE["beta_start"],
                              beta_end=SCHEDULE["beta_end"], beta_schedule=SCHEDULE["kind"],
                              prediction_type=PREDICTION_TYPE, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


PHOTOS = {  # skimage.data name -> caption
    "astronaut": "an astronaut in a white suit in front of a flag",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a tabby cat looking to the side",
    "rocket": "a rocket on its launch pad",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "motorcycle": "a motorcycle in a workshop",
    "colorwheel": "a colour wheel",
}
TEST_PHOTOS = ("coffee", "motorcycle", "colorwheel")


def make_photo_folder(root: str) -> str:
    """root/train and root/test (docs/data.md's folder layout) of real photos with .txt captions."""
    from skimage import data as skdata

    for name, caption in PHOTOS.items():
        split = "test" if name in TEST_PHOTOS else "train"
        image = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        os.makedirs(os.path.join(root, split), exist_ok=True)
        Image.fromarray(image[..., :3].astype(np.uint8)).save(os.path.join(root, split, f"{name}.png"))
        with open(os.path.join(root, split, f"{name}.txt"), "w") as f:
            f.write(caption)
    return root


def make_depth_model(path: str) -> str:
    """A tiny random GLPN depth estimator in transformers' format (safetensors), as a user's DPT would be."""
    import torch
    from transformers import GLPNConfig, GLPNForDepthEstimation
    from transformers.models.glpn.image_processing_pil_glpn import GLPNImageProcessorPil

    torch.manual_seed(0)
    cfg = GLPNConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                     patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                     decoder_hidden_size=8, max_depth=10, head_in_index=-1)
    GLPNForDepthEstimation(cfg).eval().save_pretrained(path)
    GLPNImageProcessorPil().save_pretrained(path)
    return path


def prepare_depth(images: str, model: str, env: dict) -> None:
    """docs/data.md's command, as a user types it."""
    subprocess.run([sys.executable, "-m", "codi_jax.data.prepare_depth", f"--images={images}", f"--model={model}"],
                   check=True, env=env, capture_output=True, text=True, timeout=600)
