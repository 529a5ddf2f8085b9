"""The dress rehearsal: the SD-scale config run as its users run it, end to end.

A user brings a Stable Diffusion folder and a folder of photos, and types the README's "Using it for real" commands:
main, evaluate, sample, then loads the export in diffusers. Here the teacher has SD's structure at test widths with a
real CLIP BPE tokenizer, a v-prediction scheduler with a linear beta schedule and 64 px images; the photos are real,
with depth prepared as docs/data.md says (tests/rehearsal_assets.py). Nothing on the command lines sets the image size,
the tokenizer, the caption length, the prediction type or the schedule: each must come from the teacher folder, and
each is checked where a silent default would show (the saved config, the export's metadata, scheduler and tokenizer,
the model card, the sizes of what is sampled). Only what a CPU needs is set: steps, batch, evaluation size.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rehearsal_assets as assets  # noqa: E402 - the test folder is not a package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# Only what a CPU run needs: nothing here names a setting the teacher defines.
CPU = ["--config.total_steps=2", "--config.batch_size=2", "--config.checkpoint_every=2", "--config.log_every=1",
       "--config.sample_every=0", "--config.profile_steps=0"]


def _env(jax_cache):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}  # one device, as on a laptop
    env.update(JAX_COMPILATION_CACHE_DIR=jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return env


def _run(args, env, timeout=900):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} -> {proc.returncode}\n{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def user(tmp_path_factory, jax_cache):
    """The user's teacher and data, and the training run (main) on them."""
    root = tmp_path_factory.mktemp("rehearsal")
    env = _env(jax_cache)
    teacher = assets.make_sd_teacher(str(root / "stable-diffusion"))
    photos = assets.make_photo_folder(str(root / "photos"))
    assets.prepare_depth(photos, assets.make_depth_model(str(root / "depth-model")), env)
    workdir = str(root / "run")
    data = [f"--config.teacher={teacher}", "--config.data.dataset=folder", f"--config.data.data_dir={photos}"]
    main = _run(["-m", "codi_jax.main", "--config=configs/depth.py", f"--workdir={workdir}", *data, *CPU], env)
    return {"root": root, "env": env, "teacher": teacher, "photos": photos, "workdir": workdir, "data": data,
            "main": main}


def test_the_run_takes_everything_the_teacher_defines(user):
    export = os.path.join(user["workdir"], "export")
    with open(os.path.join(export, "model_index.json")) as f:
        meta = json.load(f)["_codi_jax"]
    assert meta["image_size"] == assets.SIZE and meta["max_length"] == 77
    assert meta["prediction_type"] == assets.PREDICTION_TYPE
    assert meta["schedule"] == assets.SCHEDULE
    with open(os.path.join(export, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    assert (sched["prediction_type"], sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == (
        "v_prediction", "linear", 0.0001, 0.02)
    # The export ships the teacher's tokenizer (CLIP's vocabulary), not the procedural scenes' one.
    from transformers import CLIPTokenizer

    ours, theirs = (CLIPTokenizer.from_pretrained(os.path.join(p, "tokenizer")) for p in (export, user["teacher"]))
    assert len(ours) == len(theirs) == 49408
    prompt = "a photograph of an astronaut riding a horse"
    assert ours(prompt)["input_ids"] == theirs(prompt)["input_ids"]
    card = open(os.path.join(export, "README.md")).read()
    for setting in ("image_size", "tokenizer", "max_length", "prediction_type", "schedule"):
        row = next(line for line in card.splitlines() if line.startswith(f"| {setting} |"))
        assert f"teacher {user['teacher']}" in row, row


def test_diffusers_loads_and_runs_the_export(user):
    import torch
    from diffusers import StableDiffusionControlNetPipeline

    export = os.path.join(user["workdir"], "export")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(export, safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    n = len(pipe.controlnet.nets) if hasattr(pipe.controlnet, "nets") else 1
    cond = torch.zeros(1, 1, assets.SIZE, assets.SIZE)
    out = pipe("a cat", image=[cond] * n if n > 1 else cond, num_inference_steps=1, guidance_scale=1.0,
               output_type="np", height=assets.SIZE, width=assets.SIZE).images
    assert out.shape == (1, assets.SIZE, assets.SIZE, 3) and np.isfinite(out).all()


def test_evaluate_reads_the_run_and_reports_what_it_cannot_measure(user):
    """evaluate with no --config: the run's own saved config (64 px photos, not 32 px scenes); only the evaluation's
    size is set, for a CPU. The shipped depth estimator reads 32 px scenes: at 64 px its metric is unavailable, with
    the reason, never a number."""
    _run(["-m", "codi_jax.evaluate", f"--workdir={user['workdir']}", "--steps=1", "--config.eval.num_examples=3",
          "--config.eval.noise_floor=False", "--config.eval.teacher_steps=2", "--config.eval.batch_size=3"],
         user["env"])
    with open(os.path.join(user["workdir"], "eval", "report.json")) as f:
        report = json.load(f)
    meta = report["meta"]
    assert meta["image_size"] == assets.SIZE and meta["num_examples"] == 3 and meta["split"] == "test"
    assert "depth_rmse" in meta["unavailable"] and "32" in meta["unavailable"]["depth_rmse"]
    rows = {k: v for k, v in report.items() if k != "meta"}
    assert "codi" in rows and all(np.isfinite(m["fid"]) for r in rows.values() for m in r.values() if "fid" in m)


def test_sample_every_export_from_the_users_files(user, tmp_path):
    """The run's model from one of the photos' depth maps (16-bit, as prepare_depth wrote it, of the photo's own
    aspect), and the teacher folder itself from a prompt alone: one 64 px PNG per output."""
    depth_map = os.path.join(user["photos"], "depth", "test", "coffee.png")
    assert Image.open(depth_map).size != (assets.SIZE, assets.SIZE)
    out = tmp_path / "out"
    _run(["-m", "codi_jax.sample", f"--model={user['workdir']}", f"--image={depth_map}", "--prompt=a cup of coffee",
          "--num-images=2", f"--out-dir={out}"], user["env"])
    _run(["-m", "codi_jax.sample", f"--model={user['teacher']}", "--prompt=a cat", "--steps=2", f"--out-dir={out}"],
         user["env"])
    written = sorted(os.listdir(out))
    assert len(written) == 3, written
    for name in written:
        assert Image.open(out / name).size == (assets.SIZE, assets.SIZE)
