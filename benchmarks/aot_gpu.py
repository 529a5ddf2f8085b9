"""The single-GPU recipe (an 80 GB card, SD1.5 scale) from a compiled memory plan. Writes
benchmarks/results/aot_gpu.json and .md (--out), and prints the JSON.

    python -m venv /tmp/venv-tpu
    /tmp/venv-tpu/bin/pip install -c constraints.txt -r requirements.txt "jax[tpu]==0.10.2"
    /tmp/venv-tpu/bin/python benchmarks/aot_gpu.py --candidates=64,128,256/4      # 3 compiles, ~10-30 min each here

No GPU compiler runs without a GPU, so this plan is the TPU compiler's, not the GPU compiler's. For each candidate
(global batch B, optionally over A micro-batches: "B/A" sets optimizer.grad_accum_steps=A) benchmarks/aot_tpu.py
compiles the default train step of configs/depth.py (mode codi, the default objective: x-space CoDi with the
teacher's PF-ODE, so a frozen teacher UNet sits beside the trained one; SD1.5 UNet + duplicated encoder + mu, 512 px,
bf16 compute, remat per block, fp32 params / AdamW / EMA, grad clipping, the frozen VAE encoder and CLIP text encoder
inside the step) for ONE v5p chip (95 GiB of HBM) and stops after the compiler's buffer assignment (--stage=buffers):
every buffer of the step on that one device (state, frozen weights, batch, temporaries). The chip has more memory
than the GPU, so at 60-70 GiB its compiler is not yet trading recompute for memory as it does near its own limit.

Planned memory = buffer-assignment total x (1 + CODEGEN_GROWTH) + CODE_GIB: code generation, which the buffer stage
skips, added 5.9 % and 6.9 % to that total and 0.5 GiB of code for SD1.5 on v4 (benchmarks/README.md). A candidate
fits when its planned memory is at most (1 - --margin) x --gpu_gib. The recipe is the fitting candidate with the
largest global batch (then the fewest micro-batches). What a GPU user does to confirm it on the card (the GPU
compiler's own memory_analysis) is in benchmarks/README.md and launch/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

from provenance import commit as git_commit  # benchmarks/provenance.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_TPU = os.path.join(REPO, "benchmarks", "aot_tpu.py")
TOPOLOGY = "v5p-1chip"  # aot_tpu.TOPOLOGIES: one v5p chip
CHIP_HBM_GIB = 95.0
GIB = 1 << 30
# Measured on SD1.5 (benchmarks/README.md, v4-32 batch 256): the finished executable's memory_analysis() total over
# the buffer-assignment total, 15.38 / 14.53 and 31.18 / 29.17 GiB; and its generated code, 0.52 GiB.
CODEGEN_GROWTH = 0.07
CODE_GIB = 0.6
H100_PEAK_BF16_FLOPS = 989e12  # dense, SXM, NVIDIA's data sheet
STEP_ESTIMATE_MFU = 0.4
# The recipe's settings besides the batch: the config's own defaults, passed explicitly so that the plan and the
# command line that runs it stay the same if a default changes.
FIXED = {"remat": "true", "dtype": "bfloat16"}


def parse_candidate(text: str) -> tuple[int, int]:
    batch, _, accum = text.partition("/")
    b, a = int(batch), int(accum or 1)
    if b <= 0 or a <= 0 or b % a:
        raise argparse.ArgumentTypeError(f"candidate {text!r}: batch/accum with accum dividing batch, e.g. 256/4")
    return b, a


def provenance() -> dict:
    import jax

    try:
        from importlib.metadata import version

        libtpu = version("libtpu")
    except Exception:  # noqa: BLE001 - reported as unknown, not guessed
        libtpu = None
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return {
        # Where this machine keeps its venv and scratch folders says nothing about the plan: python, and no folders.
        "command": shlex.join(["python", os.path.relpath(os.path.abspath(__file__), REPO),
                               *(a for a in sys.argv[1:] if not a.startswith(("--parts_dir", "--log_dir")))]),
        **git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "memory_gib": mem,
                    "python": platform.python_version(), "jax": jax.__version__, "libtpu": libtpu},
    }


def compile_candidate(batch: int, accum: int, parts_dir: str, log_dir: str, extra: list[str]) -> dict:
    """One buffer-stage compile through benchmarks/aot_tpu.py (a child process); its trial row."""
    out = os.path.join(parts_dir, f"b{batch}_a{accum}.json")
    argv = [sys.executable, AOT_TPU, "--stage=buffers", f"--topology={TOPOLOGY}", f"--batch={batch}",
            f"--batches={batch}", f"--hbm_gib={CHIP_HBM_GIB}", f"--out={out}",
            *(f"--set={k}={v}" for k, v in FIXED.items()),
            *([f"--set=optimizer.grad_accum_steps={accum}"] if accum > 1 else []), *extra]
    log_path = os.path.join(log_dir, f"aot_gpu_b{batch}_a{accum}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"compile of batch {batch}/{accum} failed (status {proc.returncode}); see {log_path}")
    with open(out) as f:
        part = json.load(f)
    (row,) = part["topologies"].values()
    (trial,) = row["trials"]
    trial = dict(_gpu_fields(trial), grad_accum_steps=accum, micro_batch=batch // accum,
                 wall_seconds=round(time.time() - t0, 1),
                 aot_tpu_command=shlex.join(["python", os.path.relpath(AOT_TPU, REPO),
                                             *(a for a in argv[2:] if not a.startswith("--out="))]))
    meta = {"config": part["config"], "trainable_parameters": row["trainable_parameters"],
            "frozen_parameters": row["frozen_parameters"], "device_kind": row["device_kind"],
            "libtpu_topology": row["topology"]}
    return {"trial": trial, "meta": meta}


def _gpu_fields(trial: dict) -> dict:
    """An aot_tpu.py trial in this plan's terms: its fit is against the v5p chip's 95 GiB (this plan's is
    fits_budget), and its step estimate is at v4's peak (this plan's is the H100's)."""
    trial = dict(trial)
    trial.pop("estimated_step_seconds", None)
    if "fits" in trial:
        trial["fits_v5p_chip"] = trial.pop("fits")
    return trial


