"""codi_jax against its diffusers / PyTorch peer on one GPU: train-step throughput and MFU, and sampling latency.

    python benchmarks/gpu_peer.py                        # SD1.5 size, 512 px, batch 32, one GPU (< 8 min, compiles in)
    python benchmarks/gpu_peer.py --tiny                 # the same code paths on a CPU, tiny models (~1 min)
    python benchmarks/gpu_peer.py --batch=16 --peak-tflops=989 --out=/tmp/h100.json

Train steps, same batch and resolution, bf16 compute (SD1.5 config / mixed precision) on both sides, random weights
(nothing downloaded):
- codi_jax full CoDi (configs/depth.py, mode codi: UNet + duplicated encoder + mu, fp32 params / AdamW / EMA, remat)
  and PE-CoDi (mode pe_codi: frozen UNet, trained ControlNet-form encoder), each exactly the step train.setup
  compiles (recipes.Recipe, train.make_optimizer, train.make_train_step, jit with the state / frozen / batch shardings,
  donated state; the frozen VAE encoder and CLIP text encoder run inside the step), built from abstract values as
  benchmarks/aot_tpu.py does and filled with random weights on the device.
- the peer: diffusers' examples/controlnet/train_controlnet.py step (frozen bf16 UNet / VAE / text encoder, trained fp32
  ControlNetModel under bf16 autocast, DDPM noise, noise-prediction MSE, AdamW, grad clipping), and the same step with
  the UNet trained too (UNet + ControlNet, the full-CoDi equivalent). Its models are diffusers' UNet2DConditionModel /
  ControlNetModel.from_unet / AutoencoderKL and transformers' CLIPTextModel built from the diffusers configs of
  codi_jax's own modules (SD1.5's: block_out_channels 320-640-1280-1280, cross_attention_dim 768, 2 layers per block,
  attention_head_dim 8), so both sides train the same architecture.
Each step is warmed up, then timed call by call, each call ended by jax.block_until_ready / torch.cuda.synchronize;
images/s = batch / median step time. MFU = XLA's cost_analysis() FLOPs of the compiled step / step time / the card's
peak dense bf16 FLOP/s (PEAK_BF16_FLOPS by device kind, or --peak-tflops); null on a CPU.

Sampling latency at --sample-batch (1): CoDi 4 steps and DDIM 50 steps with the full-CoDi model in codi_jax (text
encoder + sampler loop + VAE decoder, compiled ahead of time), and diffusers' StableDiffusionControlNetPipeline with
LCMScheduler (4 steps) and DDIMScheduler (50 steps) from codi_jax's export.scheduler_config, guidance scale 1.

The work runs in two child processes, one after the other so that each framework has the card to itself: the
PyTorch peer (train steps, then its pipeline), then codi_jax (train steps compiled and timed one mode at a time, then
its samplers). Each child writes its results as it goes; one that fails or runs past the time budget (--budget-s,
450 s) leaves what it measured, and its log tail, in the JSON. The two targets: pe_codi_vs_controlnet_images_per_s
(codi_jax PE-CoDi / diffusers ControlNet, >= 1.2) and full_codi_mfu (>= 0.40).

--tiny runs the same code on the CPU: configs/depth.py:tiny (its float32 compute), the tiny VAE / CLIP / UNet and a
ControlNet from them, 32 px, batch 4; both children at once, XLA's CPU backend at optimisation level 0 and the
codi_jax programs compiled on a thread pool, since such a run is made of imports and compiles. Its figures check the
code paths and the JSON; they measure nothing.
Output: benchmarks/results/gpu_peer.json (--tiny: gpu_peer_tiny.json), or --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout without installing the package

# Peak dense (no sparsity) bf16 tensor FLOP/s per device, from the vendors' data sheets; the first entry whose key is
# in the device kind wins, so the specific names come before the general ones.
PEAK_BF16_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),  # SXM
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
)

TARGETS = {"pe_codi_vs_controlnet_images_per_s": 1.2, "full_codi_mfu": 0.40}
# The child processes: the PyTorch peer, then codi_jax (train steps, then sampling).
PARTS = ("torch", "jax")
JAX_MODES = {"codi": "codi_jax_full_codi", "pe_codi": "codi_jax_pe_codi"}
PEER_STEPS = ("diffusers_controlnet", "diffusers_unet_controlnet")


def peak_flops(kind: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return float(override_tflops) * 1e12, "--peak-tflops"
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in kind.lower():
            return value, f"PEAK_BF16_FLOPS[{key!r}] (dense bf16)"
    return None, f"unknown device kind {kind!r}: pass --peak-tflops" if kind.lower() != "cpu" else "cpu: no peak"


def settings(args) -> dict:
    """What both sides run, from --tiny and the overrides."""
    tiny = args.tiny
    s = {
        "image_size": args.image_size or (32 if tiny else 512),
        "batch": args.batch or (4 if tiny else 32),
        "sample_batch": args.sample_batch,
        "warmup_steps": args.warmup if args.warmup is not None else (1 if tiny else 3),
        "timed_steps": args.steps or (3 if tiny else 10),
        "step_time_cap_s": args.step_time_cap_s or (20.0 if tiny else 30.0),
        "sample_repeats": args.sample_repeats or (1 if tiny else 5),
        "sample_warmup": 0 if tiny else 1,
        "codi_steps": 4,
        "ddim_steps": 50,
    }
    return s


# ------------------------------------------------------------------------------------------------------------------
# Shared helpers (children).

class Recorder:
    """The part's results, rewritten to its file after every phase, so a killed child leaves what it measured."""

    def __init__(self, path: str):
        self.path, self.data = path, {"phases": {}}

    def set(self, key, value):
        self.data[key] = value
        self.save()

    def phase(self, name, value):
        self.data["phases"][name] = value
        self.save()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=_json_default)
        os.replace(tmp, self.path)


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def time_calls(call, sync, *, warmup: int, steps: int, cap_s: float, deadline: float) -> dict:
    """warmup calls (fewer past the deadline), then up to `steps` timed calls (at least 1, fewer past cap_s or near
    the deadline), each one ended by sync(result). Returns the median and the spread."""
    done = 0
    while done < warmup and (done == 0 or time.time() < deadline):
        sync(call())
        done += 1
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < steps:
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - t_start
        if spent > cap_s or time.time() + 2 * times[-1] > deadline:
            break
    med = statistics.median(times)
    return {"median_s": med, "mean_s": statistics.fmean(times), "min_s": min(times), "max_s": max(times),
            "timed": len(times), "warmup": done, "times_s": [round(t, 5) for t in times]}


