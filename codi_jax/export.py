"""Export of trained EMA weights for inference and for later stages.

<workdir>/export/ is a diffusers pipeline folder that `DiffusionPipeline.from_pretrained(export)` loads as it is:
- every mode but 'vae': vae/, text_encoder/, tokenizer/ (model_max_length = the run's max_length, so diffusers pads
  prompts as training did), unet/, and scheduler/ (the sampler the run is evaluated with, in diffusers terms: DDIM for
  pretrain/finetune/gd, LCMScheduler for the consistency-distilled codi/pe_codi/cm; see `scheduler_config`);
- 'pretrain': a StableDiffusionPipeline;
- ControlNet-form modes (pe_codi, finetune, cm, gd): a StableDiffusionControlNetPipeline, controlnet/ beside unet/;
- full CoDi (mu form, paper eq. 12): no diffusers block mixes skip features, but the mix is exactly two ControlNets
  added to the UNet's skips: (1 - mu) h + mu h_eta = h + [mu I] h_eta + [-mu I] h, with controlnet/ the conditional
  encoder whose 1x1 output convs are mu I, and controlnet_1/ a copy of the UNet's own encoder (hint net zero, so it
  ignores its condition image) whose output convs are -mu I. A StableDiffusionControlNetPipeline with a
  MultiControlNetModel; pass the condition image twice.
- conditional modes also keep conditional/ (our adapted UNet: config.json + model.safetensors, '/'-joined names),
  which `codi_jax.sample.Pipeline` loads;
- README.md, a model card (YAML header, the command, the config; evaluation fills in its metrics).
Condition images go in as codi_jax builds them: NCHW tensors in [-1, 1] with the task's channels (depth 1, sr 3,
inpaint 4, edit 3); diffusers' ControlNet image processor passes tensors through unchanged.
A DONE file is written last, so a half-written export is never mistaken for a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from codi_jax import modes, tasks
from codi_jax import teacher as teacher_lib
from codi_jax import weights
from codi_jax.diffusion import objectives, schedules
from codi_jax.models import conditional as cond_lib
from codi_jax.models.controlnet import ControlNetModel
from codi_jax.models import with_compute


def _host(tree: Any) -> Any:
    """Global (possibly multi-host sharded) arrays -> full numpy arrays on every process."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))


def float32(module):
    return with_compute(module, jnp.float32, False)


def is_finished(path: str) -> bool:
    """A finished export: its DONE file is written last, after every component."""
    return os.path.isfile(os.path.join(path, "DONE"))


def default_guidance(config) -> float:
    """The classifier-free guidance scale to sample the run's model at: a cfg_aware model was distilled to match the
    teacher guided at w in [guidance_min, guidance_max] with both of its calls guided, so unguided (w = 1) samples
    are not what it learned; the middle of its range. Any other model: 1."""
    objective = config.get("objective")
    if objective is not None and objective.get("cfg_aware", False):
        return float(objective.guidance_min + objective.guidance_max) / 2
    return 1.0


def export(recipe, state, frozen: dict, path: str) -> None:
    """The run's EMA weights as a diffusers-layout pipeline (the recipe's components), model_index.json with the
    codi_jax metadata, a model card, and DONE last: a folder without DONE is never read as an export."""
    ema = _host(state.ema_params)
    frozen_host = _host({k: v for k, v in frozen.items() if k in ("vae", "text_encoder", "unet")})
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    done = os.path.join(path, "DONE")
    if os.path.exists(done):
        os.remove(done)
    config = recipe.config
    meta = {"mode": recipe.mode, "task": config.task, "prediction_type": config.model.prediction_type,
            "schedule": config.schedule.to_dict(), "image_size": int(config.data.image_size),
            "max_length": int(config.data.max_length), "default_sampler": list(recipe.default_sampler()),
            "guidance_scale": default_guidance(config)}
    task = tasks.get(config.task)
    if task.export_meta is not None:  # what codi_jax.sample needs beyond the model (sr: the upsampling factor)
        meta.update(task.export_meta(config))
    components, pipeline_class = recipe.save_components(path, ema, frozen_host, meta)
    index = {"_class_name": pipeline_class, "_codi_jax": meta, **components}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(model_card(index, config, step=int(jax.device_get(state.step)) if hasattr(state, "step") else None))
    with open(done, "w") as f:
        f.write("ok\n")
    logging.info("exported EMA weights (%s) to %s", recipe.mode, path)


