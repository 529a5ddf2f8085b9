"""python -m codi_jax.evaluate takes the run's saved config (the newest checkpoint's), with only the --config.key=value
flags typed on top; --config is needed only where nothing was saved. An evaluation that cannot work as configured (a
held-out split too small for eval.num_examples and its noise floor, a metric reader trained for another image size)
is refused in one line naming what to change, before anything is sampled or written."""

import os
import subprocess
import sys

import numpy as np
import pytest

from codi_jax import checkpoint, cli, evaluate
from codi_jax.metrics import MetricUnavailable, depth
from codi_jax.testing import metadata_export, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the run below was trained with, none of it the tiny config's own (32 px, 2000 test scenes, 1000 examples).
SAVED = {"data.image_size": 64, "data.scenes_num_test": 1234, "eval.num_examples": 3000}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A workdir as training leaves it: a checkpoint with its config (as train.py saves it) and an export."""
    from codi_jax.train import _config_json

    workdir = tmp_path_factory.mktemp("run")
    ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
    ckpt.save(5, {"x": np.zeros(2, np.float32)}, config=_config_json(tiny_config("depth", **SAVED)))
    ckpt.close()
    metadata_export(str(workdir), image_size=64)
    return str(workdir)


def _run(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})
    return subprocess.run([sys.executable, "-m", "codi_jax.evaluate", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _last_line(out, needle):
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and needle in lines[-1] and sum(needle in line for line in lines) == 1, out.stderr[-3000:]
    return lines[-1]


def test_the_saved_config_is_used_without_flags(run_dir):
    config, line = evaluate.config_for(run_dir)
    assert config.data.image_size == 64 and config.data.scenes_num_test == 1234 and config.eval.num_examples == 3000
    assert config.task == "depth" and config.mode == "codi" and config.data.dataset == "scenes"
    assert config.eval.steps == (1, 2, 4)  # a tuple again, as the config file makes it (JSON saved a list)
    assert line == f"evaluate: the config saved with checkpoint 5 in {run_dir}; no flag changed it"


def test_flags_override_the_saved_values_and_are_named(run_dir):
    config, line = evaluate.config_for(run_dir, overrides={"data.scenes_num_test": 50, "eval.split": "validation",
                                                          "eval.num_examples": 3000})
    assert config.data.scenes_num_test == 50 and config.eval.split == "validation" and config.data.image_size == 64
    # Only what a flag changed is named (eval.num_examples was typed with the saved value).
    assert line.endswith("; flags changed data.scenes_num_test 1234 -> 50, eval.split 'test' -> 'validation'"), line
    with pytest.raises(ValueError, match="eval.split"):
        evaluate.config_for(run_dir, overrides={"eval.split": "dev"})


def test_a_config_file_must_be_for_the_runs_task(run_dir):
    with pytest.raises(evaluate.WorkdirMismatch, match="is for task 'sr', but .* holds a run of task 'depth'"):
        evaluate.config_for(run_dir, tiny_config("sr"), file_spec="--config=configs/sr.py:tiny")
    # Of another mode: said in the line, and the run's own settings are used.
    config, line = evaluate.config_for(run_dir, tiny_config("depth", mode="pe_codi"), file_spec="--config=X")
    assert config.mode == "codi" and config.data.image_size == 64
    assert "(--config=X is for mode 'pe_codi': the run's saved mode 'codi' is used)" in line


def test_a_config_saved_by_another_version(run_dir):
    """Fields the saved config lacks keep this version's defaults; saved fields this version lacks are left out and
    named; JSON lists become the tuples the fields hold."""
    config = tiny_config("depth")
    left_out = evaluate._overlay(config, {"data": {"image_size": 48, "retired_field": 1}, "eval": {"steps": [1, 8]},
                                          "mesh": 3, "gone": {"a": 1}})
    assert sorted(left_out) == ["data.retired_field", "gone", "mesh"]
    assert config.data.image_size == 48 and config.eval.steps == (1, 8) and config.eval.split == "test"


def test_without_a_saved_config_the_config_file_is_needed(tmp_path):
    metadata_export(str(tmp_path), image_size=64)  # exports only: no checkpoints/
    with pytest.raises(evaluate.EvalConfigError, match="--config is needed: .* has no saved config"):
        evaluate.config_for(str(tmp_path))
    file_config = tiny_config("depth")
    config, line = evaluate.config_for(str(tmp_path), file_config, {"eval.num_examples": 8}, "--config=F")
    assert config is file_config and "config --config=F" in line and "eval.num_examples=8" in line
    assert sorted(os.listdir(tmp_path)) == ["export"]  # looking created nothing
    out = _run(f"--workdir={tmp_path}")
    assert out.returncode == 2 and "--config is needed" in _last_line(out, "--config is needed")


def test_cli_uses_the_saved_config_and_refuses_a_held_out_set_too_small(run_dir):
    out = _run(f"--workdir={run_dir}")
    assert out.returncode == 2
    assert f"the config saved with checkpoint 5 in {run_dir}; no flag changed it" in out.stderr
    line = _last_line(out, "held-out records")
    assert line == ("error: eval.num_examples=3000 with eval.noise_floor=True needs 6000 held-out records, and the "
                    "test split (eval.split) has 1234: set --config.eval.num_examples=617, or "
                    "--config.eval.noise_floor=False (then up to 1234), or a larger test split "
                    "(data.scenes_num_test)")
    assert not os.path.exists(os.path.join(run_dir, "eval"))


def test_cli_flags_override_the_saved_config(run_dir):
    out = _run(f"--workdir={run_dir}", "--config.eval.split=validation", "--config.eval.noise_floor=False",
               "--config.eval.num_examples=800", "--config.data.scenes_num_validation=700")
    assert out.returncode == 2
    assert ("flags changed eval.split 'test' -> 'validation', eval.noise_floor True -> False, eval.num_examples "
            "3000 -> 800, data.scenes_num_validation 2000 -> 700") in out.stderr
    assert _last_line(out, "held-out records") == (
        "error: eval.num_examples=800 needs 800 held-out records, and the validation split (eval.split) has 700: set "
        "--config.eval.num_examples=700, or a larger validation split (data.scenes_num_validation)")
    # A misspelt flag is read against the saved config's fields (the command line checks them all this way first).
    saved = evaluate._saved_run(run_dir)[0]
    assert cli.override_problem(saved, "eval.num_exampls", "8", root="the saved config") == (
        "--config.eval.num_exampls=8: config.eval has no field 'num_exampls'; did you mean 'eval.num_examples'?")
    assert cli.override_problem(saved, "eval.num_examples", "8", root="the saved config") is None


def test_cli_refuses_a_depth_estimator_of_another_size(run_dir):
    estimator = str(depth.DEFAULT_PATH)  # the shipped one reads 32 px scenes; the run's data are 64 px
    out = _run(f"--workdir={run_dir}", "--config.eval.num_examples=8", f"--config.eval.depth_estimator={estimator}")
    assert out.returncode == 2
    assert _last_line(out, "depth estimator") == (
        f"error: config.eval.depth_estimator: the depth estimator {estimator} reads 32x32 images, and the data are "
        "64x64 (data.image_size): pass one trained at 64 px (`python -m codi_jax.metrics.train_depth --image_size "
        "64 --out DIR`, then --config.eval.depth_estimator=DIR)")
    assert not os.path.exists(os.path.join(run_dir, "eval"))


def test_the_shipped_reader_of_another_size_is_unavailable_not_a_crash():
    config = tiny_config("depth", **{"data.image_size": 64})
    evaluate.check_readers(config)  # the shipped default is no refusal...
    with pytest.raises(MetricUnavailable, match="reads 32x32 images, and the data are 64x64"):
        evaluate.Scorer._reader(config, "depth_estimator", depth.load_depth_estimator)  # ...its metric is unavailable
    config.eval.depth_estimator = str(depth.DEFAULT_PATH)  # named by the user: refused
    with pytest.raises(evaluate.EvalConfigError, match="config.eval.depth_estimator: .* reads 32x32 images"):
        evaluate.Scorer._reader(config, "depth_estimator", depth.load_depth_estimator)
    with pytest.raises(evaluate.EvalConfigError, match="config.eval.depth_estimator"):
        evaluate.check_readers(config)
    model = evaluate.Scorer._reader(tiny_config("depth"), "depth_estimator", depth.load_depth_estimator)
    assert model[0].config.image_size == 32


def test_a_folder_test_split_too_small_names_the_fraction(tmp_path):
    for i in range(60):  # listed, never decoded, by the size check
        (tmp_path / f"img{i:03d}.png").write_bytes(b"")
    config = tiny_config("sr", **{"data.dataset": "folder", "data.data_dir": str(tmp_path), "eval.num_examples": 100})
    test = evaluate.data_lib.make_source(config.data, "test")
    with pytest.raises(evaluate.EvalConfigError) as e:
        evaluate.check_held_out(config)
    assert str(e.value) == (
        f"eval.num_examples=100 with eval.noise_floor=True needs 200 held-out records, and the test split "
        f"(eval.split) has {len(test)}: set --config.eval.num_examples={len(test) // 2}, or "
        f"--config.eval.noise_floor=False (then up to {len(test)}), or a larger test split "
        f"(data.folder_test_fraction)")
    config.data.folder_test_fraction, config.eval.num_examples = 0.5, 10
    evaluate.check_held_out(config)  # 20 of about 30


def test_held_out_reads_the_configured_split():
    val = evaluate.held_out(tiny_config("depth", **{"eval.split": "validation", "eval.batch_size": 2}), 2)
    test = evaluate.held_out(tiny_config("depth", **{"eval.batch_size": 2}), 2)
    assert val[3] != test[3] and not np.array_equal(val[1], test[1])
    from codi_jax import data

    cfg = tiny_config("depth").data
    (b,) = data.make_eval_batches(cfg, batch_size=2, num_examples=2, seed=1234, split="validation")
    assert b["caption"] == val[3]
