"""The TPU pod plan: the SD1.5-size full-CoDi train step compiled ahead of time (never run) by the real TPU compiler
for TPU v4 slices, on a machine without a TPU. Prints JSON (and writes benchmarks/results/aot_tpu.json).

    python -m venv /tmp/venv-tpu
    /tmp/venv-tpu/bin/pip install -r requirements.txt "jax[tpu]==0.10.2"     # libtpu: the compiler, from pip
    /tmp/venv-tpu/bin/python benchmarks/aot_tpu.py                          # v4-8, v4-32, v4-128; batch 256 + search
    /tmp/venv-tpu/bin/python benchmarks/aot_tpu.py --topology=v4-32 --compiles=1          # the goal batch only
    /tmp/venv-tpu/bin/python benchmarks/aot_tpu.py --stage=buffers --topology=v4-32 --compiles=5   # minutes per trial

The step is the one train.setup compiles, from the same train.plan (abstract state, shardings, batch spec, jitted step
with donation): configs/depth.py (SD1.5 presets, mode codi: UNet + duplicated
encoder + mu, bf16 compute, fp32 params / AdamW / EMA, remat) at 512 px (64x64 latents), with the state, frozen parts
(VAE, text encoder) and batch given as ShapeDtypeStructs carrying their shardings, so no weight exists anywhere. The
mesh is FSDP over the whole slice (data=1, fsdp=-1, tensor=1) unless --mesh says otherwise.

Per device: memory_analysis() of the compiled executable; total = argument + output + temp - alias (donated state is
aliased to the new state), and a configuration fits when total + generated code < --hbm_gib (v4: 32 GiB HBM per chip).
flops_per_device: XLA's cost analysis of the lowered global step with exact attention (on the CPU), divided by the
devices; a full compile also records its own cost_analysis() as compiled_flops_per_device, which counts each while-loop
body (the attention chunks' lax.map) once. estimated_step_seconds = flops_per_device / (40 % of v4's 275 TFLOP/s bf16
peak per chip): an estimate from the program, not a measurement (nothing runs on a TPU).
--stage=buffers stops each compile after the compiler's HBM check and buffer assignment (before code generation,
which dominates the SD1.5 compile on a small host) and reports the assigned HBM bytes instead: see BufferStagePlanner.
Largest batch: the goal batch, then doubling (or halving) until a fitting and a refused batch bracket it, then
bisection, until batches B (fits) and B + devices (does not) are both compiled or --compiles is spent; every compile
is listed under trials.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout without installing the package

# Slice name -> (libtpu topology name in chips per axis, wrap-around links). With chip_config_name='megacore' a v4 chip
# is one JAX device with its two TensorCores and 32 GiB HBM, as on a real v4 VM, so v4-N has N/2 devices (without it
# libtpu describes each TensorCore as a device). Only a full 4x4x4 cube has wrap-around (torus) links.
# v5p-1chip: ONE v5p chip (95 GiB HBM), not a slice one can order (v5p-8 is the smallest): the single-accelerator plan
# of benchmarks/aot_gpu.py, a chip with more memory than an 80 GB GPU so that the compiler's figures are not squeezed.
TOPOLOGIES = {"v4-8": ("v4:2x2x1", False), "v4-32": ("v4:2x2x4", False), "v4-128": ("v4:4x4x4", True),
              "v5p-1chip": ("v5p:1x1x1", False)}
GIB = 1 << 30
V4_PEAK_BF16_FLOPS = 275e12  # per chip (both TensorCores), Google's published v4 figure
STEP_ESTIMATE_MFU = 0.4
GOAL_SHARE = 0.875  # of the HBM: 28 of v4's 32 GiB, the rest headroom for the runtime and fragmentation
STEP_ESTIMATE = ("an estimate, not a measurement: FLOPs per device per step (lowered, exact attention) / (40 % of "
                 "v4's 275 TFLOP/s bf16 peak per chip); nothing ran on a TPU")
LOWERED_FLOPS = ("XLA cost analysis of the lowered global step (exact attention) / devices: before partitioning and "
                 "the compiler's own rematerialisation")


def load_config(arg: str | None, image_size: int, mesh: dict, rules: str | None):
    spec = importlib.util.spec_from_file_location("depth_config", os.path.join(REPO, "configs", "depth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg or None)
    c.data.image_size = image_size
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh["data"], mesh["fsdp"], mesh["tensor"]
    if rules:
        c.logical_axis_rules = tuple(tuple(r) for r in json.loads(rules))
    return c


class Planner:
    """Everything batch-independent for one topology (devices, mesh, train.plan's abstract state, shardings and step);
    compile(batch) lowers (and compiles) the step exactly as train.setup jits it."""

    def __init__(self, config, topology: tuple[str, bool], compiler_options: dict, lower_only: bool = False):
        import flax.linen as nn
        import jax
        import numpy as np
        from jax.experimental import topologies

        from codi_jax import recipes, checkpoint, parallel, train

        self.config, self.compiler_options = config, compiler_options
        self.lower_only = lower_only
        name, wrap = topology
        # A host holds at most 2x2x1 chips; a smaller topology is one host of its own size.
        chips = tuple(int(n) for n in name.split(":")[1].split("x"))
        self.devices = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name="megacore",
            chips_per_host_bounds=tuple(min(c, h) for c, h in zip(chips, (2, 2, 1))), num_slices=1,
            wrap=(wrap,) * 3).devices
        # lower_only: the whole step on one CPU device, whose lowering has an XLA cost analysis (the compile-only TPU
        # client's has none); its FLOPs are the global step's, divided over the slice's devices.
        self.slice_mesh = parallel.make_mesh(config.mesh.to_dict(), self.devices)
        self.mesh = parallel.make_mesh(config.mesh.to_dict(), jax.devices("cpu")[:1]) if lower_only else self.slice_mesh
        self.recipe = recipes.make(config, tempfile.gettempdir(), abstract=True)
        self.plan = train.plan(config, self.recipe, self.mesh)
        frozen = nn.meta.unbox(self.recipe.frozen_abstract)
        self.abstract_frozen = checkpoint.abstract_with_shardings(
            frozen, {k: self.plan.frozen_shardings[k] for k in frozen})
        count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
        self.trainable = count(self.plan.abstract_state.params)
        self.frozen = count({k: v for k, v in self.abstract_frozen.items() if k != "null_ids"})

    def compile(self, batch: int) -> dict:
        import dataclasses

        import flax.linen as nn
        import jax

        from codi_jax import parallel, train

        self.config.batch_size = batch
        p = dataclasses.replace(self.plan, batch_spec=train.batch_spec(self.config))
        out = {"batch": batch, "per_device_batch": batch // (len(self.devices) if self.lower_only else
                                                               parallel.data_parallel_size(self.mesh))}
        with nn.logical_axis_rules(p.rules), jax.set_mesh(self.mesh):
            t0 = time.time()
            lowered = p.jit(frozen_keys=self.abstract_frozen).lower(p.abstract_state, self.abstract_frozen,
                                                                    p.batch_spec)
            t1 = time.time()
            if self.lower_only:
                # XLA's cost analysis of the lowered (global, not yet partitioned) step; a while loop's body counts
                # once, so lower this with exact attention (--attention_chunk_scores=0) for the full count.
                cost = lowered.cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                flops = float(cost["flops"])
                out.update(stage="lowered", hlo_flops_global=flops, flops_per_device=flops / len(self.devices),
                           lower_seconds=round(t1 - t0, 1), compile_seconds=0.0, fits=None)
                return out
            try:
                compiled = lowered.compile(compiler_options=self.compiler_options or None)
            except jax.errors.JaxRuntimeError as e:
                # The TPU compiler refuses a program whose buffers cannot fit in HBM: that is the answer "does not
                # fit", with the compiler's own figure for what it needed.
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                out.update(fits=False, compiler_error=str(e).splitlines()[0][:500],
                           lower_seconds=round(t1 - t0, 1), compile_seconds=round(time.time() - t1, 1))
                m = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
                if m:
                    out["required_temp_gib"], out["available_hbm_gib"] = float(m.group(1)), float(m.group(2))
                return out
            t2 = time.time()
        mem = compiled.memory_analysis()
        out.update({
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        })
        out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
        out["total_gib"] = round(out["total_bytes"] / GIB, 3)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        # Counts each while-loop body (the attention chunks' lax.map) once: main() replaces flops_per_device with the
        # lowered exact-attention count and keeps this one beside it.
        out["compiled_flops_per_device"] = float(cost.get("flops", 0.0)) if cost else None
        out["lower_seconds"] = round(t1 - t0, 1)
        out["compile_seconds"] = round(t2 - t1, 1)
        out["stage"] = "full"
        return out


class BufferStagePlanner:
    """compile(batch) in a child process that is stopped once the TPU compiler has assigned the step's buffers.

    On this 2-core host the SD1.5 step spends ~4 min in the HLO passes and buffer assignment and then 1 h or more
    (and > 22 GB of host RAM) generating TPU code, which changes no figure the plan needs. The compiler's HBM check
    (RESOURCE_EXHAUSTED when the temporaries exceed what the chip can hold) runs before code generation, so a refused
    batch is refused here exactly as in a full compile. For an accepted one the figures come from the compiler's own
    buffer assignment (XLA's dump of it): every HBM allocation of the step (arguments, temporaries, outputs), which is
    the final memory_analysis() less what code generation adds: 6.35 vs 6.44 GiB on the tiny model at 256 px, 29.17
    vs 31.18 GiB (+ 0.49 GiB of code) for SD1.5 on v4-32 at batch 256, so near the limit an accepted batch is an
    upper bound. FLOPs come from the lowered step (Planner lower_only), not from this compile.
    """

    def __init__(self, name: str, devices: list, child_args: list[str], hbm_bytes: int, log_dir: str,
                 hlo_dir: str | None = None):
        self.name, self.devices, self.child_args = name, devices, child_args
        self.hbm_bytes, self.log_dir, self.hlo_dir = hbm_bytes, log_dir, hlo_dir
        os.makedirs(log_dir, exist_ok=True)

    def compile(self, batch: int) -> dict:
        import glob
        import shutil
        import subprocess

        dump = tempfile.mkdtemp(prefix=f"aot_{self.name}_{batch}_")
        child_json = os.path.join(dump, "child.json")
        env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}/hlo --xla_dump_hlo_as_text"
                            " --xla_dump_hlo_module_re=jit_train_step").strip()
        log_path = os.path.join(self.log_dir, f"aot_{self.name}_{batch}.log")
        t0 = time.time()
        with open(log_path, "w") as log:
            argv = [sys.executable, os.path.abspath(__file__), "--stage=full", f"--topology={self.name}",
                    f"--batches={batch}", f"--out={child_json}", *self.child_args]
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                result = None
                while result is None:
                    time.sleep(5)
                    # Written only when the buffers were assigned without an HBM refusal (a refused module gets an
                    # oom_intermediate_module dump instead); code generation starts right after it.
                    accepted = glob.glob(f"{dump}/hlo/*jit_train_step*.after_optimizations_after_buffer_assignment.txt")
                    if accepted and _stable(accepted[0]):
                        result = _read_buffer_assignment(accepted[0].replace(
                            "after_optimizations_after_buffer_assignment.txt", "after_optimizations"))
                        result.update(batch=batch, per_device_batch=batch // len(self.devices),
                                      stage="buffer_assignment", compile_seconds=round(time.time() - t0, 1))
                        result["fits"] = result["total_bytes"] < self.hbm_bytes
                    elif proc.poll() is not None:
                        child = _read_json(child_json)
                        if proc.returncode != 0 or child is None:
                            raise RuntimeError(f"compile of batch {batch} on {self.name} failed; see {log_path}")
                        result = next(iter(child["topologies"].values()))["trials"][0]
                        result["stage"] = "full" if "total_bytes" in result else "refused"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if self.hlo_dir:  # keep the optimized HLO and its buffer assignment (e.g. to grep its all-gathers)
                    keep = os.path.join(self.hlo_dir, f"{self.name}_{batch}")
                    os.makedirs(keep, exist_ok=True)
                    for path in glob.glob(f"{dump}/hlo/*jit_train_step*"):
                        # (not the -buffer-assignment-values dump: over 1 GB for SD1.5)
                        if ("after_optimizations" in path or "oom" in path) and not path.endswith("-values.txt"):
                            shutil.copy(path, keep)
                shutil.rmtree(dump, ignore_errors=True)
        return result


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stable(path: str, wait: float = 3.0) -> bool:
    """The dump file has stopped growing (XLA writes it in one go, but it can be large)."""
    size = os.path.getsize(path)
    time.sleep(wait)
    return os.path.getsize(path) == size


def _read_buffer_assignment(prefix: str) -> dict:
    """Per-device HBM bytes from XLA's buffer-assignment dump: allocations in the default memory space (no color),
    by kind; total = all of them (equals the memory-usage report's total, which is checked)."""
    sizes = {"argument_bytes": 0, "temp_bytes": 0, "output_bytes": 0, "other_bytes": 0}
    with open(prefix + "-buffer-assignment.txt") as f:
        for line in f:
            m = re.match(r"allocation \d+: size (\d+), (.*):\s*$", line)
            if not m or "color" in m.group(2):
                continue
            size, tags = int(m.group(1)), m.group(2)
            if tags.startswith("parameter"):
                sizes["argument_bytes"] += size
            elif "preallocated-temp" in tags:
                sizes["temp_bytes"] += size
            elif "output" in tags or "maybe-live-out" in tags:
                sizes["output_bytes"] += size
            else:  # thread-local scratch, constants
                sizes["other_bytes"] += size
    with open(prefix + "-memory-usage-report.txt") as f:
        report_total = int(re.search(r"Total bytes: (\d+)", f.read()).group(1))
    total = sum(sizes.values())
    if total != report_total:
        raise RuntimeError(f"buffer assignment parse: {total} bytes vs the memory-usage report's {report_total}")
    return dict(sizes, total_bytes=total, total_gib=round(total / GIB, 3))


def _need_bytes(r: dict) -> float:
    """What a trial needs per device; for a refused compile the compiler's temporaries figure (a lower bound)."""
    if "total_bytes" in r:
        return r["total_bytes"] + r.get("generated_code_bytes", 0)
    return r.get("required_temp_gib", 0.0) * (1 << 30)


def summarize(row: dict, goal_batch: int) -> None:
    """The goal-batch figures and the fit bracket of a topology row, from all its trials."""
    trials = sorted(row["trials"], key=lambda r: r["batch"])
    row["trials"] = trials
    goal = next((r for r in trials if r["batch"] == goal_batch), None)
    if goal is not None:
        row.update({k: goal[k] for k in ("batch", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                                         "generated_code_bytes", "other_bytes", "total_bytes", "total_gib",
                                         "flops_per_device", "compile_seconds", "fits", "required_temp_gib", "stage")
                    if k in goal})
    if goal is not None and goal.get("total_bytes") and "generated_code_bytes" in goal:  # a full compile's
        row["total_with_code_gib"] = round((goal["total_bytes"] + goal["generated_code_bytes"]) / GIB, 3)
    for r in trials:
        if r.get("flops_per_device"):
            r["estimated_step_seconds"] = round(r["flops_per_device"] / (STEP_ESTIMATE_MFU * V4_PEAK_BF16_FLOPS), 4)
    if goal is not None and "estimated_step_seconds" in goal:
        row["estimated_step_seconds"] = goal["estimated_step_seconds"]
        row["estimated_images_per_second"] = round(goal["batch"] / goal["estimated_step_seconds"], 1)
        row["estimate"] = STEP_ESTIMATE
    ok = [r["batch"] for r in trials if r["fits"]]
    row["largest_batch_that_fits"] = max(ok) if ok else None
    # None: no larger batch was compiled, so largest_batch_that_fits is only a lower bound.
    row["smallest_batch_that_does_not_fit"] = min(
        [r["batch"] for r in trials if not r["fits"] and (not ok or r["batch"] > max(ok))], default=None)


def search(planner, goal: int, hbm_bytes: int, max_compiles: int, log, known: list | None = None):
    """The largest global batch (a multiple of the device count) whose total + generated code fits in hbm_bytes.

    Compiles the goal batch, then doubles (or halves) until a fitting batch and a refused one bracket the answer, then
    bisects the bracket (in steps of the device count) until the two are one step apart or max_compiles is spent.
    Bisection, not a fitted line: the TPU compiler rematerialises more as the batch grows, so its memory is far from
    linear in the batch (SD1.5 on v4-32: 29.2 GiB at 16 examples per device, 30.3 GiB at 33).
    known: trials of an earlier run (--resume) that count as compiled; max_compiles counts new compiles only.
    Returns (trials, largest batch that fits or None, smallest batch above it that does not fit or None).
    """
    n = len(planner.devices)
    trials: dict[int, dict] = {r["batch"]: r for r in known or []}
    max_compiles += len(trials)

    def fits(b):
        if b not in trials:
            r = planner.compile(b)
            if "fits" not in r:
                r["fits"] = _need_bytes(r) < hbm_bytes
            trials[b] = r
            log(r)
        return trials[b]["fits"]

    def bracket():
        ok = [b for b, r in trials.items() if r["fits"]]
        bad = [b for b, r in trials.items() if not r["fits"]]
        lo = max(ok) if ok else None
        return lo, min([b for b in bad if lo is None or b > lo], default=None)

    b = max(n, goal // n * n)
    while len(trials) < max_compiles:
        fits(b)
        lo, hi = bracket()
        if lo is not None and hi is not None:
            if hi - lo <= n:
                break
            b = (lo + hi) // 2 // n * n
        elif hi is None:
            b = 2 * lo
        elif hi <= n:
            break
        else:
            b = max(n, hi // 2 // n * n)
        if b in trials:  # only a resumed run can land on a compiled batch: nothing left to narrow
            break
    lo, hi = bracket()
    return sorted(trials.values(), key=lambda r: r["batch"]), lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", action="append", choices=sorted(TOPOLOGIES),
                    help="slice(s) to plan; default: v4-8, v4-32, v4-128")
    ap.add_argument("--batch", type=int, default=256, help="goal global batch")
    ap.add_argument("--batches", default="", help="comma-separated global batches to compile instead of the search")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. optimizer.grad_accum_steps=2 (recorded in the row and its name)")
    ap.add_argument("--compiles", type=int, default=4,
                    help="compiles per topology for the largest-batch search (1: only the goal batch)")
    ap.add_argument("--image_size", type=int, default=512)
    ap.add_argument("--config_arg", default="", help="configs/depth.py variants, e.g. 'tiny' for a quick smoke run")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 fills)")
    ap.add_argument("--rules", default="", help="JSON list of [logical, mesh axes] overriding the default rules")
    ap.add_argument("--xla", action="append", default=[], help="compiler option key=value (repeatable)")
    ap.add_argument("--attention_chunk_scores", type=int, default=-1,
                    help="layers.ATTENTION_CHUNK_SCORES for the compile (-1: the library default; 0: exact attention)")
    ap.add_argument("--stage", choices=("full", "buffers", "lower"), default="full",
                    help="full: compile to an executable (memory_analysis + cost_analysis); buffers: stop each compile "
                         "(a child process) once the compiler has assigned its HBM buffers, minutes instead of hours; "
                         "lower: no compile, the lowered step's XLA cost analysis (FLOPs) only")
    ap.add_argument("--hlo_dir", default="", help="--stage=buffers: keep each compile's optimized HLO text, buffer "
                                                  "assignment and memory-usage report under DIR/<slice>_<batch>/")
    ap.add_argument("--hbm_gib", type=float, default=32.0, help="HBM per device (v4: 32 GiB)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "aot_tpu.json"))
    ap.add_argument("--resume", metavar="JSON", help="continue the largest-batch search of an earlier output (same "
                                                      "slice and overrides): its trials count as compiled")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="compile nothing: combine the topologies of earlier outputs (e.g. one process per topology, "
                         "run in parallel) into --out")
    args = ap.parse_args()
    if args.merge:
        merged = None
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            lowered = all(r.get("stage") == "lowered" for row in part["topologies"].values() for r in row["trials"])
            if merged is not None and lowered:
                # A --stage=lower run (exact attention, so its config differs only there): its FLOPs fill the same
                # slice's trials of the same batch.
                same = {k: v for k, v in part["config"].items() if k != "attention_chunk_scores"}
                if same != {k: v for k, v in merged["config"].items() if k != "attention_chunk_scores"}:
                    raise ValueError(f"{path} was lowered with another configuration: {part['config']}")
                for key, row in part["topologies"].items():
                    flops = {r["batch"]: r["flops_per_device"] for r in row["trials"]}
                    for r in merged["topologies"].get(key, {"trials": []})["trials"]:
                        if r["batch"] in flops and r.get("flops_per_device") is None:
                            r["flops_per_device"] = flops[r["batch"]]
                            r["flops_source"] = LOWERED_FLOPS
            elif merged is None:
                merged = part
            elif part["config"] != merged["config"]:
                raise ValueError(f"{path} was compiled with another configuration: {part['config']} vs "
                                 f"{merged['config']}")
            else:
                for key, row in part["topologies"].items():
                    if key in merged["topologies"]:  # the same slice and overrides, compiled in several runs
                        seen = {r["batch"] for r in merged["topologies"][key]["trials"]}
                        merged["topologies"][key]["trials"] += [r for r in row["trials"] if r["batch"] not in seen]
                    else:
                        merged["topologies"][key] = row
        for row in merged["topologies"].values():
            summarize(row, int(merged.get("goal_batch", args.batch)))
        text = json.dumps(merged, indent=2)
        print(text)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        return
    # The host computations (eval_shape of the abstract models) stay on the CPU; libtpu is loaded only as the compiler
    # for the topology, so no TPU needs to be attached.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server here: libtpu must not wait for one
    import jax

    from codi_jax.diffusion import objectives
    from codi_jax.models import layers

    if args.attention_chunk_scores != -1:
        layers.ATTENTION_CHUNK_SCORES = args.attention_chunk_scores
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    config = load_config(args.config_arg, args.image_size, {"data": data, "fsdp": fsdp, "tensor": tensor}, args.rules)
    overrides = {}
    for kv in args.set:
        key, value = kv.split("=", 1)
        node, *path = key.split(".")
        parent = config
        for part in [node, *path][:-1]:
            parent = parent[part]
        leaf = key.split(".")[-1]
        parent[leaf] = type(parent[leaf])(json.loads(value) if not isinstance(parent[leaf], str) else value)
        overrides[key] = parent[leaf]
    options = dict(kv.split("=", 1) for kv in args.xla)
    topologies = args.topology or ["v4-8", "v4-32", "v4-128"]
    out = {
        "what": "SD1.5-size full-CoDi train step (configs/depth.py, mode codi), compiled ahead of time for TPU, not run",
        "host": {"python": platform.python_version(), "jax": jax.__version__, "cpus": os.cpu_count()},
        "config": {"image_size": args.image_size, "latent_size": None, "mode": config.mode, "dtype": config.dtype,
                   "remat": bool(config.remat), "preset": config.model.preset, "max_length": config.data.max_length,
                   "mesh": config.mesh.to_dict(), "logical_axis_rules": args.rules or "parallel.DEFAULT_RULES",
                   "compiler_options": options, "attention_chunk_scores": layers.ATTENTION_CHUNK_SCORES,
                   "optimizer": "adamw (fp32 moments) + EMA, grad clip",
                   # What the step computes, resolved as train does ('auto' -> the consistency space's default): the
                   # teacher's PF-ODE keeps the frozen pretrained UNet on device beside the trained one.
                   "objective": {"pf_ode": objectives.resolved_pf_ode(config.objective),
                                 "consistency_space": config.objective.consistency_space,
                                 "timestep_sampling": objectives.timestep_sampling(config.objective)}},
        "goal": f"per-device total + generated code <= {GOAL_SHARE * args.hbm_gib:g} GiB at global batch {args.batch} on "
                "v4-32",
        "goal_batch": args.batch,
        "hbm_gib_per_device": args.hbm_gib,
        "topologies": {},
    }

    def save():
        text = json.dumps(out, indent=2)
        if args.out:
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return text

    child_args = [f"--batch={args.batch}", f"--image_size={args.image_size}", f"--mesh={args.mesh}",
                  f"--attention_chunk_scores={args.attention_chunk_scores}", f"--hbm_gib={args.hbm_gib}",
                  *(f"--config_arg={args.config_arg}" for _ in [0] if args.config_arg),
                  *(f"--rules={args.rules}" for _ in [0] if args.rules),
                  *(f"--set={kv}" for kv in args.set), *(f"--xla={kv}" for kv in args.xla)]
    for name in topologies:
        t0 = time.time()
        key = name + "".join(f" {k}={v}" for k, v in overrides.items())
        if args.stage == "buffers":
            os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # the children load libtpu beside this process
        # With --stage=buffers this planner only lowers (FLOPs, and the row's metadata); the children compile.
        planner = Planner(config, TOPOLOGIES[name], options, lower_only=args.stage != "full")
        out["config"]["latent_size"] = planner.recipe.latent_size
        # The caption length may be the teacher's, filled in by the recipe (config.resolve_for_plan): record it after.
        out["config"]["max_length"] = int(config.data.max_length)
        row = {
            "slice": name,
            "config_overrides": overrides,
            "topology": TOPOLOGIES[name][0],
            "devices": len(planner.devices),
            "device_kind": planner.devices[0].device_kind,
            "mesh": dict(planner.slice_mesh.shape),
            "trainable_parameters": planner.trainable,
            "frozen_parameters": planner.frozen,
            "setup_seconds": round(time.time() - t0, 1),
            "trials": [],
        }
        out["topologies"][key] = row
        # FLOPs for every stage from the lowered step, on the CPU (the compiled step's own count is short, above);
        # built at the first fitting trial, so a --stage=buffers child, stopped before that, never builds it.
        flops_planner = [planner] if planner.lower_only else []
        if args.stage == "buffers":
            log_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else tempfile.gettempdir()
            planner = BufferStagePlanner(name, flops_planner[0].devices, child_args, int(args.hbm_gib * GIB), log_dir,
                                         args.hlo_dir)

        def log(r, row=row):
            if args.stage != "lower" and r.get("fits"):
                # FLOPs from the lowered step with exact attention (chunked attention's lax.map body would be counted
                # once), on the CPU: a full compile's cost_analysis is what this stage skips.
                chunk, layers.ATTENTION_CHUNK_SCORES = layers.ATTENTION_CHUNK_SCORES, 0
                try:
                    if not flops_planner:
                        flops_planner.append(Planner(config, TOPOLOGIES[name], options, lower_only=True))
                    r["flops_per_device"] = flops_planner[0].compile(r["batch"])["flops_per_device"]
                finally:
                    layers.ATTENTION_CHUNK_SCORES = chunk
                r["flops_source"] = LOWERED_FLOPS
            row["trials"].append(r)
            print(f"[aot_tpu] {key}: batch {r['batch']} -> {r.get('total_gib', r.get('required_temp_gib'))} GiB/device, "
                  f"fits={r['fits']}, compile {r['compile_seconds']} s", file=sys.stderr, flush=True)
            save()

        if args.batches:
            for b in (int(x) for x in args.batches.split(",")):
                r = planner.compile(b)
                if "fits" not in r:
                    r["fits"] = _need_bytes(r) < args.hbm_gib * GIB
                log(r)
        else:
            known = []
            if args.resume:
                earlier = _read_json(args.resume)
                if earlier is None or key not in earlier["topologies"]:
                    raise ValueError(f"--resume {args.resume}: no row {key!r} to continue")
                known = earlier["topologies"][key]["trials"]
                row["trials"] += known
            search(planner, args.batch, int(args.hbm_gib * GIB), args.compiles, log, known)
        summarize(row, args.batch)
        if "total_with_code_gib" in row:
            row["goal_met"] = row["total_with_code_gib"] <= GOAL_SHARE * args.hbm_gib
        save()
    print(save())


if __name__ == "__main__":
    main()
