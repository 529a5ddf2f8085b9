"""Checkpoint faults, through the command line: a damaged latest checkpoint is set aside and the run goes on from the
newest older one; a workdir of another mode, total_steps below its latest checkpoint and a missing init_from are each
refused in one line before any work; nothing is deleted or created.

One short run (module fixture) is copied for each case, and every process shares one persistent compilation cache,
so the train step compiles once."""

import os
import shutil
import subprocess
import sys

import pytest

from codi_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One worker runs the whole module: its expensive module fixtures are built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("codi_main")


def _run(teacher, cache, workdir, *extra, total_steps=4, config="configs/depth.py:tiny"):
    cmd = [sys.executable, "-m", "codi_jax.main", f"--config={config}", f"--workdir={workdir}",
           "--config.stages=()", "--config.run_eval=False", f"--config.teacher={teacher}", "--config.vae_from=",
           "--config.batch_size=8", f"--config.total_steps={total_steps}", "--config.checkpoint_every=1",
           "--config.log_every=2", *extra]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(random_teacher, jax_cache, tmp_path_factory):
    """A finished 4-step run with checkpoints 2, 3 and 4."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    out = _run(random_teacher, jax_cache, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _steps(workdir) == ["2", "3", "4"]
    return workdir


def _copy(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def _steps(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _damage(workdir, step):
    """Truncates the largest data file of a committed step's state (what a bad disk or a partial copy leaves)."""
    folder = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
    biggest = max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)
    os.truncate(biggest, 1000)
    return os.path.relpath(biggest, os.path.join(workdir, "checkpoints", str(step)))


def _refusal(teacher, cache, workdir, *extra, **kw):
    """Runs on a copy of the trained workdir and expects a refusal: status EXIT_REFUSED, no traceback, the
    checkpoints untouched. Returns (the process, its last line)."""
    out = _run(teacher, cache, workdir, *extra, **kw)
    assert out.returncode == checkpoint.EXIT_REFUSED, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert _steps(workdir) == ["2", "3", "4"]
    assert not os.path.exists(workdir / "lease.json")  # a refused run lets go of the workdir (codi_jax.lease)
    return out, out.stderr.rstrip().splitlines()[-1]


