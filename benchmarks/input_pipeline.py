"""Input-pipeline throughput on this CPU, printed as JSON.

    python benchmarks/input_pipeline.py [--batches 6] [--quick]

Cases: the embedded default (scenes, depth, 32x32, batch 64) and sr at 128x128 (batch 16), each with grain
worker_count 0 and 2, and the depth case again from a prepared array_record copy (tfds). Throughput is steady state:
the first batch (worker start-up, tokenizer load) is reported separately, and the read-ahead buffers are drained
before timing. Also the scene renderer alone, in ms per image (wall and CPU) at 32 and 256 px.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codi_jax import data  # noqa: E402
from codi_jax.data import scenes, scenes_tfds  # noqa: E402


def _render_ms(size: int, n: int) -> tuple[float, float]:
    """(wall, CPU) ms per image; CPU time is what the renderer costs, wall what it got on a shared box."""
    scenes.render_example(0, 10_000, "train", size)  # warm caches / imports
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        scenes.render_example(0, i, "train", size)
    return (time.perf_counter() - t) / n * 1000, (time.process_time() - c) / n * 1000


def _throughput(task: str, size: int, batch: int, workers: int, batches: int, **overrides) -> dict:
    cfg = data.default_config()
    cfg.update(task=task, image_size=size, num_workers=workers, **overrides)
    it = iter(data.make_train_loader(cfg, global_batch_size=batch, seed=0, process_index=0, process_count=1))
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    # Read-ahead buffers (grain's prefetch, each worker's output queue) fill while the first batch starts up; drain them
    # so the timed batches are produced at the steady-state rate, not served from a buffer.
    for _ in range(3 + 3 * workers):
        next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    dt = time.perf_counter() - t1
    assert b["image"].shape == (batch, size, size, 3)
    return {"dataset": cfg.dataset, "task": task, "image_size": size, "batch": batch, "worker_count": workers,
            "batches_timed": batches, "examples_per_s": round(batch * batches / dt, 1),
            "first_batch_s": round(first, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=6, help="timed batches per case (after one warm-up batch)")
    p.add_argument("--quick", action="store_true", help="3 timed batches per case, fewer renders")
    a = p.parse_args()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    tfds.disable_progress_bar()
    batches = 3 if a.quick else a.batches
    out = {
        # Shared CI/dev boxes are often busy; the load average says how much of the CPU these numbers had.
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1min_start": round(os.getloadavg()[0], 2)},
        "render_ms_per_image": {},
        "pipeline": [],
    }
    for size, n in ((32, 10 if a.quick else 40), (256, 1 if a.quick else 3)):
        wall, cpu = _render_ms(size, n)
        out["render_ms_per_image"][f"{size}px"] = {"wall": round(wall, 1), "cpu": round(cpu, 1)}
    for task, size, batch in (("depth", 32, 64), ("sr", 128, 16)):
        for workers in (0, 2):
            out["pipeline"].append(_throughput(task, size, batch, workers, batches))
    # The same 32 px scenes rendered once into array_record (scenes_tfds): what a prepared dataset costs to read.
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # tfds prints progress; stdout carries only the JSON
            name = scenes_tfds.prepare(d, image_size=32, num_train=256 if a.quick else 1024, num_test=8)
        prep_s = time.perf_counter() - t
        case = _throughput("depth", 32, 64, 0, batches, dataset="tfds", tfds_name=name, data_dir=d)
        case["prepare_s"] = round(prep_s, 1)
        out["pipeline"].append(case)
    out["machine"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