def codi_config(mode: str, s: dict, tiny: bool):
    """configs/depth.py (SD1.5 presets: bf16 compute, remat; --tiny: its tiny variant, float32) for `mode` at the
    benchmark's batch and image size, no teacher (random weights)."""
    import importlib.util

    from codi_jax import config as config_lib

    spec = importlib.util.spec_from_file_location("depth_config", os.path.join(REPO, "configs", "depth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(("tiny," if tiny else "") + f"mode={mode},batch={s['batch']}")
    c.stages = ()
    c.run_eval = False
    c.teacher = ""
    c.vae_from = ""
    c.init_from = ""
    c.data.image_size = int(s["image_size"])
    return config_lib.finalize(c)


def diffusers_configs(recipe) -> dict:
    """The diffusers / transformers configs of the recipe's own UNet, VAE and text encoder, and the ControlNet's
    options (the peer is built from these)."""
    from codi_jax import data as data_lib
    from codi_jax.models import clip as clip_lib
    from codi_jax.models import unet as unet_lib
    from codi_jax.models import vae as vae_lib

    c = recipe.config
    text = {k: v for k, v in clip_lib.to_diffusers_config(recipe.text_encoder).items()
            if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
    return {"unet": unet_lib.to_diffusers_config(recipe.unet), "vae": vae_lib.to_diffusers_config(recipe.vae),
            "text_encoder": text,
            "controlnet": {"conditioning_channels": data_lib.cond_channels(c.data),
                           "conditioning_embedding_out_channels": list(c.model.hint_channels)},
            "schedule": c.schedule.to_dict(), "prediction_type": c.model.prediction_type, "dtype": c.dtype,
            "max_length": int(c.data.max_length), "codi_kw": recipe.codi_sampler_kwargs(),
            "timestep_spacing": recipe.timestep_spacing()}


def random_tree(abstract, key):
    """Random weights in the shapes of an (unboxed) abstract tree: norm scales 1, biases and mu 0, integer leaves 0,
    every other leaf N(0, 1 / fan_in) (N(0, 0.02) below 2-D). Values do not change the cost of a step; finite ones
    keep it honest. The normals come from a few flat draws sliced into leaves (a draw per leaf would put a threefry
    per parameter into the program: ~30 s of compile for the tiny model on a CPU)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    kinds = []
    for path, leaf in leaves:
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", ""))) if path else ""
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            kinds.append("zeros")
        elif name == "scale":
            kinds.append("ones")
        elif name in ("bias", "mu") or len(leaf.shape) == 0:
            kinds.append("zeros")
        else:
            kinds.append("normal")
    # Buckets of at most 2^28 normals per draw (well inside int32 indexing); leaves never straddle two buckets.
    buckets, sizes, size = [], [], 0
    for (_, leaf), kind in zip(leaves, kinds):
        n = math.prod(leaf.shape)
        if kind == "normal":
            if size and size + n > 1 << 28:
                sizes.append(size)
                size = 0
            buckets.append((len(sizes), size))
            size += n
        else:
            buckets.append(None)
    sizes.append(size)
    keys = jax.random.split(key, len(sizes))
    draws = [jax.random.normal(k, (max(n, 1),), jnp.float32) for k, n in zip(keys, sizes)]
    out = []
    for (_, leaf), kind, where in zip(leaves, kinds, buckets):
        if kind == "zeros":
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
        elif kind == "ones":
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            n = math.prod(leaf.shape)
            std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1])) if len(leaf.shape) >= 2 else 0.02
            x = jax.lax.dynamic_slice_in_dim(draws[where[0]], where[1], n) if n else draws[where[0]][:0]
            out.append((x.reshape(leaf.shape) * std).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_spec(config) -> dict:
    """The global batch train.setup's loader delivers (image, token ids, condition), as ShapeDtypeStructs."""
    from codi_jax import train

    return train.batch_spec(config)


def random_batch(spec: dict, vocab: int, seed: int = 0) -> dict:
    import numpy as np

    r = np.random.default_rng(seed)
    out = {}
    for k, v in spec.items():
        if k == "input_ids":
            out[k] = r.integers(0, vocab, v.shape).astype(np.int32)
        else:
            out[k] = r.uniform(-1.0, 1.0, v.shape).astype(np.float32)
    return out


def _jax_versions() -> dict:
    import flax
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}


def _chunked_attention(latent_size: int) -> bool:
    """Whether codi_jax's attention runs in query chunks at this latent size (lax.map: XLA's cost analysis of the
    compiled step counts the loop body once, so its FLOPs miss the other chunks)."""
    from codi_jax.models import layers

    tokens = latent_size * latent_size
    return bool(layers.ATTENTION_CHUNK_SCORES) and tokens * tokens > layers.ATTENTION_CHUNK_SCORES


# ------------------------------------------------------------------------------------------------------------------
# Child: codi_jax (train steps, then sampling).

class Program:
    """One mode's train step exactly as train.setup compiles it, from abstract values (benchmarks/aot_tpu.py's way)."""

    def __init__(self, config):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from codi_jax import recipes, parallel, train

        self.config = config
        self.recipe = recipes.make(config, tempfile.gettempdir(), abstract=True)
        self.tx, self.lr_schedule = train.make_optimizer(config)
        recipe, tx, target = self.recipe, self.tx, train.uses_target_ema(config)

        def init_boxed_state(rng):  # train.setup's, evaluated abstractly only
            params = recipe.init_fn(rng)
            return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                    ema_params=params, rng=rng, target_params=params if target else None)

        self.rules = parallel.rules_from_config(config.logical_axis_rules)
        with nn.logical_axis_rules(self.rules):
            self.abstract_boxed = jax.eval_shape(init_boxed_state, jax.random.PRNGKey(config.seed))
        self.step_fn = train.make_train_step(recipe, tx, self.lr_schedule, config)

    def lower(self, mesh):
        """The step jitted with train.setup's shardings on `mesh` (donated state, train.plan), lowered on abstract
        arguments. Returns (lowered, shardings)."""
        import flax.linen as nn
        import jax

        from codi_jax import checkpoint, parallel, train

        p = train.plan(self.config, self.recipe, mesh)
        abstract_frozen = checkpoint.abstract_with_shardings(nn.meta.unbox(self.recipe.frozen_abstract),
                                                             p.frozen_shardings)
        batch_sh = {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in p.batch_spec.items()}
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
                          for k, v in p.batch_spec.items()}
        with nn.logical_axis_rules(p.rules), jax.set_mesh(mesh):
            lowered = p.jit().lower(p.abstract_state, abstract_frozen, abstract_batch)
        return lowered, (p.state_shardings, p.frozen_shardings, batch_sh)

    def lower_init(self, shardings):
        """The random initialisation of the state (as train.setup's make_state: params, AdamW state, EMA = params)
        and of the frozen weights, in one program with the step's shardings, lowered (compiled beside the step)."""
        import jax
        import jax.numpy as jnp

        from codi_jax import train

        state_sh, frozen_sh, _ = shardings
        tx, target = self.tx, train.uses_target_ema(self.config)
        abstract_params = __import__("flax").linen.meta.unbox(self.abstract_boxed).params
        frozen_abstract = frozen_tree(self.recipe)

        def make(rng):
            params = random_tree(abstract_params, jax.random.fold_in(rng, 1))
            state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                     ema_params=params, rng=rng, target_params=params if target else None)
            return state, random_tree(frozen_abstract, jax.random.fold_in(rng, 2))

        out_sh = (state_sh, {k: frozen_sh[k] for k in frozen_abstract})
        return jax.jit(make, out_shardings=out_sh).lower(jax.ShapeDtypeStruct((2,), jnp.uint32))

    def materialise(self, init, shardings, seed: int = 0):
        """Random state and frozen weights (the compiled lower_init) and a random batch, on the device."""
        import jax

        from codi_jax import parallel

        _, frozen_sh, batch_sh = shardings
        state, frozen = init(jax.random.PRNGKey(seed))
        frozen["null_ids"] = parallel.put_global(self.recipe.frozen_host["null_ids"], frozen_sh["null_ids"])
        vocab = int(self.recipe.text_encoder.config.vocab_size)
        batch = parallel.put_global(random_batch(batch_spec(self.config), vocab, seed), batch_sh)
        return state, frozen, batch


