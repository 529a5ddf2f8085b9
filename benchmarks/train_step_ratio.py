"""Train-step cost: CoDi step / finetune step (and PE-CoDi / finetune) on the same tiny model and batch. Prints JSON.

    python benchmarks/train_step_ratio.py                    # configs/depth.py:tiny, batch 32, this CPU
    python benchmarks/train_step_ratio.py --device=gpu --steps=20

Each mode is built by `train.setup` (the real loop's mesh, shardings and ahead-of-time compiled, donated step) from the
same random tiny teacher (codi_jax.testing.make_random_pipeline). Batches come from each setup's real data loader and
are fetched before timing, so only the step is measured. After one warm-up step per mode the modes are timed
interleaved (codi, finetune, pe_codi, codi, ...), each call ended by block_until_ready, so load from other processes on
a shared machine hits every mode alike; the figures are medians. Goal (docs/design.md): codi / finetune <= 1.05 x its
ideal. Fine-tuning runs one forward and backward (3 forward-units); CoDi adds one gradient-free forward of the EMA
target (ideal 4/3, the paper's online PF-ODE: `codi_online`) and, with the teacher's PF-ODE (the x-space default,
`codi`), one of the frozen teacher (ideal 5/3).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout without installing the package

MODES = ("codi", "finetune", "pe_codi", "codi_online")
IDEAL = {"codi": 5 / 3, "codi_online": 4 / 3}


def _config(mode: str, teacher: str, batch: int):
    spec = importlib.util.spec_from_file_location("depth_config", os.path.join(REPO, "configs", "depth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    online = mode == "codi_online"
    mode = "codi" if online else mode
    c = module.get_config(f"tiny,mode={mode},batch={batch}")  # finalize() sets cond_mode / freeze_unet per mode
    if online:
        c.objective.pf_ode = "online"
    c.stages = ()  # the teacher is given: no vae / pretrain stages
    c.run_eval = False
    c.teacher = teacher
    c.vae_from = ""  # the teacher's vae/
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu", "tpu"), default="cpu")
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per mode (median; at least 10)")
    ap.add_argument("--batches", type=int, default=4, help="distinct real batches per mode, cycled")
    ap.add_argument("--teacher", default="", help="tiny diffusers pipeline folder; default: a fresh random one")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "train_step_ratio.json"))
    args = ap.parse_args()
    if args.steps < 10:
        ap.error("--steps must be at least 10 (the figure is a median)")
    # Must be set before jax is imported; one device so the measured step is the model, not the fake-device sharding.
    os.environ["JAX_PLATFORMS"] = args.device
    os.environ.pop("XLA_FLAGS", None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import jax

    from codi_jax import parallel, train
    from codi_jax.testing import make_random_pipeline

    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="train_step_ratio_") as tmp:
        teacher = args.teacher or make_random_pipeline(os.path.join(tmp, "teacher"))
        runs = {}
        for mode in MODES:
            s = train.setup(_config(mode, teacher, args.batch), os.path.join(tmp, mode))
            batches = []
            for _ in range(args.batches):
                local = next(s.data_iter)
                batches.append(parallel.global_batch({k: local[k] for k in s.batch_spec}, s.mesh))
            jax.block_until_ready(batches)
            state, metrics = s.step_fn(s.state, s.frozen, batches[0])  # warm-up (allocations, thread pools)
            jax.block_until_ready((state, metrics))
            runs[mode] = {"setup": s, "state": state, "batches": batches, "times": []}

        load["after_compile"] = os.getloadavg()
        for i in range(args.steps):
            for mode in MODES:  # interleaved: contention from other processes hits all modes alike
                r = runs[mode]
                s = r["setup"]
                batch = r["batches"][(i + 1) % len(r["batches"])]
                t0 = time.perf_counter()
                r["state"], metrics = s.step_fn(r["state"], s.frozen, batch)
                jax.block_until_ready((r["state"], metrics))
                r["times"].append(time.perf_counter() - t0)
        load["end"] = os.getloadavg()
        for mode in MODES:
            assert len(runs[mode]["setup"].traces) == 1, f"{mode}: the step was traced more than once"
            runs[mode]["setup"].checkpointer.close()

    med = {mode: statistics.median(runs[mode]["times"]) for mode in MODES}
    out = {
        "machine": {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
                    "devices": jax.device_count(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "jax": jax.__version__},
        "config": {"config": "configs/depth.py:tiny", "batch": args.batch, "timed_steps": args.steps,
                   "order": "interleaved " + " ".join(MODES), "statistic": "median"},
        "load_average_1_5_15": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "modes": {
            mode: {
                "median_step_s": round(med[mode], 4),
                "steps_per_s": round(1.0 / med[mode], 3),
                "min_step_s": round(min(runs[mode]["times"]), 4),
                "max_step_s": round(max(runs[mode]["times"]), 4),
                "trainable_parameters": int(runs[mode]["setup"].compile_info["trainable_parameters"]),
                "compile_seconds": runs[mode]["setup"].compile_info.get("compile_seconds"),
                "flops": runs[mode]["setup"].compile_info.get("flops"),
            }
            for mode in MODES
        },
        "ratio_codi_over_finetune": round(med["codi"] / med["finetune"], 3),
        "ratio_pe_codi_over_finetune": round(med["pe_codi"] / med["finetune"], 3),
        "ratio_codi_online_over_finetune": round(med["codi_online"] / med["finetune"], 3),
        "goal": "codi / finetune <= 1.05 x ideal: 5/3 with the teacher's PF-ODE (default), 4/3 with the online one",
    }
    flops = {m: out["modes"][m]["flops"] for m in MODES}
    if flops["codi"] and flops["finetune"]:
        out["flops_ratio_codi_over_finetune"] = round(flops["codi"] / flops["finetune"], 3)
        out["flops_ratio_pe_codi_over_finetune"] = round(flops["pe_codi"] / flops["finetune"], 3)
        out["flops_ratio_codi_online_over_finetune"] = round(flops["codi_online"] / flops["finetune"], 3)
    out["meets_goal"] = all(out[f"ratio_{m}_over_finetune"] <= 1.05 * ideal for m, ideal in IDEAL.items())
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