def save_tokenizer(tokenizer, path: str, max_length: int) -> None:
    """save_pretrained, with model_max_length set to the run's max_length: diffusers pipelines pad every prompt to
    model_max_length, and the cross-attention over padding makes 77 tokens differ from the 32 the model was trained on."""
    tokenizer.save_pretrained(path)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        tok_config = json.load(f)
    tok_config["model_max_length"] = int(max_length)
    with open(config_file, "w") as f:
        json.dump(tok_config, f, indent=2)


# ---- diffusers equivalents ---------------------------------------------------------------------------------------

_BETA_SCHEDULES = {kind: name for name, kind in teacher_lib.BETA_SCHEDULES.items()}  # codi_jax kind -> diffusers


def codi_timesteps_list(meta: dict, num_steps: int) -> list[int]:
    return [int(t) for t in schedules.codi_timesteps(num_steps, int(meta["distill_steps"]),
                                                     int(meta["schedule"]["num_train_timesteps"]))]


def save_scheduler(path: str, meta: dict) -> str:
    """The diffusers scheduler of a diffusion model's export (scheduler/); returns its class name."""
    scheduler = scheduler_config(meta)
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2)
    if scheduler["_class_name"] == "LCMScheduler":
        meta["diffusers_timesteps"] = {str(n): codi_timesteps_list(meta, n) for n in (1, 2, 4)}
    return scheduler["_class_name"]


def scheduler_config(meta: dict) -> dict:
    """The diffusers scheduler that runs the export's default sampler (model_index's _codi_jax metadata).

    'ddim' (pretrain, finetune, gd): DDIMScheduler with SD1.5's options, step for step our ddim sampler.
    'codi' (codi, pe_codi, cm): LCMScheduler: the same boundary (c_skip, c_out of timestep * timestep_scaling with
    sigma_data 0.5), and each step maps the consistency output f to the next timestep. Two differences, both in
    diffusers' fixed code: (1) its own grid is k T / N - 1 (999, 759, 519, 279 for 4 of 50) where ours is the training
    grid k T / N (980, 740, 480, 240): pass ours as `timesteps=` (model_index lists them under diffusers_timesteps);
    (2) between steps it re-noises f with fresh noise (CM multistep, our `stochastic=True`) where our default re-uses
    f's own noise estimate. One step is identical in both."""
    sched = meta["schedule"]
    kind = sched.get("kind", "scaled_linear")
    if kind not in _BETA_SCHEDULES:
        raise ValueError(f"schedule kind {kind!r} has no diffusers beta_schedule")
    base = {"num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
            "beta_start": float(sched.get("beta_start", 0.00085)), "beta_end": float(sched.get("beta_end", 0.012)),
            "beta_schedule": _BETA_SCHEDULES[kind], "prediction_type": meta["prediction_type"], "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": meta.get("timestep_spacing", "leading")}
    method = meta["default_sampler"][0]
    if method == "codi":
        if float(meta.get("sigma_data", 0.5)) != 0.5:
            raise ValueError(f"sigma_data={meta['sigma_data']}: diffusers' LCMScheduler fixes sigma_data at 0.5")
        return {"_class_name": "LCMScheduler", **base, "original_inference_steps": int(meta["distill_steps"]),
                "timestep_scaling": float(meta["timestep_scaling"])}
    if method == "ddim":
        return {"_class_name": "DDIMScheduler", **base}
    if method == "dpmpp_2m":
        return {"_class_name": "DPMSolverMultistepScheduler", **base, "algorithm_type": "dpmsolver++",
                "solver_order": 2, "lower_order_final": True, "final_sigmas_type": "zero"}
    if method == "euler":
        return {"_class_name": "EulerDiscreteScheduler", **base}
    raise ValueError(f"no diffusers scheduler for sampler {method!r}")


def _identity_kernels(shapes: dict, scale: float) -> dict:
    """The 1x1 output convs (controlnet_down_blocks_*, controlnet_mid_block) as scale * identity, zero bias."""
    out = {}
    for name, leaves in shapes.items():
        if name.startswith("controlnet_") and name != "controlnet_cond_embedding":
            k = leaves["kernel"].shape  # (1, 1, c, c)
            out[name] = {"kernel": (scale * np.eye(k[-1], dtype=np.float32)).reshape(k),
                         "bias": np.zeros(leaves["bias"].shape, np.float32)}
    return out