def frozen_tree(recipe):
    """The recipe's frozen weights as an unboxed abstract tree (the tokenised null prompt left out)."""
    import flax.linen as nn

    return nn.meta.unbox({k: v for k, v in recipe.frozen_abstract.items() if k != "null_ids"})


def exact_attention_flops(program: Program) -> dict:
    """XLA's cost analysis of the lowered step with exact (unchunked) attention, lowered on one CPU device (a PJRT
    plugin backend such as CUDA has no cost analysis before compiling): every attention chunk counted, nothing
    compiled. Same remat, same arithmetic as the measured step."""
    import jax

    from codi_jax import parallel
    from codi_jax.models import layers

    t0 = time.perf_counter()
    cpu_mesh = parallel.make_mesh(program.config.mesh.to_dict(), jax.devices("cpu")[:1])
    chunk, layers.ATTENTION_CHUNK_SCORES = layers.ATTENTION_CHUNK_SCORES, 0
    try:
        lowered, _ = program.lower(cpu_mesh)
        cost = lowered.cost_analysis()
    finally:
        layers.ATTENTION_CHUNK_SCORES = chunk
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]), "seconds": round(time.perf_counter() - t0, 1),
            "source": "lowered step, exact attention, on the CPU (not compiled)"}


def make_sampler(recipe, method: str, steps: int, latent_shape: tuple):
    """recipe.sample's path as the export Pipeline runs it: text encoder, the sampler loop (one lax.fori_loop) over
    the conditional model, VAE decoder; no VAE encoder (recipe.sample encodes its batch's images, a pipeline does
    not)."""
    import jax.numpy as jnp

    from codi_jax.inference import sample_latents

    config = recipe.config

    def run(params, frozen, cond, ids, rng):
        te = {"params": frozen["text_encoder"]}
        inputs = {"latents": jnp.zeros(latent_shape, jnp.float32), "cond": cond,
                  "text": recipe.text_encoder.apply(te, ids).astype(jnp.float32),
                  "text_null": recipe.text_encoder.apply(te, frozen["null_ids"]).astype(jnp.float32)}
        latents = sample_latents(recipe.networks(frozen).apply, params, inputs, rng, method=method, num_steps=steps,
                                 schedule=recipe.schedule, prediction_type=config.model.prediction_type,
                                 guidance_scale=1.0, codi_kwargs=recipe.codi_sampler_kwargs(),
                                 timestep_spacing=recipe.timestep_spacing())
        images = recipe.vae.apply({"params": frozen["vae"]}, latents / recipe.vae_scale, method="decode")
        return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

    return run


class Compiles:
    """Ahead-of-time compiles by name: on demand in this thread (workers=1: nothing compiles while a step is timed, and
    on a GPU no autotuning runs beside it), or all at once on a thread pool (workers>1, --tiny: compile time is what
    a CPU run is made of)."""

    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self.jobs: dict = {}

    @staticmethod
    def _compile(lowered):
        t0 = time.perf_counter()
        compiled = lowered.compile()
        return compiled, time.perf_counter() - t0

    def submit(self, name: str, lowered) -> None:
        self.jobs[name] = self.pool.submit(self._compile, lowered) if self.pool else lowered

    def get(self, name: str):
        job = self.jobs.pop(name)
        return job.result() if self.pool else self._compile(job)

    def close(self):
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)


