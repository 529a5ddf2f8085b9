"""Exports load in diffusers as they are, and diffusers' PyTorch pipelines reproduce codi_jax.sample.

A tiny random teacher; for each export form (text-to-image, ControlNet form, full CoDi's mu form) the trainable
weights are set to random values where training would have moved them off their zero init (zero convs, the hint net's
last conv, mu), so a dropped or mis-transposed ControlNet changes the image and fails the comparison.
"""

import json
import os

import numpy as np
import pytest

from codi_jax import modes

# One worker runs the whole module: the exports (module fixture) are built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("export_diffusers")

def _config(name: str, teacher: str, **overrides):
    from codi_jax.testing import tiny_config

    return tiny_config(name, teacher, **overrides)


def _perturb(params: dict, seed: int) -> dict:
    """Random values on the zero-initialised parts (zero convs, the hint net's output conv) and mu."""
    import jax

    rng = np.random.default_rng(seed)

    def leaf(path, x):
        names = [getattr(p, "key", "") for p in path]
        zero_init = (any(n.startswith("controlnet_") and n != "controlnet_cond_embedding" for n in names)
                     or ("controlnet_cond_embedding" in names and "conv_out" in names))
        if names == ["mu"]:
            return np.asarray(0.3, np.float32)
        if zero_init:
            return (0.2 * rng.standard_normal(np.shape(x))).astype(np.float32)
        return np.asarray(x)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _export(config, path: str, seed: int = 0) -> str:
    from codi_jax.testing import export_untrained

    return export_untrained(config, path, lambda params: _perturb(params, seed))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from codi_jax.testing import make_random_pipeline

    return make_random_pipeline(str(tmp_path_factory.mktemp("teacher")), prediction_type="v_prediction")


@pytest.fixture(scope="module")
def exports(teacher, tmp_path_factory):
    out = {"pretrain": _export(_config("pretrain", teacher, **{"model.prediction_type": "v_prediction"}),
                               str(tmp_path_factory.mktemp("pretrain")))}
    for mode in ("finetune", "pe_codi", "codi", "cm", "cm_frozen", "gd"):
        # CM-II and GD-II read their fine-tuned teacher from init_from only in the training loop; the export is
        # the student's, which starts from the pretrained teacher as every ControlNet-form run does.
        init_from = "/only-read-by-the-loop" if modes.get(mode).teacher == "conditional" else ""
        out[mode] = _export(_config("depth", teacher, mode=mode, init_from=init_from,
                                    **{"model.prediction_type": "v_prediction"}),
                            str(tmp_path_factory.mktemp(mode)), seed=len(out))
    # Guidance-aware CoDi: distilled against the teacher guided at w in [2, 4], so it is sampled guided, at 3.
    out["codi_cfg"] = _export(_config("depth", teacher, mode="codi", **{
        "model.prediction_type": "v_prediction", "objective.cfg_aware": True, "objective.guidance_min": 2.0,
        "objective.guidance_max": 4.0}), str(tmp_path_factory.mktemp("codi_cfg")), seed=len(out))
    # Super-resolution, full CoDi: a 3-channel condition through diffusers' two-ControlNet form.
    out["sr"] = _export(_config("sr", teacher, mode="codi", **{"model.prediction_type": "v_prediction"}),
                        str(tmp_path_factory.mktemp("sr")), seed=len(out))
    return out


