"""Command-line mistakes end in one line naming the problem, before any work, and create nothing: a misspelt
--config.key (with the nearest field), a missing config file, an unknown variant, a bad config value; evaluate on a
workdir that does not exist or holds another task's model; sample's step count and a condition image of the wrong
mode or size (converted or resized only when asked)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codi_jax import evaluate, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_line(out, needle):
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if needle in line]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


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


def test_missing_config_file_and_unknown_variant(tmp_path):
    out = _run("codi_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path / 'a'}")
    assert out.returncode == 2 and "no such config file 'configs/nope.py'" in _one_line(out, "nope.py")
    out = _run("codi_jax.evaluate", "--config=configs/depth.py:huge", f"--workdir={tmp_path / 'b'}")
    assert out.returncode == 2
    assert "unknown config variant 'huge'" in _one_line(out, "huge")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_evaluate_missing_workdir_creates_nothing(tmp_path):
    workdir = tmp_path / "typo"
    out = _run("codi_jax.evaluate", "--config=configs/depth.py:tiny", f"--workdir={workdir}")
    assert out.returncode == 1
    assert "does not exist" in _one_line(out, str(workdir))
    assert not workdir.exists()


@pytest.fixture(scope="module")
def depth_export(tmp_path_factory):
    from codi_jax.testing import export_untrained, make_random_pipeline, tiny_config

    teacher = make_random_pipeline(str(tmp_path_factory.mktemp("teacher")))
    workdir = str(tmp_path_factory.mktemp("depth_run"))
    export_untrained(tiny_config("depth", teacher, mode="codi"), workdir)
    return workdir


def test_evaluate_another_tasks_config_names_both_tasks(depth_export):
    from codi_jax.testing import tiny_config

    config = tiny_config("sr")
    with pytest.raises(evaluate.WorkdirMismatch, match=r"task 'depth' \(mode 'codi'\), but this config is for task "
                                                       r"'sr'.*configs/depth.py"):
        evaluate.run(config, depth_export)
    assert not os.path.exists(os.path.join(depth_export, "eval"))


def test_sample_condition_mode_and_size_only_converted_when_asked(tmp_path):
    rgba = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (23, 17, 4), np.uint8), "RGBA").save(rgba)
    with pytest.raises(ValueError, match=r"odd.png' is RGBA \(4 channels\); the model takes 1 channel\(s\) "
                                         r"\(L or .*pass --convert"):
        sample.load_condition(str(rgba), 32, 1)
    with pytest.raises(ValueError, match=r"odd.png' is 17x23; the model was trained at 32x32: .*--resize"):
        sample.load_condition(str(rgba), 32, 1, convert=True)
    x = sample.load_condition(str(rgba), 32, 1, convert=True, resize=True)
    assert x.shape == (32, 32, 1) and -1 <= x.min() and x.max() <= 1
    grey = tmp_path / "depth.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(grey)
    assert np.all(sample.load_condition(str(grey), 32, 1) == 1.0)  # accepted as it is: no conversion


def test_sample_cli_steps_and_condition(depth_export, tmp_path):
    out = _run("codi_jax.sample", f"--model={depth_export}", "--cond=x.png", "--prompt=a", "--out=o.png", "--steps=0")
    assert out.returncode == 2 and "argument --steps: must be at least 1, got 0" in out.stderr
    rgba = tmp_path / "odd.png"
    Image.fromarray(np.zeros((23, 17, 4), np.uint8), "RGBA").save(rgba)
    out = _run("codi_jax.sample", f"--model={depth_export}", f"--cond={rgba}", "--prompt=a red sphere",
               f"--out={tmp_path / 'o.png'}")
    assert out.returncode == 2 and "is RGBA (4 channels); the model takes 1" in _one_line(out, "odd.png")
    assert not (tmp_path / "o.png").exists()
    pipe = sample.Pipeline.load(depth_export)
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        pipe(np.zeros((1, 32, 32, 1), np.float32), ["a"], steps=0)
