"""benchmarks/gpu_peer.py --tiny: the GPU peer benchmark's code paths on the CPU, end to end, and its JSON."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = ("codi_jax_full_codi", "codi_jax_pe_codi", "diffusers_controlnet", "diffusers_unet_controlnet")
SAMPLERS = ("codi_jax_codi_4", "codi_jax_ddim_50", "diffusers_lcm_4", "diffusers_ddim_50")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow  # ~1-2 min on 2 cores: imports and XLA compiles of four tiny programs
def test_tiny_run_writes_every_figure(tmp_path):
    out = tmp_path / "x.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # not conftest's 8 devices
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_peer.py"), "--tiny", f"--out={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    d = json.loads(out.read_text())

    for key in ("command", "device_kind", "versions", "batch", "image_size", "settings", "train_steps", "sampling",
                "sampling_ratios", "pe_codi_vs_controlnet_images_per_s", "full_codi_mfu", "peer_configs", "parts"):
        assert key in d, key
    assert d["tiny"] is True and d["batch"] == 4 and d["image_size"] == 32
    assert "gpu_peer.py --tiny" in d["command"]
    assert d["device_kind"] == "cpu"
    for lib in ("jax", "flax", "torch", "diffusers", "transformers"):
        assert d["versions"].get(lib), lib
    assert all(r["rc"] == 0 for r in d["parts"].values()), d["parts"]

    for name in TRAIN_STEPS:
        row = d["train_steps"][name]
        assert _positive(row["images_per_s"]), (name, row)
        assert row["step"]["timed"] >= 1 and _positive(row["step"]["median_s"])
        assert _positive(row["trainable_parameters"])
        assert math.isfinite(row["last_loss"])
    for name in TRAIN_STEPS[:2]:
        assert _positive(d["train_steps"][name]["flops_per_step"])
        assert d["train_steps"][name]["mfu"] is None  # no peak FLOP/s on a CPU
    # PE-CoDi trains the ControlNet-form encoder only, as the peer's ControlNet step does: the same parameter count.
    assert d["train_steps"]["codi_jax_pe_codi"]["trainable_parameters"] == \
        d["train_steps"]["diffusers_controlnet"]["trainable_parameters"]
    for name in SAMPLERS:
        row = d["sampling"][name]
        assert _positive(row["latency_s"]) and _positive(row["images_per_s"]), (name, row)
        assert row["batch"] == 1
    assert d["sampling"]["codi_jax_codi_4"]["steps"] == 4 and d["sampling"]["codi_jax_ddim_50"]["steps"] == 50

    ratio = d["pe_codi_vs_controlnet_images_per_s"]
    assert _positive(ratio["value"]) and ratio["target"] == 1.2 and isinstance(ratio["meets_target"], bool)
    assert math.isclose(ratio["value"], d["train_steps"]["codi_jax_pe_codi"]["images_per_s"]
                        / d["train_steps"]["diffusers_controlnet"]["images_per_s"])
    mfu = d["full_codi_mfu"]
    assert mfu["value"] is None and mfu["target"] == 0.4 and mfu["meets_target"] is False and mfu["why_null"]
    # The peer is built from codi_jax's own tiny modules.
    assert d["peer_configs"]["unet"]["block_out_channels"] == [32, 64]