def _inputs(n=2, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    cond = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1  # the depth condition as codi_jax builds it
    return latents, cond, ["a red sphere left of a blue box", "a green cube"][:n]


def _ours(path, cond, prompts, latents, method, steps, guidance_scale=None):
    from codi_jax.sample import Pipeline

    pipe = Pipeline(path)
    nhwc = lambda x: x.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    cond_in = nhwc(cond) if cond is not None else np.zeros((len(prompts), 32, 32, 1), np.float32)
    return pipe(cond_in, prompts, method=method, steps=steps, latents=nhwc(latents), output_type="float",
                guidance_scale=guidance_scale)


def test_every_export_lists_its_components_and_a_scheduler(exports):
    for mode, path in exports.items():
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            scheduler = json.load(f)
        meta = index["_codi_jax"]
        assert index["scheduler"] == ["diffusers", scheduler["_class_name"]]
        assert scheduler["prediction_type"] == meta["prediction_type"] == "v_prediction"
        assert scheduler["beta_start"] == meta["schedule"]["beta_start"]
        expected = "DDIMScheduler" if mode in ("pretrain", "finetune", "gd") else "LCMScheduler"
        assert scheduler["_class_name"] == expected, mode
        # GD-II students are distilled on the trailing grid; the exported scheduler must step on it too.
        assert scheduler["timestep_spacing"] == ("trailing" if mode == "gd" else "leading"), mode
        for name, value in index.items():
            if isinstance(value, list) and value[0] is not None:
                assert os.path.isdir(os.path.join(path, name)), (mode, name)
        with open(os.path.join(path, "tokenizer", "tokenizer_config.json")) as f:
            assert json.load(f)["model_max_length"] == meta["max_length"]
        with open(os.path.join(path, "README.md")) as f:
            card = f.read()
        header = card.split("---")[1]
        assert "library_name: diffusers" in header and f"pipeline_class: {index['_class_name']}" in header
        assert "base_model:" in header and "tags:" in header and "Not evaluated yet" in card
    assert json.load(open(os.path.join(exports["codi"], "model_index.json")))["controlnet"][1] == \
        "MultiControlNetModel"


def test_pretrain_export_generates_in_stable_diffusion_pipeline(exports):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(exports["pretrain"])  # no extra argument
    assert pipe.safety_checker is None
    latents, _, prompts = _inputs()
    theirs = pipe(prompts, height=32, width=32, num_inference_steps=4, guidance_scale=1.0, latents=latents,
                  output_type="np").images
    assert theirs.shape == (2, 32, 32, 3) and np.isfinite(theirs).all() and theirs.std() > 1e-3
    ours = _ours(exports["pretrain"], None, prompts, latents, "ddim", 4)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    # What diffusers saves back (no codi_jax metadata) loads in codi_jax from its scheduler config alone.
    resaved = os.path.join(os.path.dirname(exports["pretrain"]), "resaved")
    pipe.save_pretrained(resaved)
    assert "_codi_jax" not in json.load(open(os.path.join(resaved, "model_index.json")))
    np.testing.assert_allclose(_ours(resaved, None, prompts, latents, "ddim", 4), theirs, atol=1e-3)
    del torch


@pytest.mark.parametrize("mode", ["finetune", "pe_codi", "codi", "cm", "cm_frozen", "gd"])
def test_controlnet_exports_match_codi_jax_sample(exports, mode):
    """DDIM, deterministic in both: the ControlNet path (and full CoDi's two-ControlNet form) equals ours within
    1e-3 per pixel on [0, 1]."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(exports[mode])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents, cond, prompts = _inputs(seed=1)
    image = [cond, cond] if mode == "codi" else cond
    theirs = pipe(prompts, image=image, height=32, width=32, num_inference_steps=4, guidance_scale=1.0,
                  latents=latents, output_type="np").images
    ours = _ours(exports[mode], cond, prompts, latents, "ddim", 4)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    # The condition matters on both sides: another condition gives another image.
    other = pipe(prompts, image=[-cond, -cond] if mode == "codi" else -cond, height=32, width=32,
                 num_inference_steps=4, guidance_scale=1.0, latents=latents, output_type="np").images
    assert np.abs(other - theirs).max() > 1e-2


def test_sr_export_matches_sample_and_its_card_builds_the_condition(exports, tmp_path, monkeypatch):
    """The SR export in StableDiffusionControlNetPipeline (3-channel condition) equals codi_jax.sample within 1e-3;
    the model card's lines that turn a low-resolution PNG into the condition, run as a user would, give the
    condition codi_jax.sample builds from the same file (diffusers' own preprocessing of a PIL image would not: it
    hands the ControlNet [0, 1], and training's conditions are in [-1, 1])."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from codi_jax import sample

    pipe = StableDiffusionControlNetPipeline.from_pretrained(exports["sr"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents, _, prompts = _inputs(seed=2)
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    theirs = pipe(prompts, image=[cond, cond], height=32, width=32, num_inference_steps=4, guidance_scale=1.0,
                  latents=latents, output_type="np").images
    np.testing.assert_allclose(_ours(exports["sr"], cond, prompts, latents, "ddim", 4), theirs, atol=1e-3)

    low = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(low).save(tmp_path / "lowres.png")
    card = open(os.path.join(exports["sr"], "README.md")).read()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].splitlines()
    start = code.index("import numpy as np")
    stop = next(i for i, line in enumerate(code) if line.startswith("image = pipe("))
    monkeypatch.chdir(tmp_path)
    scope = {"torch": torch}
    exec("\n".join(code[start:stop]), scope)  # noqa: S102 - the card's own lines, as a user types them
    job = sample.build_jobs(sample.model_spec(exports["sr"]), [str(tmp_path / "lowres.png")], ["x"])[0]
    theirs_cond = scope["cond"][0].permute(1, 2, 0).numpy()
    assert theirs_cond.shape == job.cond.shape == (32, 32, 3)
    np.testing.assert_allclose(theirs_cond, job.cond, atol=1e-6)


def test_guidance_aware_export_is_sampled_at_its_own_scale(exports):
    """A cfg_aware model records the guidance it was distilled for (the middle of its range); codi_jax samples it
    there by default, its model card says so, and diffusers' classifier-free guidance at that scale (null prompt
    through UNet and both ControlNets) equals ours. Every other export records 1."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    for mode, path in exports.items():
        meta = json.load(open(os.path.join(path, "model_index.json")))["_codi_jax"]
        assert meta["guidance_scale"] == (3.0 if mode == "codi_cfg" else 1.0), mode
    card = open(os.path.join(exports["codi_cfg"], "README.md")).read()
    assert "guidance_scale=3)" in card and "classifier-free guidance 3" in card
    pipe = StableDiffusionControlNetPipeline.from_pretrained(exports["codi_cfg"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents, cond, prompts = _inputs(seed=3)
    theirs = pipe(prompts, image=[cond, cond], height=32, width=32, num_inference_steps=4, guidance_scale=3.0,
                  latents=latents, output_type="np").images
    ours = _ours(exports["codi_cfg"], cond, prompts, latents, "ddim", 4)  # no guidance given: the model's own
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    unguided = _ours(exports["codi_cfg"], cond, prompts, latents, "ddim", 4, guidance_scale=1.0)
    assert np.abs(unguided - ours).max() > 1e-2


@pytest.mark.parametrize("mode", ["pe_codi", "codi", "cm"])
def test_few_step_scheduler_is_our_codi_sampler(exports, mode):
    """The exported LCMScheduler with the training grid as timesteps: one step is deterministic and equals ours;
    at several steps it re-noises with fresh noise, which is our stochastic codi sampler, so only the first step's
    grid and boundary are compared pixel for pixel."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(exports[mode])
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    meta = json.load(open(os.path.join(exports[mode], "model_index.json")))["_codi_jax"]
    latents, cond, prompts = _inputs(seed=2)
    image = [cond, cond] if mode == "codi" else cond
    theirs = pipe(prompts, image=image, height=32, width=32, timesteps=meta["diffusers_timesteps"]["1"],
                  guidance_scale=1.0, latents=latents, output_type="np").images
    ours = _ours(exports[mode], cond, prompts, latents, "codi", 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    from codi_jax.diffusion import schedules

    assert meta["diffusers_timesteps"]["4"] == list(schedules.codi_timesteps(4, meta["distill_steps"], 1000))


def test_scheduler_config_for_every_sampler():
    from codi_jax import export

    meta = {"schedule": {"kind": "cosine", "beta_start": 0.1, "beta_end": 0.2, "num_train_timesteps": 1000},
            "prediction_type": "epsilon", "timestep_spacing": "trailing", "distill_steps": 50,
            "timestep_scaling": 10.0, "sigma_data": 0.5}
    assert export.scheduler_config({**meta, "default_sampler": ["ddim", 4]})["beta_schedule"] == "squaredcos_cap_v2"
    assert export.scheduler_config({**meta, "default_sampler": ["ddim", 4]})["timestep_spacing"] == "trailing"
    lcm = export.scheduler_config({**meta, "default_sampler": ["codi", 4]})
    assert lcm["_class_name"] == "LCMScheduler" and lcm["original_inference_steps"] == 50
    with pytest.raises(ValueError, match="sigma_data"):
        export.scheduler_config({**meta, "sigma_data": 1.0, "default_sampler": ["codi", 4]})


def test_shipped_teacher_loads_in_diffusers_and_matches():
    """The teacher shipped in the package is a diffusers pipeline too: no extra argument, and its DDIM images are
    codi_jax's (its tokenizer pads to the 32 tokens it was trained with)."""
    from diffusers import StableDiffusionPipeline

    from codi_jax import recipes

    path = recipes.resolve("builtin:scenes32", "")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    latents, _, prompts = _inputs(seed=3)
    theirs = pipe(prompts, height=32, width=32, num_inference_steps=3, guidance_scale=1.0, latents=latents,
                  output_type="np").images
    np.testing.assert_allclose(_ours(path, None, prompts, latents, "ddim", 3), theirs, atol=1e-3)