def run_jax(args, s: dict, rec: Recorder, deadline: float) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from codi_jax import parallel, train

    device = jax.devices()[0]
    rec.set("machine", {"device_kind": device.device_kind, "platform": jax.default_backend(),
                        "devices": jax.device_count(), "versions": _jax_versions(),
                        "xla_flags": os.environ.get("XLA_FLAGS", "")})
    if not args.tiny and jax.default_backend() == "cpu" and not args.allow_cpu:
        raise SystemExit("gpu_peer: no accelerator for jax (backend cpu): run with --tiny, or --allow-cpu")
    workers = args.compile_workers or (4 if args.tiny else 1)
    compiles = Compiles(workers)
    programs, shardings, times = {}, {}, {}
    # Trace and lower everything first (Python, seconds each), then compile: on demand, or all at once.
    for mode in ("codi", "pe_codi"):
        t0 = time.perf_counter()
        config = codi_config(mode, s, args.tiny)
        programs[mode] = Program(config)
        t1 = time.perf_counter()
        mesh = parallel.make_mesh(config.mesh.to_dict(), [device])
        lowered, shardings[mode] = programs[mode].lower(mesh)
        compiles.submit(mode, lowered)
        compiles.submit(f"{mode}_init", programs[mode].lower_init(shardings[mode]))
        times[mode] = {"setup_s": round(t1 - t0, 1), "trace_lower_s": round(time.perf_counter() - t1, 1)}
    recipe = programs["codi"].recipe
    sb = s["sample_batch"]
    spec = batch_spec(recipe.config)
    latent_shape = (sb, recipe.latent_size, recipe.latent_size, recipe.latent_channels)
    sample_args = (  # params, frozen, cond, ids, rng
        nn.meta.unbox(programs["codi"].abstract_boxed).params,
        {**frozen_tree(recipe), "null_ids": jax.ShapeDtypeStruct(recipe.frozen_host["null_ids"].shape, jnp.int32)},
        jax.ShapeDtypeStruct((sb,) + spec["cond"].shape[1:], jnp.float32),
        jax.ShapeDtypeStruct((sb,) + spec["input_ids"].shape[1:], jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.uint32))
    samplers = (("codi", s["codi_steps"]), ("ddim", s["ddim_steps"]))
    for method, steps in samplers:
        t0 = time.perf_counter()
        lowered = jax.jit(make_sampler(recipe, method, steps, latent_shape)).lower(*sample_args)
        times[f"{method}_{steps}"] = {"trace_lower_s": round(time.perf_counter() - t0, 1)}
        compiles.submit(f"{method}_{steps}", lowered)

    codi_params = codi_frozen = None
    for mode in ("codi", "pe_codi"):
        name = JAX_MODES[mode]
        if time.time() > deadline:
            rec.phase(name, {"skipped": "time budget spent"})
            continue
        try:
            row, params = _time_jax_mode(args, s, mode, programs[mode], shardings[mode], compiles, times[mode],
                                         workers, deadline)
        except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED: record it, go on with the other parts
            rec.phase(name, {"error": _one_line(e)})
            continue
        rec.phase(name, row)
        if mode == "codi":  # the sampling latency runs the full-CoDi model
            codi_params, codi_frozen = params
        del row, params

    if codi_params is None:
        compiles.close()
        for method, steps in samplers:
            rec.phase(f"codi_jax_{method}_{steps}", {"skipped": "no full-CoDi model"})
        return
    host = random_batch({"input_ids": sample_args[3], "cond": sample_args[2]},
                        int(recipe.text_encoder.config.vocab_size), 1)
    ids, cond = jnp.asarray(host["input_ids"]), jnp.asarray(host["cond"])
    rng = jax.random.PRNGKey(2)
    for method, steps in samplers:
        name = f"codi_jax_{method}_{steps}"
        if time.time() > deadline:
            rec.phase(name, {"skipped": "time budget spent"})
            continue
        try:
            compiled, compile_s = compiles.get(f"{method}_{steps}")
            timing = time_calls(lambda: compiled(codi_params, codi_frozen, cond, ids, rng), jax.block_until_ready,
                                warmup=s["sample_warmup"], steps=s["sample_repeats"], cap_s=s["step_time_cap_s"],
                                deadline=deadline)
        except Exception as e:  # noqa: BLE001
            rec.phase(name, {"error": _one_line(e)})
            continue
        rec.phase(name, {"what": f"codi_jax {method}, {steps} steps, full-CoDi model: text encoder + sampler loop + "
                                 "VAE decoder, guidance 1", "method": method, "steps": steps, "batch": sb,
                         "latency_s": timing["median_s"], "images_per_s": sb / timing["median_s"],
                         "timing": timing, "compile_s": round(compile_s, 1), **times[f"{method}_{steps}"]})
    compiles.close()
    del codi_params, codi_frozen

    # Last, as it only refines a figure: the FLOPs with every attention chunk counted, where attention is chunked.
    for mode in ("codi", "pe_codi"):
        name = JAX_MODES[mode]
        row = rec.data["phases"].get(name, {})
        if "images_per_s" not in row or args.exact_flops == "off":
            continue
        if not (row["attention_chunked"] or args.exact_flops == "on"):
            continue
        if time.time() + 30 > deadline:
            row["flops_per_step_exact_attention"] = {"skipped": "time budget spent"}
        else:
            try:
                row["flops_per_step_exact_attention"] = exact_attention_flops(programs[mode])
            except Exception as e:  # noqa: BLE001
                row["flops_per_step_exact_attention"] = {"error": _one_line(e)}
        rec.phase(name, row)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500] if str(e).strip() else ''}"