def diffusers_controlnets(cfg, params: dict) -> list[tuple[Any, dict]]:
    """[(ControlNetModel, params)] that, added to the UNet as diffusers adds ControlNet residuals, equal our
    conditional model: the control encoder itself in ControlNet form; two nets in mu form (module docstring)."""
    if cfg.mode == "controlnet":
        return [(ControlNetModel(cfg.control), params["control"])]
    module = ControlNetModel(dataclasses.replace(cfg.control, zero_convs=True))
    shapes = weights.param_shapes(module, "controlnet")
    mu = float(np.asarray(params["mu"]))
    eta = {**{k: v for k, v in params["control"].items()}, **_identity_kernels(shapes, mu)}
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    theta = cond_lib.copy_encoder_from_unet({k: v for k, v in zeros.items()}, params["unet"])
    theta.update(_identity_kernels(shapes, -mu))  # its hint net stays zero: the condition image adds nothing
    return [(module, eta), (module, theta)]


# ---- model card ----------------------------------------------------------------------------------------------------

METRICS_BEGIN, METRICS_END = "<!-- codi_jax:metrics -->", "<!-- /codi_jax:metrics -->"


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("codi_jax", "main.py")):
        argv[0] = "-m codi_jax.main"
    return "python " + " ".join(argv)


def model_card(index: dict, config, *, step: int | None = None, metrics: str | None = None) -> str:
    meta = index["_codi_jax"]
    mode, task = meta["mode"], meta["task"]
    cls = index["_class_name"]
    task_tag = tasks.get(task).tag if task in tasks.TABLE else task
    tags = ["codi_jax", "diffusers", "jax", task_tag]
    spec = modes.get(mode)
    if spec.consistency:
        tags += ["consistency-distillation", "few-step"]
    if "controlnet" in index:
        tags.append("controlnet")
    base = config.init_from if spec.teacher == "conditional" else config.teacher
    header = ["---", "library_name: diffusers", "tags:"] + [f"- {t}" for t in tags]
    if base:
        header.append(f"base_model: {json.dumps(str(base))}")
    header += [f"pipeline_tag: {tasks.get(task).pipeline_tag if task in tasks.TABLE else 'image-to-image'}",
               f"task: {task}", f"pipeline_class: {cls}", "---", ""]
    sampler, steps = meta["default_sampler"]
    guidance = float(meta.get("guidance_scale", 1.0))
    body = [f"# codi_jax {mode} model ({task_tag})", "",
            f"Trained by codi_jax in mode `{mode}` for task `{task}`"
            + (f", {step} steps" if step is not None else "") + f", from `{base or 'scratch'}`. "
            f"Evaluated with the `{sampler}` sampler, {steps} steps, classifier-free guidance {guidance:g}; "
            f"prediction type `{meta['prediction_type']}`.", ""]
    body += _derived_section(config)
    body += ["## Use", "", "```python", "import torch"]
    if cls == "AutoencoderKL":
        body += ["from diffusers import AutoencoderKL", "",
                 "vae = AutoencoderKL.from_pretrained(PATH, subfolder='vae')",
                 "# images: (N, 3, H, W) in [-1, 1]",
                 "latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor",
                 "recon = vae.decode(latents / vae.config.scaling_factor).sample"]
    elif cls == "StableDiffusionPipeline":
        body += ["from diffusers import StableDiffusionPipeline", "",
                 "pipe = StableDiffusionPipeline.from_pretrained(PATH)",
                 f"image = pipe('a prompt', num_inference_steps={steps}, guidance_scale={guidance:g}).images[0]"]
    else:
        n = int(meta.get("controlnets", 1))
        cond = "cond" if n == 1 else "[cond, cond]"
        steps_kw = (f"timesteps={meta['diffusers_timesteps'][str(steps)]}" if "diffusers_timesteps" in meta
                    and str(steps) in meta["diffusers_timesteps"] else f"num_inference_steps={steps}")
        task_spec = tasks.TABLE.get(task)
        if task_spec is not None and task_spec.diffusers_input is not None:
            make_cond = ["import numpy as np", "from PIL import Image", *task_spec.diffusers_input(meta)]
        else:
            make_cond = ["# cond: (N, C, H, W) float tensor in [-1, 1], C = the task's condition channels"]
        body += ["from diffusers import StableDiffusionControlNetPipeline", "",
                 "pipe = StableDiffusionControlNetPipeline.from_pretrained(PATH)",
                 # diffusers would bring a PIL control image to [0, 1]; the ControlNet was trained on [-1, 1]
                 *make_cond,
                 f"image = pipe('a prompt', image={cond}, {steps_kw}, guidance_scale={guidance:g}).images[0]"]
    body += ["```", ""]
    if cls == "StableDiffusionPipeline":
        body += ["or in JAX: `python -m codi_jax.sample --model=PATH --prompt='a prompt' --out-dir=out` (one PNG per "
                 "image; docs/sampling.md in the codi_jax repository).", ""]
    elif cls != "AutoencoderKL":
        body += ["or in JAX: `python -m codi_jax.sample --model=PATH --image=input.png --prompt='a prompt' "
                 "--out-dir=out` (the input is the task's: a depth map, a low-resolution image, an image with "
                 "`--mask`, or the image to edit; docs/sampling.md in the codi_jax repository).", ""]
    if spec.cond_form == "mu":
        body += ["Full CoDi mixes the conditional encoder's features into the UNet's skips, (1 - mu) h + mu h_eta "
                 f"(mu = {_mu_text(index)}). diffusers runs it exactly as two ControlNets: `controlnet` (the "
                 "conditional encoder, output convs mu I) and `controlnet_1` (the UNet's own encoder, output convs "
                 "-mu I, ignoring its image), hence the condition passed twice.", ""]
    if "diffusers_timesteps" in meta:
        body += ["The scheduler is diffusers' `LCMScheduler`. Pass the training grid as `timesteps=` (above; "
                 f"{json.dumps(meta['diffusers_timesteps'])}); LCMScheduler's own grid is shifted by up to one grid step. Between "
                 "steps LCMScheduler re-noises with fresh noise, where codi_jax's default re-uses the model's own "
                 "noise estimate: one step is identical, more steps agree in distribution, not pixel for pixel.", ""]
    body += ["## Training", "", "```", _command(), "```", ""]
    if spec.pf_ode_teacher and "objective" in config:
        # 'auto' in the config below resolves by the consistency space; what it meant for this run:
        body += [f"The objective's 'auto' settings as trained: pf_ode = {objectives.resolved_pf_ode(config.objective)}"
                 f", timestep_sampling = {objectives.timestep_sampling(config.objective)}.", ""]
    body += ["<details><summary>config</summary>", "", "```json",
             config.to_json_best_effort(indent=1) if hasattr(config, "to_json_best_effort") else json.dumps(config),
             "```", "", "</details>", "", METRICS_BEGIN, metrics_section(metrics), METRICS_END, ""]
    return "\n".join(header + body)


