"""Data faults: a folder in which nothing decodes stops in one line (status 65) instead of looping for ever; a SIGTERM
while the loop waits for data that never comes ends the process within preemption_grace_s (status 76) with the
committed checkpoints intact; a SIGTERM during training still checkpoints and exits 75; each unreadable file is
logged once, however many passes the run makes, and counted in the progress line; a SIGTERM during start-up
(teacher load, compile) is bounded the same way.

The command-line cases share one random teacher and one persistent compilation cache, so the step compiles once."""

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from codi_jax import data
from codi_jax.data import pipeline, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One worker runs the whole module: its expensive module fixtures are built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("codi_main")


def _depth_folder(root, good: int, bad: int = 0, fifo: bool = False):
    """root/train/<name>.png images with depth maps at root/depth/train/<name>.png; `bad` of them are not images, and
    with fifo=True the last one (zzz.png) is a named pipe: reading it blocks, like a stalled network filesystem."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        (root / "depth" / split).mkdir(parents=True)
    names = [(f"img{i:02d}.png", "good") for i in range(good)] + [(f"bad{i:02d}.png", "bad") for i in range(bad)]
    names += [("zzz.png", "fifo")] if fifo else []
    for split, entries in (("train", names), ("test", [("t0.png", "good")])):
        for name, kind in entries:
            path = root / split / name
            if kind == "good":
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(path)
            elif kind == "bad":
                path.write_bytes(b"this is not a png " * 8)
            else:
                os.mkfifo(path)
            Image.fromarray(rng.integers(0, 255, (24, 24), np.uint8)).save(root / "depth" / split / name)
    return root


def _folder_cfg(root, **kw):
    cfg = data.default_config()
    cfg.dataset, cfg.data_dir, cfg.task, cfg.image_size = "folder", str(root), "depth", 16
    cfg.update(kw)
    return cfg


def test_unreadable_files_are_logged_once_with_a_running_count(tmp_path, caplog):
    root = _depth_folder(tmp_path / "d", good=6, bad=2)
    before = sources.skipped_files()
    it = iter(data.make_train_loader(_folder_cfg(root, shuffle=False), global_batch_size=3, seed=0, process_index=0,
                                     process_count=1))
    with caplog.at_level(logging.WARNING):
        for _ in range(8):  # four passes over the 6 readable records
            next(it)
    assert sources.skipped_files() == before + 2
    for name in ("bad00.png", "bad01.png"):
        lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1, lines
        assert "unreadable files so far" in lines[0]
    assert sources.skipped_count() >= before + 2 * 3  # each pass still skips them: the count is of reads


def test_with_worker_processes_each_unreadable_file_is_logged_once(tmp_path, capfd):
    """grain's workers each read their own share, and each used to report a bad file once per worker: they share a
    ledger, so the file is logged once by whichever meets it first, and the trainer's count sees the workers'."""
    # 7 records over 2 workers: record i goes to worker i % 2 on odd passes and the other one on even passes, so
    # both workers meet both bad files.
    root = _depth_folder(tmp_path / "d", good=5, bad=2)
    it = iter(data.make_train_loader(_folder_cfg(root, shuffle=False, num_workers=2), global_batch_size=3, seed=0,
                                     process_index=0, process_count=1))
    for _ in range(12):  # several passes in each worker
        next(it)
    del it
    err = capfd.readouterr().err
    for name in ("bad00.png", "bad01.png"):
        lines = [line for line in err.splitlines() if f"{name} (" in line]
        assert len(lines) == 1, err[-3000:]
    assert sources.skipped_files() == 2  # counted in this process, though only the workers read them


def test_a_source_with_nothing_readable_raises_within_one_pass(tmp_path):
    root = _depth_folder(tmp_path / "d", good=0, bad=5)
    it = iter(data.make_train_loader(_folder_cfg(root), global_batch_size=2, seed=0, process_index=0,
                                     process_count=1))
    with pytest.raises(pipeline.NoReadableData, match=r"all 5 records were skipped.*bad0\d\.png"):
        next(it)


def _cmd(teacher, workdir, *extra):
    return [sys.executable, "-m", "codi_jax.main", "--config=configs/depth.py:tiny", f"--workdir={workdir}",
            "--config.stages=()", "--config.run_eval=False", f"--config.teacher={teacher}", "--config.vae_from=",
            "--config.batch_size=8", "--config.log_every=1", *extra]


def _env(cache):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    return env


def _committed(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _sigterm_when(cmd, env, log_path, ready, *, settle=0.0, wait=60):
    """Starts `cmd`, logging to log_path; once ready(log text) holds (and `settle` s more), sends SIGTERM.
    Returns (exit status, seconds from the signal to the exit, the log)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while not ready(open(log_path).read()) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(settle)
            assert proc.poll() is None, open(log_path).read()[-3000:]
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=wait)
            waited = time.time() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    return status, waited, open(log_path).read()