def _time_jax_mode(args, s, mode, program, shardings, compiles, times, workers, deadline):
    """Compile (or collect) one mode's step and initialisation, time the step; (row, (params, frozen))."""
    import jax

    from codi_jax import train

    compiled, compile_s = compiles.get(mode)
    info = train.log_compiled(compiled, compile_s)
    t0 = time.perf_counter()
    init, _ = compiles.get(f"{mode}_init")
    state, frozen, batch = program.materialise(init, shardings)
    jax.block_until_ready((state, frozen, batch))
    times["materialise_s"] = round(time.perf_counter() - t0, 1)
    holder = {"state": state}
    del state

    def call():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return holder["state"], metrics

    timing = time_calls(call, jax.block_until_ready, warmup=s["warmup_steps"], steps=s["timed_steps"],
                        cap_s=s["step_time_cap_s"], deadline=deadline)
    metrics = jax.device_get(call()[1])
    config = program.config
    row = {
        "what": {"codi": "codi_jax full CoDi train step (UNet + encoder copy + mu, EMA target forward)",
                 "pe_codi": "codi_jax PE-CoDi train step (frozen UNet, ControlNet-form encoder trained)"}[mode],
        "config": f"configs/depth.py:{'tiny,' if args.tiny else ''}mode={mode},batch={s['batch']}, "
                  f"data.image_size={s['image_size']}",
        "dtype": config.dtype, "remat": bool(config.remat),
        "images_per_s": s["batch"] / timing["median_s"],
        "step": timing,
        "trainable_parameters": sum(int(math.prod(x.shape)) for x in jax.tree.leaves(holder["state"].params)),
        "frozen_parameters": sum(int(math.prod(x.shape)) for x in jax.tree.leaves(frozen_tree(program.recipe))),
        "flops_per_step": info.get("flops"),
        "flops_source": "compiled.cost_analysis() of the step as run (counts remat's recomputed forward; a while "
                        "loop's body once)",
        "compile_s": round(compile_s, 1), "compile_workers": workers, **times,
        "memory": {k: v for k, v in info.items() if k.endswith("_in_bytes")},
        "last_loss": float(metrics["loss"]) if "loss" in metrics else None,
        "latent_size": program.recipe.latent_size,
        "attention_chunked": _chunked_attention(program.recipe.latent_size),
    }
    # Only the trained weights and the frozen ones leave: the optimizer state and EMA are freed with this frame.
    return row, (holder["state"].params, frozen)


# ------------------------------------------------------------------------------------------------------------------
# Child: the diffusers / PyTorch peer.

def peer_configs(args, s: dict) -> dict:
    """The diffusers configs of the full-CoDi recipe's own modules (an abstract Recipe: nothing is initialised)."""
    from codi_jax import recipes

    return diffusers_configs(recipes.make(codi_config("codi", s, args.tiny), tempfile.gettempdir(), abstract=True))




class Peer:
    """diffusers' train_controlnet.py recipe with --mixed_precision=bf16: VAE, text encoder and (frozen) UNet in bf16
    weights, trained models in fp32 under bf16 autocast (what accelerate's mixed_precision='bf16' does). With
    mixed_precision 'no' (--tiny, whose codi_jax config computes in float32) everything is float32, autocast off."""

    def __init__(self, cfgs: dict, device, train_unet: bool, checkpointing: bool, mixed_precision: str = "bf16"):
        import diffusers
        import torch
        import transformers

        self.torch, self.device, self.train_unet = torch, device, train_unet
        self.mixed_precision = mixed_precision
        self.weight_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
        with torch.device(device):  # random init on the device itself (SD1.5 on a CPU would take a minute)
            torch.manual_seed(0)
            self.unet = diffusers.UNet2DConditionModel.from_config(cfgs["unet"])
            self.vae = diffusers.AutoencoderKL.from_config(cfgs["vae"])
            self.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfgs["text_encoder"]))
            self.controlnet = diffusers.ControlNetModel.from_unet(self.unet, **cfgs["controlnet"])
        self.noise_scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=int(cfgs["schedule"]["num_train_timesteps"]),
            beta_start=float(cfgs["schedule"]["beta_start"]), beta_end=float(cfgs["schedule"]["beta_end"]),
            beta_schedule="scaled_linear", prediction_type=cfgs["prediction_type"])
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(train_unet)
        self.controlnet.train()
        if train_unet:
            self.unet.train()
        self.vae.to(dtype=self.weight_dtype)
        self.text_encoder.to(dtype=self.weight_dtype)
        if not train_unet:
            self.unet.to(dtype=self.weight_dtype)
        if checkpointing:  # the recipe's --gradient_checkpointing (train_text_to_image.py's for the UNet)
            self.controlnet.enable_gradient_checkpointing()
            if train_unet:
                self.unet.enable_gradient_checkpointing()
        params = list(self.controlnet.parameters()) + (list(self.unet.parameters()) if train_unet else [])
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self, pixel_values, input_ids, conditioning):
        torch = self.torch
        F = torch.nn.functional
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision == "bf16"):
            latents = self.vae.encode(pixel_values.to(dtype=self.weight_dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=latents.device).long()
            noisy_latents = self.noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(
                dtype=self.weight_dtype)
            encoder_hidden_states = self.text_encoder(input_ids, return_dict=False)[0]
            down, mid = self.controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                        controlnet_cond=conditioning.to(dtype=self.weight_dtype), return_dict=False)
            model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                   down_block_additional_residuals=[r.to(dtype=self.weight_dtype) for r in down],
                                   mid_block_additional_residual=mid.to(dtype=self.weight_dtype),
                                   return_dict=False)[0]
            if self.noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            else:
                target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # the recipe's default (--set_grads_to_none off)
        return loss.detach()