def assess(trial: dict, budget_gib: float) -> None:
    """Planned GPU memory and fit of one trial, in place."""
    if trial.get("stage") == "buffer_assignment" or "total_bytes" in trial:
        planned = trial["total_bytes"] / GIB * (1 + CODEGEN_GROWTH) + CODE_GIB
        trial["planned_gib"] = round(planned, 2)
        trial["fits_budget"] = planned <= budget_gib
    else:  # refused by the compiler even on the 95 GiB chip
        trial["planned_gib"] = None
        trial["fits_budget"] = False
    flops = trial.get("flops_per_device")
    if flops:
        # XLA's cost analysis counts a loop body once: with accumulation (a scan over the micro-batches) the lowered
        # count is one micro-batch's.
        flops *= trial["grad_accum_steps"]
        seconds = flops / (STEP_ESTIMATE_MFU * H100_PEAK_BF16_FLOPS)
        trial["estimated_h100_step_seconds"] = round(seconds, 2)
        trial["estimated_h100_images_per_second"] = round(trial["batch"] / seconds, 1)


def choose(trials: list[dict]) -> dict | None:
    ok = [t for t in trials if t["fits_budget"]]
    return max(ok, key=lambda t: (t["batch"], -t["grad_accum_steps"])) if ok else None


def recipe_of(trial: dict) -> dict:
    overrides = {"batch_size": trial["batch"], "optimizer.grad_accum_steps": trial["grad_accum_steps"],
                 **{k: (v == "true" if v in ("true", "false") else v) for k, v in FIXED.items()}}
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return {"config_overrides": overrides, "flags": flags,
            "environment": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}}


