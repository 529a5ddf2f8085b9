"""Does the input pipeline keep the CoDi train step fed? Per task, on this machine; writes JSON.

    python benchmarks/input_pipeline.py [--tasks=depth,edit,inpaint,sr] [--steps=8] [--batches=6]
        [--out=benchmarks/results/input_pipeline.json]

Goal (docs/design.md): the input pipeline produces at least 3x what the train step consumes. For each task, at its
tiny config (32 px scenes, batch 32, the shipped teacher):
  * consumption: the CoDi train step (train.setup: the real loop's compiled, donated step), median over --steps steps
    on batches fetched before timing -> examples/s = batch / step time;
  * production: the real training loader alone, steady state (read-ahead buffers drained first), from procedural
    scenes rendered on the fly with grain worker_count 0 and 2, and from the same scenes rendered once into
    array_record (the TFDS builder in codi_jax/data/scenes_tfds.py);
  * starvation: the step fed by the live loader (as train.py's loop is: fetch, then step), worker_count 0, against the
    pre-fetched median: the share of the step rate lost to waiting for data on cores that the two share.
ratio = production / consumption, per source; meets_goal when the best source's ratio is >= 3. Measured separately,
each side had the whole CPU: the starvation row is the one that shows what sharing it costs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GOAL = 3.0


def _production(cfg_data, batch: int, batches: int) -> dict:
    from codi_jax import data

    it = iter(data.make_train_loader(cfg_data, global_batch_size=batch, seed=0, process_index=0, process_count=1))
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    # Read-ahead buffers (grain's prefetch, each worker's output queue) fill while the first batch starts up; drain
    # them so the timed batches come at the steady-state rate, not from a buffer.
    for _ in range(3 + 3 * int(cfg_data.num_workers)):
        next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    dt = time.perf_counter() - t1
    assert b["image"].shape[0] == batch
    return {"examples_per_s": round(batch * batches / dt, 1), "first_batch_s": round(first, 2),
            "batches_timed": batches}


def _config(task: str, batch: int):
    from codi_jax.testing import tiny_config

    c = tiny_config(task, "builtin:scenes32", **{"batch_size": batch})
    c.stages = ()
    c.run_eval = False
    return c


def _step(task: str, batch: int, steps: int, tmp: str) -> dict:
    """The CoDi step's median time on pre-fetched batches, then fed by the live loader."""
    import jax

    from codi_jax import parallel, train

    cfg = _config(task, batch)
    s = train.setup(cfg, os.path.join(tmp, task))
    try:
        batches = [parallel.global_batch({k: v for k, v in next(s.data_iter).items() if k in s.batch_spec}, s.mesh)
                   for _ in range(3)]
        jax.block_until_ready(batches)
        state, metrics = s.step_fn(s.state, s.frozen, batches[0])  # warm-up
        jax.block_until_ready((state, metrics))
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, metrics = s.step_fn(state, s.frozen, batches[(i + 1) % len(batches)])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
        fed = []
        for _ in range(steps):  # as the loop: the next host batch, to the devices, one step
            t0 = time.perf_counter()
            local = next(s.data_iter)
            b = parallel.global_batch({k: v for k, v in local.items() if k in s.batch_spec}, s.mesh)
            state, metrics = s.step_fn(state, s.frozen, b)
            jax.block_until_ready((state, metrics))
            fed.append(time.perf_counter() - t0)
    finally:
        s.checkpointer.close()
    med, fed_med = statistics.median(times), statistics.median(fed)
    return {"mode": cfg.mode, "median_step_s": round(med, 4), "consumes_examples_per_s": round(batch / med, 1),
            "fed_median_step_s": round(fed_med, 4), "starvation": round(1.0 - med / fed_med, 3),
            "timed_steps": steps}


def main(argv=None) -> int:
    from codi_jax import tasks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(n for n in tasks.TASKS if tasks.get(n).conditional),
                   help="the distillation tasks (t2i is the teacher's own pretraining)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed train steps per task (median)")
    p.add_argument("--batches", type=int, default=6, help="timed loader batches per source")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "input_pipeline.json"))
    args = p.parse_args(argv)
    os.environ.pop("XLA_FLAGS", None)  # one device: the step is the model's, not a fake-device sharding's
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import provenance
    import tensorflow_datasets as tfds

    from codi_jax.data import scenes_tfds

    tfds.disable_progress_bar()
    out = {"goal": f"production >= {GOAL} x the CoDi step's consumption, every task (docs/design.md)",
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "loadavg_1min_start": round(os.getloadavg()[0], 2)},
           "command": " ".join(["python benchmarks/input_pipeline.py"] + (argv or sys.argv[1:])),
           **provenance.commit(), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # tfds prints progress
            name = scenes_tfds.prepare(os.path.join(tmp, "tfds"), image_size=32, num_train=1024, num_test=8)
        out["array_record_prepare_s_per_1024"] = round(time.perf_counter() - t, 1)
        for task in [t for t in args.tasks.split(",") if t]:
            cfg = _config(task, args.batch)
            row = {"step": _step(task, args.batch, args.steps, tmp), "sources": {}}
            for label, over in (("scenes, worker_count 0", {"num_workers": 0}),
                                ("scenes, worker_count 2", {"num_workers": 2}),
                                ("array_record", {"num_workers": 0, "dataset": "tfds", "tfds_name": name,
                                                  "data_dir": os.path.join(tmp, "tfds")})):
                d = cfg.data.copy_and_resolve_references()
                d.update(over)
                if over.get("dataset") == "tfds" and tasks.get(task).paired:
                    d.update(scenes_tfds.PAIRED_KEYS)
                try:
                    row["sources"][label] = _production(d, args.batch, args.batches)
                except Exception as e:  # noqa: BLE001 - a source this task cannot read is a row, not a crash
                    row["sources"][label] = {"error": " ".join(str(e).split())[:300]}
            consumes = row["step"].get("consumes_examples_per_s")
            if consumes:
                for src in row["sources"].values():
                    if "examples_per_s" in src:
                        src["ratio"] = round(src["examples_per_s"] / consumes, 2)
                best = max((s.get("ratio", 0.0) for s in row["sources"].values()), default=0.0)
                row["best_ratio"], row["meets_goal"] = best, best >= GOAL
            out["tasks"][task] = row
            print(task, json.dumps(row), file=sys.stderr, flush=True)
    out["machine"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
