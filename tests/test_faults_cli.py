"""Command-line mistakes end in one line naming the problem, before any work, and create nothing: a misspelt
--config.key (with the nearest field), a missing config file, an unknown variant, a bad config value; evaluate on a
workdir that does not exist or holds another task's model; sample's step count and a depth map in colour or with
transparency (converted only when asked)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codi_jax import evaluate, sample
from codi_jax.testing import metadata_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_line(out, needle):
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and needle in lines[-1] and sum(needle in line for line in lines) == 1, out.stderr[-3000:]
    return lines[-1]


@pytest.mark.parametrize("flag, needle, expected", [
    ("--config.optimzer.learning_rate=1", "optimzer", "the config has no field 'optimzer'; did you mean 'optimizer'?"),
    ("--config.objective.distil_steps=4", "distil_steps",
     "config.objective has no field 'distil_steps'; did you mean 'objective.distill_steps'?"),
    ("--config.mode=codi2", "codi2", "config.mode: 'codi2' is not one of"),
])
def test_main_config_mistakes(tmp_path, flag, needle, expected):
    workdir = tmp_path / "run"
    out = _run("codi_jax.main", "--config=configs/depth.py:tiny", f"--workdir={workdir}", flag)
    assert out.returncode == 2
    assert expected in _one_line(out, needle)
    assert not workdir.exists()
    assert "global devices" not in out.stderr  # refused before JAX or TensorFlow started


def test_missing_config_file_and_unknown_variant(tmp_path):
    out = _run("codi_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path / 'a'}")
    assert out.returncode == 2 and "no such config file 'configs/nope.py'" in _one_line(out, "nope.py")
    out = _run("codi_jax.evaluate", "--config=configs/depth.py:huge", f"--workdir={tmp_path / 'b'}")
    assert out.returncode == 2
    line = _one_line(out, "huge")
    assert "--config=configs/depth.py:huge: unknown config variant 'huge'" in line and "ValueError" not in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_evaluate_missing_workdir_creates_nothing(tmp_path):
    workdir = tmp_path / "typo"
    out = _run("codi_jax.evaluate", "--config=configs/depth.py:tiny", f"--workdir={workdir}")
    assert out.returncode == 1
    assert "does not exist" in _one_line(out, str(workdir))
    assert not workdir.exists()


def test_evaluate_another_tasks_config_names_both_tasks(tmp_path):
    metadata_export(str(tmp_path))
    out = _run("codi_jax.evaluate", "--config=configs/sr.py:tiny", f"--workdir={tmp_path}")
    assert out.returncode == 1
    line = _one_line(out, "task 'depth'")
    assert "task 'depth' (mode 'codi'), but this config is for task 'sr'" in line and "configs/depth.py" in line
    assert not (tmp_path / "eval").exists()


def test_evaluate_lets_through_an_export_that_records_no_task(tmp_path):
    from codi_jax.testing import tiny_config

    export = tmp_path / "export"
    export.mkdir()
    (export / "model_index.json").write_text('{"_codi_jax": {"mode": "codi"}}')
    evaluate._check_tasks(tiny_config("sr"), {"codi": str(export)})
    (export / "model_index.json").write_text('{"_codi_jax": {"mode": "codi", "task": "depth"}}')
    with pytest.raises(evaluate.WorkdirMismatch, match="task 'depth'"):
        evaluate._check_tasks(tiny_config("sr"), {"codi": str(export)})


def test_sample_depth_map_mode_converted_only_when_asked(tmp_path):
    rgba = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (23, 17, 4), np.uint8), "RGBA").save(rgba)
    with pytest.raises(ValueError, match=r"odd.png' is 17x23, RGBA \(4 channel\(s\)\) and has colour: a depth map "
                                         r"is one grey channel .*; prepare it so, or pass --convert to take its "
                                         r"luminance$"):
        sample.read_depth(str(rgba))
    x = np.asarray(sample.read_depth(str(rgba), convert=True))
    assert x.shape == (23, 17) and 0 <= x.min() and x.max() <= 1  # any size: --fit makes it the model's
    grey = tmp_path / "depth.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(grey)
    assert np.all(np.asarray(sample.read_depth(str(grey))) == 1.0)  # accepted as it is: no conversion


def test_sample_cli_steps_and_condition(tmp_path, capsys):
    export = metadata_export(str(tmp_path))
    os.makedirs(os.path.join(export, "vae"))
    with open(os.path.join(export, "vae", "config.json"), "w") as f:
        json.dump({"block_out_channels": [16, 32, 64]}, f)
    assert sample.condition_spec(str(tmp_path)) == (1, 32)
    rgba = tmp_path / "odd.png"
    Image.fromarray(np.zeros((23, 17, 4), np.uint8), "RGBA").save(rgba)
    out = _run("codi_jax.sample", f"--model={tmp_path}", f"--cond={rgba}", "--prompt=a red sphere",
               f"--out={tmp_path / 'o.png'}")
    assert out.returncode == 2
    assert "odd.png' is 17x23, RGBA (4 channel(s)) and is transparent in places" in _one_line(out, "odd.png")
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(SystemExit) as exit_:  # argparse: refused before the model is read at all
        sample.main([f"--model={export}", f"--cond={rgba}", "--prompt=a", "--out=o.png", "--steps=0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "argument --steps: must be at least 1, got 0" in err[0], err  # no usage block before it
    # The Python API refuses it too, instead of quietly taking the model's default: checked before any weights are
    # touched, so a Pipeline without them shows it.
    pipe = sample.Pipeline.__new__(sample.Pipeline)
    pipe.meta = {"default_sampler": ["codi", 4]}
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        pipe(np.zeros((1, 32, 32, 1), np.float32), ["a"], steps=0)