def run_torch(args, s: dict, rec: Recorder, deadline: float) -> None:
    from codi_jax.testing import make_torchvision_importable

    make_torchvision_importable()
    import diffusers
    import torch
    import transformers

    from codi_jax import export

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    rec.set("machine", {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                     "transformers": transformers.__version__,
                                     "cuda": torch.version.cuda if cuda else None,
                                     "cudnn": torch.backends.cudnn.version() if cuda else None},
                        "threads": torch.get_num_threads()})
    if not args.tiny and not cuda and not args.allow_cpu:
        raise SystemExit("gpu_peer: no CUDA device for torch: run with --tiny, or --allow-cpu")
    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    cfgs = peer_configs(args, s)
    rec.set("peer_configs", cfgs)
    # The precision of codi_jax's config: bf16 (SD1.5) is the recipe's --mixed_precision=bf16, float32 (tiny) 'no'.
    mixed_precision = "bf16" if cfgs["dtype"] == "bfloat16" else "no"
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    rec.set("mixed_precision", mixed_precision)
    b, size = s["batch"], s["image_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    pixel_values = (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(device)
    conditioning = torch.rand(b, cfgs["controlnet"]["conditioning_channels"], size, size, generator=g).to(device)
    input_ids = torch.randint(0, int(cfgs["text_encoder"]["vocab_size"]), (b, cfgs["max_length"]), generator=g).to(
        device)
    last = None
    for name, train_unet in (("diffusers_controlnet", False), ("diffusers_unet_controlnet", True)):
        if time.time() > deadline:
            rec.phase(name, {"skipped": "time budget spent"})
            continue
        tries = {"off": [False], "on": [True], "auto": [False, True]}[args.peer_checkpointing]
        row, errors = None, []
        for checkpointing in tries:
            peer = None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                peer = Peer(cfgs, device, train_unet, checkpointing, mixed_precision)
                build_s = time.perf_counter() - t0
                timing = time_calls(lambda: peer.step(pixel_values, input_ids, conditioning), sync,
                                    warmup=s["warmup_steps"], steps=s["timed_steps"], cap_s=s["step_time_cap_s"],
                                    deadline=deadline)
            except torch.OutOfMemoryError as e:
                errors.append(f"gradient_checkpointing={checkpointing}: {str(e).splitlines()[0][:300]}")
                oom = True
            except Exception as e:  # noqa: BLE001 - recorded; the other phases still run
                errors.append(_one_line(e))
                peer = None
                break
            else:
                oom = False
            if oom:
                peer = None
                import gc

                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                continue
            row = {
                "what": {False: "diffusers train_controlnet.py step: frozen UNet, ControlNet trained",
                         True: "the same step with the UNet trained too (UNet + ControlNet)"}[train_unet],
                "mixed_precision": mixed_precision,
                "images_per_s": b / timing["median_s"], "step": timing, "gradient_checkpointing": checkpointing,
                "trainable_parameters": peer.trainable(), "build_s": round(build_s, 1),
                "last_loss": float(peer.step(pixel_values, input_ids, conditioning)),
                "oom_before": errors or None,
            }
            if cuda:
                row["max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            rec.phase(name, row)
            if args.peer_flops and time.time() + 3 * timing["median_s"] < deadline:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    peer.step(pixel_values, input_ids, conditioning)
                    sync(None)
                row["flops_per_step_torch_counter"] = float(counter.get_total_flops())
                rec.phase(name, row)
            last = peer
            break
        if row is None:
            rec.phase(name, {"error": "; ".join(errors) or "no result"})
        if not train_unet:
            del peer
            last = None
            if cuda:
                torch.cuda.empty_cache()

    # Sampling: diffusers' ControlNet pipeline on the full (UNet + ControlNet) models, in the compute dtype.
    if last is None:
        rec.phase("diffusers_sampling", {"skipped": "no trained peer models"})
        return
    for p in last.params:
        p.grad = None
    last.optimizer = None
    unet, controlnet = last.unet.to(dtype).eval(), last.controlnet.to(dtype).eval()
    vae, text_encoder = last.vae, last.text_encoder
    del last
    if cuda:
        torch.cuda.empty_cache()
    sb = s["sample_batch"]
    cond = conditioning[:sb].to(dtype)
    ids = input_ids[:sb]
    meta = {"schedule": cfgs["schedule"], "prediction_type": cfgs["prediction_type"],
            "timestep_spacing": cfgs["timestep_spacing"], **cfgs["codi_kw"]}
    for method, steps in (("lcm", s["codi_steps"]), ("ddim", s["ddim_steps"])):
        name = f"diffusers_{method}_{steps}"
        if time.time() > deadline:
            rec.phase(name, {"skipped": "time budget spent"})
            continue
        try:
            sched_cfg = export.scheduler_config({**meta, "default_sampler": ["codi" if method == "lcm" else "ddim",
                                                                               steps]})
            scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
            pipe = diffusers.StableDiffusionControlNetPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, controlnet=controlnet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            gen = torch.Generator(device=device).manual_seed(0)

            def call(pipe=pipe, gen=gen, steps=steps):
                with torch.inference_mode():
                    embeds = text_encoder(ids, return_dict=False)[0]
                    return pipe(prompt_embeds=embeds, image=cond, num_inference_steps=steps, guidance_scale=1.0,
                                height=size, width=size, output_type="pt", generator=gen).images

            timing = time_calls(call, sync, warmup=s["sample_warmup"], steps=s["sample_repeats"],
                                cap_s=s["step_time_cap_s"], deadline=deadline)
        except Exception as e:  # noqa: BLE001 - recorded; the other sampler still runs
            rec.phase(name, {"error": _one_line(e)})
            continue
        rec.phase(name, {"what": f"diffusers StableDiffusionControlNetPipeline, {sched_cfg['_class_name']} "
                                 f"{steps} steps, {dtype} (text encoder + pipeline call, output_type='pt')",
                         "method": method, "steps": steps, "batch": sb, "latency_s": timing["median_s"],
                         "images_per_s": sb / timing["median_s"], "timing": timing})


# ------------------------------------------------------------------------------------------------------------------
# Parent: runs the parts and writes the JSON.

def _child_env(part: str, tiny: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if part == "torch" or tiny:
        env["JAX_PLATFORMS"] = "cpu"  # the peer imports codi_jax for its configs only: jax must not take GPU memory
    if part == "jax" and tiny:
        # Tiny CPU programs: their figures are not the point, their compile time is (the run must stay short).
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                            " --xla_llvm_disable_expensive_passes=true").strip()
    elif part == "jax":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # one framework per process: XLA may take the card
    return env


def _ratio(num, den):
    return num / den if num and den else None


def summarise(out: dict, parts: dict, s: dict, args) -> None:
    jx, tr = (parts.get(p, {}).get("phases", {}) for p in ("jax", "torch"))
    is_train = lambda k, v: k in JAX_MODES.values() or k in PEER_STEPS  # noqa: E731
    train_rows = {k: v for k, v in {**jx, **tr}.items() if is_train(k, v)}
    sampling = {k: v for k, v in {**jx, **tr}.items() if not is_train(k, v)}
    machine = parts.get("jax", {}).get("machine") or {}
    kind = machine.get("device_kind") or (parts.get("torch", {}).get("machine") or {}).get("device") or "unknown"
    peak, peak_source = peak_flops(kind, args.peak_tflops)
    if machine.get("platform") == "cpu" and not args.peak_tflops:
        peak, peak_source = None, "cpu: no peak FLOP/s, MFU null"
    for key, row in train_rows.items():
        if "images_per_s" not in row:
            continue
        med = row["step"]["median_s"]
        if key in JAX_MODES.values():
            row["mfu"] = row["flops_per_step"] / med / peak if peak and row.get("flops_per_step") else None
            exact = (row.get("flops_per_step_exact_attention") or {}).get("flops")
            row["mfu_exact_attention_flops"] = exact / med / peak if peak and exact else None
        else:
            f = row.get("flops_per_step_torch_counter")
            row["mfu_torch_flop_counter"] = f / med / peak if peak and f else None
    out["device_kind"] = kind
    out["peak_bf16_flops"] = peak
    out["peak_source"] = peak_source
    out["train_steps"] = train_rows
    lat = lambda k: sampling.get(k, {}).get("latency_s")  # noqa: E731
    c, d = s["codi_steps"], s["ddim_steps"]
    out["sampling"] = sampling
    out["sampling_ratios"] = {
        "codi_jax_ddim_over_codi_latency": _ratio(lat(f"codi_jax_ddim_{d}"), lat(f"codi_jax_codi_{c}")),
        "diffusers_ddim_over_lcm_latency": _ratio(lat(f"diffusers_ddim_{d}"), lat(f"diffusers_lcm_{c}")),
        "codi_jax_codi_vs_diffusers_lcm_speedup": _ratio(lat(f"diffusers_lcm_{c}"), lat(f"codi_jax_codi_{c}")),
        "codi_jax_ddim_vs_diffusers_ddim_speedup": _ratio(lat(f"diffusers_ddim_{d}"), lat(f"codi_jax_ddim_{d}")),
    }
    ips = lambda k: train_rows.get(k, {}).get("images_per_s")  # noqa: E731
    ratio = _ratio(ips("codi_jax_pe_codi"), ips("diffusers_controlnet"))
    target = TARGETS["pe_codi_vs_controlnet_images_per_s"]
    out["pe_codi_vs_controlnet_images_per_s"] = {"value": ratio, "target": target,
                                                 "meets_target": bool(ratio is not None and ratio >= target)}
    out["full_codi_vs_unet_controlnet_images_per_s"] = {
        "value": _ratio(ips("codi_jax_full_codi"), ips("diffusers_unet_controlnet"))}
    mfu = train_rows.get("codi_jax_full_codi", {}).get("mfu")
    target = TARGETS["full_codi_mfu"]
    out["full_codi_mfu"] = {
        "value": mfu, "target": target, "meets_target": bool(mfu is not None and mfu >= target),
        "value_exact_attention_flops": train_rows.get("codi_jax_full_codi", {}).get("mfu_exact_attention_flops"),
        "flops": "XLA cost_analysis() of the compiled step: it counts remat's recomputed forward (so this is nearer "
                 "hardware-FLOPs utilisation than model-FLOPs) and a while loop's body once (chunked attention: one "
                 "chunk per layer); value_exact_attention_flops takes the lowered step with exact attention instead"}
    if peak is None:
        out["full_codi_mfu"]["why_null"] = peak_source


def _run_part(part: str, argv: list, tmp: str, part_deadline: float, tiny: bool):
    part_out = os.path.join(tmp, f"{part}.json")
    log_path = os.path.join(tmp, f"{part}.log")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--part={part}", f"--part-out={part_out}",
           f"--deadline={part_deadline - 5}"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=_child_env(part, tiny), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return {"proc": proc, "log": log, "log_path": log_path, "out": part_out, "t0": time.time(),
            "deadline": part_deadline}


def _finish_part(run: dict) -> tuple[dict, dict]:
    proc = run["proc"]
    try:
        rc = proc.wait(timeout=max(run["deadline"] - time.time() + 20, 10))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "killed: past the time budget"
    run["log"].close()
    info = {"rc": rc, "wall_s": round(time.time() - run["t0"], 1)}
    try:
        with open(run["out"]) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    if rc != 0:
        with open(run["log_path"], errors="replace") as f:
            info["log_tail"] = f.read()[-4000:]
        if data.get("error"):
            info["error"] = data["error"]
    return info, data


def _without(argv: list, options: tuple) -> list:
    """argv less the given options, in either form (--opt=value, --opt value)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (CI): the same code paths, ~1 min")
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/gpu_peer[_tiny].json)")
    ap.add_argument("--batch", type=int, default=0, help="train batch (default 32; --tiny 4)")
    ap.add_argument("--image-size", type=int, default=0, help="pixels (default 512; --tiny 32)")
    ap.add_argument("--sample-batch", type=int, default=1, help="images per sampling call (latency: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 3; --tiny 1)")
    ap.add_argument("--steps", type=int, default=0, help="timed train steps (default 10; --tiny 3)")
    ap.add_argument("--sample-repeats", type=int, default=0,
                    help="timed sampling calls (default 5 after 1 untimed; --tiny 1, none untimed)")
    ap.add_argument("--step-time-cap-s", type=float, default=0.0,
                    help="stop timing one step or sampler after this many seconds (default 30; --tiny 20)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s of the device (overrides PEAK_BF16_FLOPS)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall-clock budget of the whole run (default 450; --tiny 300): phases past it are skipped, "
                         "a part still running 20 s after it is stopped, and what was measured is written")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--compile-workers", type=int, default=0,
                    help="codi_jax programs compiled at once (default 1: on demand, nothing compiles while a step "
                         "is timed; --tiny 4)")
    ap.add_argument("--peer-checkpointing", choices=("auto", "off", "on"), default="auto",
                    help="the peer's gradient checkpointing (train_controlnet.py --gradient_checkpointing); auto: "
                         "off, and on only after an out-of-memory")
    ap.add_argument("--no-peer-flops", dest="peer_flops", action="store_false",
                    help="skip the peer's FLOP count (torch.utils.flop_counter, one extra step each)")
    ap.add_argument("--exact-flops", choices=("auto", "on", "off"), default="auto",
                    help="also count the codi_jax steps' FLOPs with exact attention (a CPU lowering, last): auto = "
                         "only where attention is chunked (SD1.5 at 512 px)")
    ap.add_argument("--parts-at-once", choices=("auto", "on", "off"), default="auto",
                    help="run the peer and codi_jax processes at the same time (auto: with --tiny only; on a GPU they "
                         "run one after the other, each with the card to itself)")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full size without an accelerator")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    s = settings(args)

    if args.part:  # a child
        rec = Recorder(args.part_out)
        deadline = args.deadline or float("inf")
        try:
            {"jax": run_jax, "torch": run_torch}[args.part](args, s, rec, deadline)
        except SystemExit as e:
            message = e.code if isinstance(e.code, str) else getattr(e, "message", None)  # CheckpointError: .message
            if message:
                rec.set("error", message)
            raise
        except BaseException:
            rec.set("error", traceback.format_exc()[-3000:])
            raise
        return 0

    wanted = [p for p in args.parts.split(",") if p]
    bad = [p for p in wanted if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown {bad} (known: {', '.join(PARTS)})")
    out_path = args.out or os.path.join(REPO, "benchmarks", "results",
                                        "gpu_peer_tiny.json" if args.tiny else "gpu_peer.json")
    budget = args.budget_s or (300.0 if args.tiny else 450.0)
    start = time.time()
    deadline = start + budget
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO + os.sep) else "python"
    out = {
        "benchmark": "gpu_peer",
        "command": " ".join(shlex.quote(a) for a in [python, "benchmarks/gpu_peer.py", *argv]),
        "tiny": args.tiny,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": s["batch"], "image_size": s["image_size"], "settings": s,
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                 "load_average_start": [round(x, 2) for x in os.getloadavg()]},
    }
    parts: dict = {}
    runs: dict = {}
    forwarded = _without(argv, ("--out", "--parts", "--parts-at-once"))
    at_once = args.parts_at_once == "on" or (args.parts_at_once == "auto" and args.tiny)
    with tempfile.TemporaryDirectory(prefix="gpu_peer_") as tmp:
        if at_once:
            # Both children at once: on a CPU their figures mean nothing, and the run is made of compiles and imports.
            started = {p: _run_part(p, forwarded, tmp, deadline, True) for p in PARTS if p in wanted}
            for p, run in started.items():
                runs[p], parts[p] = _finish_part(run)
        else:
            # One after the other, so each framework has the card to itself: the peer first (its cost is
            # predictable, about a sixth of a run), until 40 % of the budget at most; then codi_jax with the rest.
            for p, share in (("torch", 0.4), ("jax", 1.0)):
                if p not in wanted:
                    continue
                part_deadline = min(deadline, start + share * budget) if p == "torch" else deadline
                if time.time() > part_deadline - 10:
                    runs[p] = {"skipped": "time budget spent"}
                    continue
                runs[p], parts[p] = _finish_part(_run_part(p, forwarded, tmp, part_deadline, False))
        for p, r in runs.items():
            print(f"[gpu_peer] {p}: {r.get('rc', r.get('skipped'))} in {r.get('wall_s')} s", file=sys.stderr,
                  flush=True)
    out["parts"] = runs
    out["machine"] = {p: parts[p].get("machine") for p in parts}
    out["versions"] = {**(parts.get("jax", {}).get("machine") or {}).get("versions", {}),
                       **(parts.get("torch", {}).get("machine") or {}).get("versions", {})}
    summarise(out, parts, s, args)
    cfgs = parts.get("torch", {}).get("peer_configs")
    out["peer_configs"] = cfgs
    out["wall_s"] = round(time.time() - start, 1)
    out["host"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out["notes"] = [
        "images_per_s = batch / median step time; every timed call ended by block_until_ready / cuda.synchronize.",
        "Work per step differs by design: CoDi also runs a gradient-free forward of the EMA target and updates the "
        "EMA; the peer steps are plain noise-prediction training (train_controlnet.py's).",
        "The peer is built from the diffusers configs of codi_jax's own modules (peer_configs), so both sides train "
        "the same UNet / VAE / text encoder; its ControlNet takes the task's condition channels.",
        "The peer's FLOPs (flops_per_step_torch_counter) come from torch.utils.flop_counter, another counter than "
        "XLA's: its MFU is for orientation only.",
        "Random weights on both sides (values do not change the cost of a step).",
    ] + (["--tiny: tiny models on the CPU, XLA's CPU backend at optimisation level 0, the parts at once: the "
          "figures check the code paths, they measure nothing."] if args.tiny else []) + (
        ["The peer and codi_jax ran at the same time (--parts-at-once)."] if at_once and not args.tiny else [])
    text = json.dumps(out, indent=1, default=_json_default)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"[gpu_peer] wrote {out_path} in {out['wall_s']} s", file=sys.stderr)
    return 0 if all(r.get("rc") == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