@pytest.mark.slow
def test_a_folder_where_nothing_decodes_stops_in_one_line(random_teacher, jax_cache, tmp_path):
    root = _depth_folder(tmp_path / "broken", good=0, bad=6)
    workdir = tmp_path / "run"
    # It used to loop for ever: the timeout is the test.
    out = subprocess.run(_cmd(random_teacher, workdir, "--config.data.dataset=folder", f"--config.data.data_dir={root}",
                              "--config.total_steps=4"),
                         cwd=REPO, env=_env(jax_cache), capture_output=True, text=True, timeout=600)
    assert out.returncode == 65, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "no readable record" in line]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert str(root) in lines[0] and "all 6 records were skipped" in lines[0] and "status 65" in lines[0]
    for i in range(6):  # each file once, however often the sampler came back to it
        assert len([line for line in out.stderr.splitlines() if f"bad{i:02d}.png (" in line]) == 1
    assert _committed(workdir) == []


@pytest.mark.slow
def test_sigterm_while_waiting_for_data_exits_in_bounded_time(random_teacher, jax_cache, tmp_path):
    # Two unreadable files, 16 readable records, then a named pipe, in order: steps 1 and 2 run and checkpoint (the
    # progress line counts the two skipped files), step 3 waits for ever.
    root = _depth_folder(tmp_path / "stalls", good=16, bad=2, fifo=True)
    workdir = tmp_path / "run"
    cmd = _cmd(random_teacher, workdir, "--config.data.dataset=folder", f"--config.data.data_dir={root}",
               "--config.data.shuffle=False", "--config.total_steps=50", "--config.checkpoint_every=1",
               "--config.preemption_grace_s=3")
    # Once steps 1 and 2 are committed, 3 s more: well inside next(data_iter) by then.
    status, waited, text = _sigterm_when(cmd, _env(jax_cache), tmp_path / "log.txt",
                                         lambda _: _committed(workdir) == [1, 2], settle=3)
    assert _committed(workdir) == [1, 2], text[-3000:]
    assert status == 76, text[-3000:]
    assert 3 <= waited < 20, waited
    line = [x for x in text.splitlines() if "no training step finished within 3 s" in x]
    assert len(line) == 1 and "checkpoint 2 is the latest and intact" in line[0], text[-3000:]
    assert _committed(workdir) == [1, 2]
    assert not [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d]
    progress = [x for x in text.splitlines() if "] data_skipped_files=" in x or ", data_skipped_files=" in x]
    assert progress and all("data_skipped_files=2" in x for x in progress), text[-3000:]
    for name in ("bad00.png", "bad01.png"):  # each reported once, with the running count
        assert len([x for x in text.splitlines() if f"{name} (" in x]) == 1, text[-3000:]


@pytest.mark.slow
def test_sigterm_during_start_up_exits_in_bounded_time(random_teacher, tmp_path):
    """SIGTERM while the run loads its teacher and compiles: noted at once, and when no step's checkpoint can follow
    within preemption_grace_s the process ends with 76, nothing written. A cache of its own keeps the compile long."""
    workdir = tmp_path / "run"
    cmd = _cmd(random_teacher, workdir, "--config.total_steps=4", "--config.preemption_grace_s=1")
    # "mode codi, mesh" is logged by setup once the workdir is checked, before the teacher loads and the step compiles.
    status, waited, text = _sigterm_when(cmd, _env(str(tmp_path / "cold_cache")), tmp_path / "log.txt",
                                         lambda log: "mode codi, mesh" in log)
    assert status == 76, text[-3000:]
    assert waited < 15, waited
    line = [x for x in text.splitlines() if "no training step finished within 1 s" in x]
    assert len(line) == 1 and "no checkpoint had been written" in line[0], text[-3000:]
    assert "train step compiled" not in text  # it stopped inside start-up, not after it
    assert _committed(workdir) == []


@pytest.mark.slow
def test_sigterm_during_training_checkpoints_and_exits_75(random_teacher, jax_cache, tmp_path):
    workdir = tmp_path / "run"
    cmd = _cmd(random_teacher, workdir, "--config.total_steps=100000", "--config.checkpoint_every=1000")
    status, _, text = _sigterm_when(cmd, _env(jax_cache), tmp_path / "log.txt", lambda log: "[2]" in log, wait=120)
    assert status == 75, text[-3000:]
    stops = [x for x in text.splitlines() if "stopping at step" in x]
    assert len(stops) == 1, text[-3000:]
    step = int(stops[0].split("stopping at step ")[1].split()[0])
    assert _committed(workdir) == [step] and step >= 2
