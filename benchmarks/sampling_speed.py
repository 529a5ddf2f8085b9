"""Sampling speed: teacher DDIM at 50 steps vs CoDi at 4 steps, same UNet, batch and latents. Prints JSON.

    python benchmarks/sampling_speed.py                       # tiny UNet, 8x8x4 latents, batch 8 (CPU-sized)
    python benchmarks/sampling_speed.py --size=small --batch=16 --latent=16

Both samplers are compiled ahead of time (jit(...).lower(...).compile()), run once to warm up, then timed as the median
of --repeats calls, each ended by block_until_ready. The goal (docs/design.md) is wall ratio >= 0.9 x NFE ratio: a sampler
step must cost about one network evaluation, with no per-step overhead outside the compiled loop. `call_overhead_s` is
a compiled no-op called with the same arguments: the fixed per-call cost both samplers pay once, which caps the ratio
when one network evaluation is short (tiny UNets on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Run as a script from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from codi_jax import diffusion as D  # noqa: E402
from codi_jax.models import unet as unet_lib  # noqa: E402

SIZES = {
    "tiny": lambda: unet_lib.UNetConfig.preset("tiny"),
    # the (64, 128) row of docs/design.md's sizing table
    "small": lambda: unet_lib.UNetConfig.preset("tiny", block_out_channels=(64, 128), attention_head_dim=8, sample_size=16),
}


def _timed(fn, *args, repeats: int) -> tuple[float, list[float]]:
    jax.block_until_ready(fn(*args))  # warm-up after the AOT compile (allocations, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent", type=int, default=8, help="latent height = width")
    ap.add_argument("--text_len", type=int, default=8)
    ap.add_argument("--teacher_steps", type=int, default=50)
    ap.add_argument("--codi_steps", type=int, default=4)
    ap.add_argument("--distill_steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prediction_type", default="v_prediction")
    args = ap.parse_args()

    cfg = SIZES[args.size]()
    module = unet_lib.UNet2DConditionModel(cfg)
    k_init, k_z, k_txt = jax.random.split(jax.random.PRNGKey(0), 3)
    z_T = jax.random.normal(k_z, (args.batch, args.latent, args.latent, cfg.in_channels))
    text = jax.random.normal(k_txt, (args.batch, args.text_len, cfg.cross_attention_dim))
    params = jax.jit(module.init)(k_init, z_T, jnp.zeros((args.batch,), jnp.int32), text)["params"]
    schedule = D.make_schedule()
    n_params = sum(x.size for x in jax.tree.leaves(params))

    def sampler(method, steps, **kw):
        def run(params, z, text):
            model_fn = lambda z, t: module.apply({"params": params}, z, t, text)
            return D.sample(model_fn, z, method=method, num_steps=steps, schedule=schedule,
                            prediction_type=args.prediction_type, **kw)
        t0 = time.perf_counter()
        compiled = jax.jit(run).lower(params, z_T, text).compile()
        return compiled, time.perf_counter() - t0

    ddim, ddim_compile = sampler("ddim", args.teacher_steps)
    codi, codi_compile = sampler("codi", args.codi_steps, distill_steps=args.distill_steps)
    ddim_s, ddim_all = _timed(ddim, params, z_T, text, repeats=args.repeats)
    codi_s, codi_all = _timed(codi, params, z_T, text, repeats=args.repeats)

    # One network evaluation, compiled alone, as the per-NFE reference cost.
    unet_call = jax.jit(lambda p, z, t, c: module.apply({"params": p}, z, t, c)).lower(
        params, z_T, jnp.full((args.batch,), 500, jnp.int32), text).compile()
    unet_s, _ = _timed(unet_call, params, z_T, jnp.full((args.batch,), 500, jnp.int32), text, repeats=args.repeats * 4)

    # The fixed cost of calling a compiled function with these arguments (the params pytree, latents, text) and doing
    # nothing: both samplers pay it once per call, so it bounds the wall ratio from below at small sizes.
    noop = jax.jit(lambda p, z, c: z + 1.0).lower(params, z_T, text).compile()
    call_s, _ = _timed(noop, params, z_T, text, repeats=args.repeats * 4)

    codi_nfe = len(D.codi_timesteps(args.codi_steps, args.distill_steps, schedule.num_train_timesteps))
    nfe_ratio = args.teacher_steps / codi_nfe

    wall_ratio = ddim_s / codi_s
    print(json.dumps({
        "benchmark": "sampling_speed",
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "unet": args.size, "unet_params": int(n_params), "batch": args.batch,
        "latent_shape": [args.latent, args.latent, cfg.in_channels], "prediction_type": args.prediction_type,
        "teacher": {"method": "ddim", "nfe": args.teacher_steps, "wall_s": ddim_s, "compile_s": ddim_compile,
                    "runs_s": ddim_all, "s_per_nfe_over_unet_call": ddim_s / args.teacher_steps / unet_s},
        "codi": {"method": "codi", "nfe": codi_nfe, "wall_s": codi_s, "compile_s": codi_compile, "runs_s": codi_all,
                 "s_per_nfe_over_unet_call": codi_s / codi_nfe / unet_s},
        "unet_call_s": unet_s,
        "call_overhead_s": call_s,
        "nfe_ratio": nfe_ratio,
        "wall_ratio": wall_ratio,
        "wall_over_nfe_ratio": wall_ratio / nfe_ratio,
        "wall_ratio_without_call_overhead": (ddim_s - call_s) / (codi_s - call_s),
        "goal": "wall_ratio >= 0.9 * nfe_ratio", "meets_goal": bool(wall_ratio >= 0.9 * nfe_ratio),
    }, indent=1))


if __name__ == "__main__":
    main()