def _derived_section(config) -> list[str]:
    """Where the settings the run shares with its teacher came from (config.resolve: the teacher's folder, the
    command line, or a default), so that a reader can tell an SD 2.x v-prediction run from one trained as epsilon."""
    derived = config.get("derived") if hasattr(config, "get") else None
    if not derived or not any(derived.values()):
        return []
    data, model = config.data, config.model
    values = {"image_size": data.image_size, "tokenizer": data.tokenizer, "max_length": data.max_length,
              "prediction_type": model.prediction_type,
              "schedule": "{kind} {beta_start:g}-{beta_end:g}, T={num_train_timesteps}".format(**config.schedule)}
    rows = [f"| {name} | `{values[name]}` | {derived[name]} |" for name in values if derived.get(name)]
    return ["## Settings shared with the teacher", "", "| setting | value | from |", "|---|---|---|", *rows, ""]


def _mu_text(index: dict) -> str:
    mu = index.get("_codi_jax", {}).get("mu")
    return "learned" if mu is None else f"{mu:.4g}"


def metrics_section(table: str | None) -> str:
    if not table:
        return "## Metrics\n\nNot evaluated yet: `python -m codi_jax.evaluate --config=... --workdir=...` fills this in."
    return "## Metrics\n\n" + table


def update_model_card(path: str, table: str) -> bool:
    """Replaces the metrics section of the export's model card by `table` (evaluate's markdown of its rows); False if
    there is no card."""
    card = os.path.join(path, "README.md")
    if not os.path.isfile(card):
        return False
    with open(card) as f:
        text = f.read()
    if METRICS_BEGIN not in text or METRICS_END not in text:
        return False
    head, rest = text.split(METRICS_BEGIN, 1)
    _, tail = rest.split(METRICS_END, 1)
    tmp = card + ".tmp"
    with open(tmp, "w") as f:
        f.write(head + METRICS_BEGIN + "\n" + metrics_section(table) + "\n" + METRICS_END + tail)
    os.replace(tmp, card)
    return True
