"""The embedded default's from-scratch route end to end at a few steps per stage: VAE -> teacher -> CoDi ->
evaluation -> inference."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_main_tiny_pipeline_then_evaluate_and_sample(tmp_path):
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "codi_jax.main", "--config=configs/depth.py:tiny,scratch", f"--workdir={workdir}",
           "--config.stage_steps.vae=4", "--config.stage_steps.pretrain=4", "--config.total_steps=4",
           "--config.batch_size=8", "--config.log_every=2", "--config.checkpoint_every=2", "--config.sample_every=4",
           "--config.num_sample_images=4",
           "--config.eval.num_examples=8", "--config.eval.batch_size=8", "--config.eval.steps=(1,2)",
           "--config.eval.teacher_steps=2"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stderr
    # Progress with steps/s and ETA, every stage, TensorBoard events and checkpoints in the workdir.
    assert "steps/s" in log and "ETA" in log
    for stage in ("vae", "pretrain"):
        assert (workdir / stage / "export" / "DONE").is_file()
        assert (workdir / stage / "checkpoints" / "4").is_dir()
    assert (workdir / "checkpoints" / "4").is_dir()
    events = [name for name in os.listdir(workdir) if name.startswith("events.out.tfevents")]
    assert events
    import tensorflow as tf

    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(workdir / events[0])) for v in e.summary.value}
    assert {"loss", "steps_per_sec", "samples", "grad_norm", "mu"} <= tags, tags
    with open(workdir / "vae" / "export" / "vae" / "config.json") as f:
        assert json.load(f)["scaling_factor"] != 1.0  # set from the latent statistics
    # A VAE alone is no pipeline: its index and model card say what diffusers loads and how.
    with open(workdir / "vae" / "export" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "AutoencoderKL"
    card = (workdir / "vae" / "export" / "README.md").read_text()
    assert "AutoencoderKL.from_pretrained(PATH, subfolder='vae')" in card and "Pipeline" not in card

    # The evaluation report: {row: {steps: {metric: value}}, meta}, plus table, plots and grid; the reference rows
    # (ground truth with FID's noise floor, the VAE's ceiling, the text-only teacher) beside the method's.
    with open(workdir / "eval" / "report.json") as f:
        report = json.load(f)
    assert set(report["codi"]) == {"1", "2"}
    assert set(report["teacher (text only)"]) == {"2"}
    for row in [*report["codi"].values(), report["ground truth via VAE"]["-"], report["teacher (text only)"]["2"]]:
        for metric in ("psnr", "ssim", "fid", "kid", "depth_rmse", "depth_si_rmse", "depth_delta1"):
            assert np.isfinite(row[metric]), (metric, row)
        lo, hi = row["depth_rmse_ci"]
        assert lo <= row["depth_rmse"] <= hi and lo <= hi and row["kid_ci"][0] <= row["kid_ci"][1]
    truth = report["ground truth"]["-"]
    assert {"fid", "kid", "depth_rmse"} <= set(truth) and "psnr" not in truth
    assert truth["depth_rmse"] < 0.1  # the shipped estimator reads real scenes' depth (its floor ~0.03)
    assert report["meta"]["num_examples"] == 8
    assert "lpips" in report["meta"]["unavailable"] and "clip_score" in report["meta"]["unavailable"]
    assert (workdir / "eval" / "report.md").read_text().startswith("| method | steps |")
    assert (workdir / "eval" / "fid_vs_steps.png").is_file() and (workdir / "eval" / "samples.png").is_file()
    # The export's model card: the command that trained it, and the evaluation's rows for this model.
    card = (workdir / "export" / "README.md").read_text()
    assert "library_name: diffusers" in card and "python -m codi_jax.main" in card
    assert "| codi | 1 |" in card and "Not evaluated yet" not in card
    assert "| codi | 1 |" not in (workdir / "pretrain" / "export" / "README.md").read_text()

    # Inference from the workdir: the CLI writes a PNG from a condition image and a prompt.
    from PIL import Image

    depth = (np.linspace(0, 255, 32 * 32).reshape(32, 32)).astype(np.uint8)
    Image.fromarray(depth).save(tmp_path / "depth.png")
    result = subprocess.run([sys.executable, "-m", "codi_jax.sample", f"--model={workdir}",
                             f"--cond={tmp_path / 'depth.png'}", "--prompt=a red sphere", "--steps=2",
                             f"--out={tmp_path / 'out.png'}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "out.png").size == (32, 32)
