"""Generic torch <-> flax conversion on a small hand-built module, safetensors I/O and the mismatch errors."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from codi_jax.models import layers
from codi_jax.weights import convert


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 3, padding=1)])
        self.norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(16, 5)])
        self.emb = torch.nn.Embedding(10, 5)

    def forward(self, x, ids):
        h = self.conv_in(x)
        for b in self.blocks:
            h = torch.nn.functional.silu(b(h))
        h = self.norm(h).mean(dim=(2, 3))
        return self.to_out[0](h) + self.emb(ids)


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, ids):
        h = layers.Conv(8, name="conv_in")(x)
        h = nn.silu(layers.Conv(8, name="blocks_0")(h))
        h = nn.silu(layers.Conv(16, name="blocks_1")(h))
        h = layers.GroupNorm(4, 1e-6, name="norm")(h).mean(axis=(1, 2))
        return layers.Dense(5, name="to_out_0")(h) + layers.Embed(10, 5, name="emb")(ids)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    tnet = TorchNet().eval()
    sd = {k: v.detach().numpy() for k, v in tnet.state_dict().items()}
    x = np.random.RandomState(0).randn(2, 3, 6, 6).astype(np.float32)
    ids = np.array([1, 7])
    fnet = FlaxNet()
    xh = jnp.asarray(x.transpose(0, 2, 3, 1))
    target = jax.eval_shape(fnet.init, jax.random.key(0), xh, ids)["params"]
    return tnet, sd, x, ids, fnet, xh, target


def test_key_mapping():
    assert convert.flax_path_to_torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel")) == \
        "down_blocks.0.resnets.1.conv1.weight"
    assert convert.flax_path_to_torch_key(("attn1", "to_out_0", "bias")) == "attn1.to_out.0.bias"
    assert convert.flax_path_to_torch_key(("ff", "net_0", "proj", "kernel")) == "ff.net.0.proj.weight"
    assert convert.flax_path_to_torch_key(("text_model", "encoder", "layers_3", "self_attn", "q_proj", "kernel")) == \
        "text_model.encoder.layers.3.self_attn.q_proj.weight"
    # Not a list container: the underscore stays.
    assert convert.flax_path_to_torch_key(("linear_1", "kernel")) == "linear_1.weight"
    assert convert.flax_path_to_torch_key(("norm1", "scale")) == "norm1.weight"


def test_parity_and_round_trip(nets):
    tnet, sd, x, ids, fnet, xh, target = nets
    params = convert.torch_to_flax(sd, target)
    out = np.asarray(fnet.apply({"params": params}, xh, ids))
    with torch.no_grad():
        ref = tnet(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
    assert np.abs(out - ref).max() < 1e-5
    back = convert.flax_to_torch(params)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_mismatch_lists_every_problem(nets):
    _, sd, *_, target = nets
    bad = dict(sd)
    del bad["blocks.0.bias"]
    bad["blocks.1.weight"] = np.zeros((16, 8, 1, 1), np.float32)
    bad["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert.WeightsMismatchError) as e:
        convert.torch_to_flax(bad, target)
    msg = str(e.value)
    assert "blocks.0.bias" in msg and "missing" in msg
    assert "blocks.1.weight" in msg and "(16, 8, 1, 1)" in msg and "(3, 3, 8, 16)" in msg
    assert "extra.weight" in msg and "unexpected" in msg
    # ignore patterns drop unexpected extras only.
    ok = dict(sd, **{"extra.weight": np.zeros(3, np.float32)})
    convert.torch_to_flax(ok, target, ignore=(r"^extra\.",))


def test_safetensors_io(tmp_path, nets):
    _, sd, *_ = nets
    path = convert.write_safetensors(str(tmp_path / "a"), sd, "model.safetensors")
    assert os.path.basename(path) == "model.safetensors"
    back = convert.read_safetensors(str(tmp_path / "a"))
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    # bf16 / fp16 written by torch are upcast to float32.
    from safetensors.torch import save_file
    os.makedirs(tmp_path / "b")
    save_file({"w": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "h": torch.tensor([0.25], dtype=torch.float16),
               "ids": torch.tensor([3, 4])}, str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    b = convert.read_safetensors(str(tmp_path / "b"))
    assert b["w"].dtype == np.float32 and b["w"].tolist() == [1.5, -2.0]
    assert b["h"].dtype == np.float32 and b["h"].tolist() == [0.25]
    assert b["ids"].tolist() == [3, 4]


def test_sharded_and_refusals(tmp_path, nets):
    _, sd, *_ = nets
    keys = sorted(sd)
    folder = tmp_path / "sharded"
    convert.write_safetensors(str(folder), {k: sd[k] for k in keys[:3]}, "model-00001-of-00002.safetensors")
    convert.write_safetensors(str(folder), {k: sd[k] for k in keys[3:]}, "model-00002-of-00002.safetensors")
    wm = {k: ("model-00001-of-00002.safetensors" if i < 3 else "model-00002-of-00002.safetensors")
          for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(__import__("json").dumps({"weight_map": wm}))
    assert set(convert.read_safetensors(str(folder))) == set(sd)
    pk = tmp_path / "pickle"
    pk.mkdir()
    (pk / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        convert.read_safetensors(str(pk))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        convert.read_safetensors(str(empty))


def test_registry_vae_and_text_encoder_round_trip(tmp_path):
    """The registry loads and re-exports the other two components; the references reload our export key for key."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from codi_jax import weights

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=12))
    # A pipeline folder holding both, as diffusers writes it.
    pipe = tmp_path / "pipe"
    vae.save_pretrained(pipe / "vae", safe_serialization=True)
    text.save_pretrained(pipe / "text_encoder", safe_serialization=True)
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for comp, ref, cls in (("vae", vae, AutoencoderKL), ("text_encoder", text, CLIPTextModel)):
        module, params = weights.load_diffusers(str(pipe), comp)
        sd = convert.read_safetensors(str(pipe / comp))
        model_file = __import__(weights.REGISTRY[comp].module_path, fromlist=["_"])
        if hasattr(model_file, "prepare_state_dict"):  # transformers 5 drops the 'text_model.' prefix on save
            sd = model_file.prepare_state_dict(sd)
        flat = convert.flax_to_torch(params)
        assert set(flat) == {k for k in sd if not k.endswith("position_ids")}
        for k in flat:
            np.testing.assert_array_equal(flat[k], sd[k])
        out = weights.save_diffusers(str(tmp_path / comp), comp, module, params)
        back, info = cls.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (comp, info)