def markdown(out: dict) -> str:
    lines = [
        "# Single-GPU recipe (80 GB), SD1.5 scale: the compiled memory plan",
        "",
        f"Written by `{out['command']}` at commit `{(out['commit'] or 'unknown')[:12]}`"
        f"{' (with uncommitted changes)' if out['uncommitted_changes'] else ''}, {out['date']}, on "
        f"{out['machine']['host']} ({out['machine']['cpus']} CPUs, jax {out['machine']['jax']}, libtpu "
        f"{out['machine']['libtpu']}).",
        "",
        f"**{out['what']}**",
        "",
        out["caveat"],
        "",
        f"Planned = buffer-assignment total x {1 + CODEGEN_GROWTH:.2f} + {CODE_GIB} GiB of code; fits when planned "
        f"<= {out['budget_gib']} GiB ({out['gpu_gib']} GiB less a {out['margin']:.0%} margin).",
        "",
        "| global batch | micro-batches x size | arguments GiB | temporaries GiB | buffer total GiB | planned GiB "
        "| fits | est. H100 s/step (images/s) | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in out["trials"]:
        if "total_bytes" in t:
            mem = (f"{t['argument_bytes'] / GIB:.2f} | {t['temp_bytes'] / GIB:.2f} | {t['total_gib']:.2f} | "
                   f"{t['planned_gib']:.2f}")
        else:
            mem = f"refused | needs {t.get('required_temp_gib')} GiB of temporaries | | "
        est = (f"{t['estimated_h100_step_seconds']} ({t['estimated_h100_images_per_second']})"
               if t.get("estimated_h100_step_seconds") else "")
        lines.append(f"| {t['batch']} | {t['grad_accum_steps']} x {t['micro_batch']} | {mem} | "
                     f"{'yes' if t['fits_budget'] else 'no'} | {est} | {t['compile_seconds']} |")
    r = out["recipe"]
    lines += ["", "Recipe: " + (" ".join(r["flags"]) + f" with XLA_PYTHON_CLIENT_MEM_FRACTION="
                                f"{r['environment']['XLA_PYTHON_CLIENT_MEM_FRACTION']}" if r else "none fits")]
    if r:
        chosen, others = r["from_trial"], []
        for t in out["trials"]:
            if (t["batch"], t["grad_accum_steps"]) == (chosen["batch"], chosen["grad_accum_steps"]):
                continue
            name = f"{t['batch']} ({t['grad_accum_steps']} x {t['micro_batch']})"
            if t["fits_budget"]:
                others.append(f"{name} fits too, with a smaller global batch")
            elif t["planned_gib"] is None:
                others.append(f"{name} was refused by the compiler even on the 95 GiB chip")
            elif t["planned_gib"] > out["gpu_gib"]:
                others.append(f"{name} does not fit the card ({t['planned_gib']} GiB planned > {out['gpu_gib']})")
            else:
                others.append(f"{name} fits {out['gpu_gib']} GiB but not the margin ({t['planned_gib']} GiB "
                              f"planned > {out['budget_gib']})")
        lines += ["", f"Chosen: the fitting candidate with the largest global batch, {chosen['batch']} "
                      f"({chosen['grad_accum_steps']} x {chosen['batch'] // chosen['grad_accum_steps']})"
                      + "".join(f"; {o}" for o in others) + "."]
    lines += ["", out["estimate"] + ".", "", "How to confirm on the GPU: " + out["confirm_on_gpu"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="64,128,256/4",
                    help="comma-separated global batches, each optionally /A for A micro-batches (grad accumulation)")
    ap.add_argument("--gpu_gib", type=float, default=80.0, help="the GPU's memory (an 80 GB A100 / H100)")
    ap.add_argument("--margin", type=float, default=0.15, help="fraction of --gpu_gib the plan leaves free")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "aot_gpu.json"),
                    help="JSON path; the .md beside it")
    ap.add_argument("--parts_dir", default="", help="each compile's aot_tpu.py JSON (default: a temporary folder)")
    ap.add_argument("--log_dir", default="", help="each compile's log (default: --parts_dir)")
    ap.add_argument("--image_size", type=int, default=512)
    ap.add_argument("--config_arg", default="", help="configs/depth.py variants, e.g. 'tiny' for a quick smoke run")
    ap.add_argument("--resume", action="store_true",
                    help="keep the candidates already in --out (same settings) instead of compiling them again")
    args = ap.parse_args()
    candidates = [parse_candidate(c) for c in args.candidates.split(",") if c]
    import tempfile

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    extra = [f"--image_size={args.image_size}", *([f"--config_arg={args.config_arg}"] if args.config_arg else [])]
    folders = {}

    def work_dirs():  # made at the first compile (a --resume with nothing left to compile makes none)
        if not folders:
            folders["parts"] = args.parts_dir or tempfile.mkdtemp(prefix="aot_gpu_")
            folders["logs"] = args.log_dir or folders["parts"]
            for path in folders.values():
                os.makedirs(path, exist_ok=True)
        return folders["parts"], folders["logs"]
    budget = round((1 - args.margin) * args.gpu_gib, 2)
    out = {
        "what": "the single-GPU plan is the TPU compiler's for ONE v5p chip (95 GiB HBM), not the GPU compiler's: "
                "SD1.5-size default CoDi train step (configs/depth.py), compiled ahead of time, never run",
        **provenance(),
        "caveat": "No GPU compiler runs without a GPU. The figures are the TPU compiler's buffer assignment for one "
                  "v5p chip (libtpu, no TPU attached): the same program (the step train.setup jits), laid out by "
                  "another backend. XLA's GPU backend fuses, rematerialises and pads differently and adds cuDNN / "
                  "cuBLAS workspaces; the margin is for that. Confirm on the card before a long run.",
        "confirm_on_gpu": "run launch/gpu_local.sh (it passes the recipe) and read the line 'train step compiled: "
                          "{...}' that the trainer logs before its first step: memory_analysis() of the GPU compiler "
                          "(argument + output + temp - alias bytes); a step that does not fit fails there with "
                          "RESOURCE_EXHAUSTED before any training. benchmarks/gpu_peer.py --batch=B compiles and "
                          "times the same step (without accumulation) on the card.",
        "topology": TOPOLOGY,
        "chip_hbm_gib": CHIP_HBM_GIB,
        "gpu_gib": args.gpu_gib,
        "margin": args.margin,
        "budget_gib": budget,
        "codegen_growth": CODEGEN_GROWTH,
        "code_gib": CODE_GIB,
        "settings": dict(FIXED),
        "image_size": args.image_size,
        "config_arg": args.config_arg,
        "estimate": f"estimated H100 step time: an estimate, not a measurement: FLOPs per step (XLA's count of the "
                    f"lowered step, exact attention; times the micro-batches) / ({STEP_ESTIMATE_MFU:.0%} of the H100's "
                    f"{H100_PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s dense bf16 peak)",
        "trials": [],
        "recipe": None,
    }
    done = {}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        if (earlier.get("settings"), earlier.get("image_size"), earlier.get("config_arg")) == (
                out["settings"], args.image_size, args.config_arg):
            done = {(t["batch"], t["grad_accum_steps"]): _gpu_fields(t) for t in earlier["trials"]}
            out.update({k: earlier[k] for k in ("config", "trainable_parameters", "frozen_parameters",
                                                "device_kind", "libtpu_topology") if k in earlier})

    def save():
        for t in out["trials"]:
            assess(t, budget)
        best = choose(out["trials"])
        out["recipe"] = None
        if best:
            out["recipe"] = dict(recipe_of(best), from_trial={"batch": best["batch"],
                                                              "grad_accum_steps": best["grad_accum_steps"]})
        text = json.dumps(out, indent=2)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(out))
        return text

    for batch, accum in candidates:
        if (batch, accum) in done:
            out["trials"].append(done[(batch, accum)])
            continue
        got = compile_candidate(batch, accum, *work_dirs(), extra)
        out.update(got["meta"])
        out["trials"].append(got["trial"])
        print(f"[aot_gpu] batch {batch} / {accum}: {got['trial'].get('total_gib')} GiB "
              f"(compile {got['trial']['compile_seconds']} s)", file=sys.stderr, flush=True)
        save()
    print(save())


if __name__ == "__main__":
    main()