def _lines(text, needle):
    return [line for line in text.splitlines() if needle in line]


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_older_one(
        random_teacher, jax_cache, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    damaged_file = _damage(workdir, 4)
    out = _run(random_teacher, jax_cache, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    damaged = _lines(out.stderr, "is damaged")
    assert len(damaged) == 1, out.stderr[-3000:]
    assert "checkpoint 4 " in damaged[0] and "OUT_OF_RANGE" in damaged[0] and "4.damaged-1" in damaged[0]
    assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) < 60, out.stderr[-3000:]
    assert _lines(out.stderr, "resumed from") and "at step 3" in _lines(out.stderr, "resumed from")[0]
    # Nothing lost: the damaged step is kept (renamed, with its truncated file), the older ones are intact, the run
    # trained step 4 again and exported.
    assert _steps(workdir) == ["2", "3", "4", "4.damaged-1"]
    assert os.path.getsize(workdir / "checkpoints" / "4.damaged-1" / damaged_file) == 1000
    assert os.path.isfile(workdir / "export" / "DONE") or os.listdir(workdir / "export")
    # A restart (what the supervisor does) never meets the damaged step again: Orbax does not list the renamed folder.
    ckpt = checkpoint.Checkpointer(str(workdir))
    assert ckpt.all_steps() == [2, 3, 4] and ckpt.quarantined() == ["4.damaged-1"]
    ckpt.close()


@pytest.mark.slow
def test_a_deleted_checkpoint_file_is_set_aside_like_a_truncated_one(random_teacher, jax_cache, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    folder = workdir / "checkpoints" / "4" / "state" / "ocdbt.process_0" / "d"
    biggest = max(folder.iterdir(), key=os.path.getsize)
    biggest.unlink()
    out = _run(random_teacher, jax_cache, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    damaged = _lines(out.stderr, "is damaged")
    assert len(damaged) == 1 and "checkpoint 4 " in damaged[0] and "4.damaged-1" in damaged[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "at step 3" in _lines(out.stderr, "resumed from")[0]
    assert _steps(workdir) == ["2", "3", "4", "4.damaged-1"]
    assert not (workdir / "checkpoints" / "4.damaged-1" / biggest.relative_to(workdir / "checkpoints" / "4")).exists()


@pytest.mark.slow
def test_no_checkpoint_reads_stops_in_one_line_and_keeps_them_all(random_teacher, jax_cache, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "2")  # two damaged steps show the walk back; a third adds only time
    for step in (3, 4):
        _damage(workdir, step)
    out = _run(random_teacher, jax_cache, workdir)
    assert out.returncode == checkpoint.EXIT_REFUSED, out.stderr[-3000:]
    assert len(_lines(out.stderr, "is damaged")) == 2, out.stderr[-3000:]
    assert out.stderr.rstrip().splitlines()[-1].startswith(f"no checkpoint in {workdir}/checkpoints reads: 4 (")
    assert "Traceback" not in out.stderr
    assert _steps(workdir) == ["3.damaged-1", "4.damaged-1"]
    # The restart neither loops on them nor silently starts from scratch over them.
    again = _run(random_teacher, jax_cache, workdir)
    assert again.returncode == checkpoint.EXIT_REFUSED
    last = again.stderr.rstrip().splitlines()[-1]
    assert last.startswith("no checkpoint in") and "3.damaged-1, 4.damaged-1" in last, last
    assert "recipes.py" not in again.stderr  # refused before the teacher was loaded
    assert _steps(workdir) == ["3.damaged-1", "4.damaged-1"]


@pytest.mark.parametrize("extra, config, asked", [
    (("--config.mode=pe_codi",), "configs/depth.py:tiny", "mode 'pe_codi', task 'depth'"),
    ((), "configs/sr.py:tiny", "mode 'codi', task 'sr'"),
], ids=["mode", "task"])
def test_workdir_of_another_mode_or_task_is_refused_in_one_line(random_teacher, jax_cache, trained, tmp_path, extra,
                                                                 config, asked):
    workdir = _copy(trained, tmp_path)
    out, last = _refusal(random_teacher, jax_cache, workdir, *extra, config=config)
    assert last == (f"{workdir}/checkpoints holds a run of mode 'codi', task 'depth' (checkpoint 4); this config asks "
                    f"for {asked}: use another workdir, or that run's config"), last
    assert "recipes.py" not in out.stderr  # refused before the teacher loads


def test_other_model_settings_are_refused_before_the_teacher_loads(random_teacher, jax_cache, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    out, last = _refusal(random_teacher, jax_cache, workdir, "--config.model.prediction_type=epsilon")
    assert last.startswith(f"{workdir}/checkpoints holds a run with other model settings (checkpoint 4): "
                           "model.prediction_type='v_prediction' there, 'epsilon' here"), last
    # From the saved config alone: no teacher, no VAE was read (recipes.py logs each load).
    assert "recipes.py" not in out.stderr


def test_another_train_state_is_refused_in_one_line(random_teacher, jax_cache, trained, tmp_path):
    """Same mode and task, but a setting that changes the saved tree (a separate fast target EMA)."""
    workdir = _copy(trained, tmp_path)
    out, last = _refusal(random_teacher, jax_cache, workdir, "--config.target_ema_decay=0.9")
    assert last.startswith(f"checkpoint 4 in {workdir}/checkpoints holds another train state"), last
    assert "only here" in last and "target_params/" in last
    assert "is damaged" not in out.stderr


def test_total_steps_below_the_latest_checkpoint_is_refused(random_teacher, jax_cache, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    export = sorted(os.listdir(workdir / "export"))
    out, last = _refusal(random_teacher, jax_cache, workdir, total_steps=2)
    assert last.startswith(f"{workdir}/checkpoints already holds checkpoint 4, past config.total_steps=2"), last
    assert sorted(os.listdir(workdir / "export")) == export


def test_missing_init_from_is_refused_and_not_created(random_teacher, jax_cache, tmp_path):
    missing = tmp_path / "no" / "such_run"
    out = _run(random_teacher, jax_cache, tmp_path / "fresh", f"--config.init_from={missing}")
    assert out.returncode == checkpoint.EXIT_REFUSED, out.stderr[-3000:]
    last = out.stderr.rstrip().splitlines()[-1]
    assert last == f"config.init_from={str(missing)!r} does not exist (it is only read, never created)", last
    assert not os.path.exists(tmp_path / "no")
    # The API too (CM-II / GD-II read their teacher from init_from through it).
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.restore_params(str(missing), {})
    with pytest.raises(checkpoint.CheckpointError, match="no codi_jax checkpoint"):
        checkpoint.restore_params(str(tmp_path / "fresh"), {})
    assert not os.path.exists(tmp_path / "no")
