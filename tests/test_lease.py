"""One writer per workdir (codi_jax.lease): a live job's lease makes a second job on the same workdir refuse in one line
with status 78, writing nothing; a dead job's lease (its pid gone on this host, or its heartbeat past the timeout) is
taken over; the lease file is only ever replaced whole; launch/supervise.sh waits a live lease out instead of giving
up. Two real trainer processes, then unit tests of the pieces, then the supervisor against a fake gcloud."""

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from codi_jax import checkpoint, lease

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The trainer runs share the codi_main group's persistent compilation cache (tests/test_faults_checkpoint.py).
pytestmark = pytest.mark.xdist_group("codi_main")


# --- two real trainer processes ------------------------------------------------------------------------------------


def _main(teacher, cache, workdir, total_steps):
    cmd = [sys.executable, "-m", "codi_jax.main", "--config=configs/depth.py:tiny", f"--workdir={workdir}",
           "--config.stages=()", "--config.run_eval=False", f"--config.teacher={teacher}", "--config.vae_from=",
           "--config.batch_size=8", f"--config.total_steps={total_steps}", "--config.checkpoint_every=1",
           "--config.log_every=2"]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop(lease.STALE_ENV, None)  # the default timeout (120 s): the live holder below must not look stale
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    return cmd, env


def _files(workdir):
    """Every file and folder under workdir with its size and modification time: what a write would change."""
    out = {}
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
    return out


def _committed(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


@pytest.mark.slow
def test_second_job_refuses_a_live_workdir_and_takes_over_a_killed_ones(random_teacher, jax_cache, tmp_path):
    workdir = str(tmp_path / "run")
    cmd, env = _main(random_teacher, jax_cache, workdir, total_steps=10_000)
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not _committed(workdir) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert _committed(workdir), first.stderr.read()[-3000:] if first.poll() is not None else "no checkpoint"
        # Frozen mid-run, as a hung job: its heartbeat stops, but far from the 120 s timeout.
        os.kill(first.pid, signal.SIGSTOP)
        holder = lease.read(workdir)
        assert holder is not None and holder.pid == first.pid and holder.host == socket.gethostname()
        before = _files(workdir)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == checkpoint.EXIT_REFUSED, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        last = second.stderr.rstrip().splitlines()[-1]
        assert last.startswith(f"{workdir} is in use by another job (host {socket.gethostname()}, pid {first.pid}, "
                               "heartbeat "), last
        assert f"lease {workdir}/lease.json): wait for it to end or stop it, or use another workdir" in last, last
        assert "recipes.py" not in second.stderr  # refused before the teacher loads
        assert _files(workdir) == before  # wrote nothing: the checkpoints, the lease and the events are as they were
    finally:
        first.kill()  # SIGKILL: no clean-up, the lease stays behind
        first.communicate()
    assert lease.read(workdir).pid == first.pid
    # Killed: its pid is gone on this machine, so the next job takes the lease over at once. It resumes the killed
    # job's latest checkpoint as a finished run (total_steps there: nothing to compile), exports, and lets go.
    steps = _committed(workdir)
    cmd, env = _main(random_teacher, jax_cache, workdir, total_steps=steps[-1])
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    took = [line for line in third.stderr.splitlines() if "took over the stale lease" in line]
    assert len(took) == 1 and f"its process {first.pid} on this host" in took[0], third.stderr[-3000:]
    assert f"at step {steps[-1]}" in next(line for line in third.stderr.splitlines() if "resumed from" in line)
    assert os.path.isfile(os.path.join(workdir, "export", "DONE"))
    assert not os.path.exists(os.path.join(workdir, "lease.json"))  # released on a clean exit


def test_every_process_of_a_multi_host_job_refuses_with_process_0(random_teacher, tmp_path):
    """Process 0 checks the lease; the others follow its verdict instead of waiting in a collective for ever."""
    import portpicker

    workdir = str(tmp_path / "run")
    holder = lease.Lease(workdir).take()  # a live job: this test process
    try:
        port = portpicker.pick_unused_port()
        cmd, env = _main(random_teacher, str(tmp_path / "cache"), workdir, total_steps=2)
        procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**env, "CODI_COORDINATOR": f"127.0.0.1:{port}", "CODI_NUM_PROCESSES": "2",
                                       "CODI_PROCESS_ID": str(i), "CODI_LOCAL_DEVICES": "1"}) for i in range(2)]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [checkpoint.EXIT_REFUSED] * 2, errs[0][-2000:] + errs[1][-2000:]
        lasts = [err.rstrip().splitlines()[-1] for err in errs]
        assert lasts[0].startswith(f"{workdir} is in use by another job (host {socket.gethostname()}, pid "
                                   f"{os.getpid()}, "), lasts[0]
        assert lasts[1] == f"{workdir}: process 0 refused the workdir (its log says why: another job holds its lease)"
        assert sorted(os.listdir(workdir)) == ["lease.json"] and lease.read(workdir).job == holder.holder.job
    finally:
        holder.release()


# --- the lease's pieces --------------------------------------------------------------------------------------------


def _holder(**kw):
    now = time.time()
    fields = dict(host="elsewhere", pid=1, job="otherjob0001", started=now - 60, heartbeat=now, stale_after_s=120.0,
                  machine="elsewhere/boot/pid:[1]")
    fields.update(kw)
    return lease.Holder(**fields)


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_lease_refuses_in_one_line_and_release_frees_it(tmp_path):
    workdir = str(tmp_path / "w")
    first = lease.Lease(workdir).take()
    assert lease.read(workdir).job == first.holder.job and first.holder.stale_after_s == lease.DEFAULT_STALE_S
    with pytest.raises(checkpoint.CheckpointError) as e:
        lease.Lease(workdir).take()
    assert e.value.code == 78 and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{workdir} is in use by another job (host {socket.gethostname()}, pid "
                                   f"{os.getpid()}, heartbeat 0 s ago, job {first.holder.job}; lease ")
    first.release()
    assert lease.read(workdir) is None
    second = lease.Lease(workdir).take()
    second.release()
    assert os.listdir(workdir) == []  # no temporary file left behind either


def test_stale_when_the_pid_is_gone_on_this_machine_or_the_heartbeat_is_old():
    here = lease._machine()
    assert "no longer exists" in _holder(machine=here, pid=_dead_pid()).stale_reason()
    assert _holder(machine=here, pid=os.getpid()).stale_reason() is None
    # Another machine's pid means nothing here: only its heartbeat counts.
    assert _holder(pid=_dead_pid()).stale_reason() is None
    assert _holder(heartbeat=time.time() - 100).stale_reason() is None
    assert "200 s old, past its 120 s timeout" in _holder(heartbeat=time.time() - 200).stale_reason()
    # A live process on this machine whose heartbeat stopped (hung past the timeout) is stale too.
    assert "past its 5 s timeout" in _holder(machine=here, pid=os.getpid(), heartbeat=time.time() - 9,
                                             stale_after_s=5).stale_reason()
    # The holder's own timeout decides, not the reader's.
    assert _holder(heartbeat=time.time() - 200, stale_after_s=300).stale_reason() is None


@pytest.mark.parametrize("kind", ["dead pid", "old heartbeat"])
def test_a_stale_lease_is_taken_over_and_logged(tmp_path, kind, caplog):
    workdir = str(tmp_path)
    old = (_holder(machine=lease._machine(), pid=_dead_pid()) if kind == "dead pid" else
           _holder(heartbeat=time.time() - 500))
    assert lease.write(workdir, old, exclusive=True)
    mine = lease.Lease(workdir).take()
    try:
        assert lease.read(workdir).job == mine.holder.job
        took = [r.getMessage() for r in caplog.records if "took over the stale lease" in r.getMessage()]
        assert len(took) == 1 and old.job in took[0], took
    finally:
        mine.release()


def test_heartbeat_refreshes_and_a_lost_lease_stops_the_holder(tmp_path):
    workdir = str(tmp_path)
    mine = lease.Lease(workdir, stale_s=0.4).take()  # a beat every 0.1 s
    first_beat = lease.read(workdir).heartbeat
    time.sleep(0.35)
    assert lease.read(workdir).heartbeat > first_beat
    mine.verify()
    # Another job took it over (this one looked stale to it): the next beat notices, verify() refuses, and release()
    # leaves the other job's lease alone.
    other = _holder()
    lease.write(workdir, other)
    time.sleep(0.3)
    assert mine.lost == other
    with pytest.raises(checkpoint.CheckpointError) as e:
        mine.verify()
    assert "\n" not in str(e.value) and "lost its workdir lease to another job (host elsewhere, pid 1" in str(e.value)
    mine.release()
    assert lease.read(workdir) == other


def test_a_removed_lease_stops_the_holder_and_is_not_written_again(tmp_path):
    mine = lease.Lease(str(tmp_path), stale_s=0.4).take()
    os.unlink(tmp_path / "lease.json")  # by hand, to force a start: another job may be writing from now on
    time.sleep(0.3)
    assert mine.lost is not None and lease.read(str(tmp_path)) is None
    with pytest.raises(checkpoint.CheckpointError, match=r"lost its workdir lease \(its file was removed\); it stop"):
        mine.verify()
    mine.release()


def test_the_training_loop_stops_before_writing_once_the_lease_is_lost(tmp_path):
    """train.workdir_lease and _check_lease, which the loop calls before every checkpoint and before the export."""
    from codi_jax import train

    workdir = str(tmp_path / "run")
    other = _holder()
    with train.workdir_lease(workdir):
        assert lease.read(workdir).pid == os.getpid()
        train._check_lease(workdir)
        train._check_lease(os.path.join(workdir, "vae"))  # a stage's folder: under the same lease
        lease.write(workdir, other)  # a restart took it over while this job was stalled
        with pytest.raises(checkpoint.CheckpointError) as e:
            train._check_lease(os.path.join(workdir, "vae"))
        assert "\n" not in str(e.value) and "lost its workdir lease to another job (host elsewhere" in str(e.value)
    assert lease.read(workdir) == other  # let go without removing the other job's lease


def test_writes_are_whole_or_not_at_all(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    old = _holder()
    assert lease.write(workdir, old, exclusive=True)
    assert not lease.write(workdir, _holder(job="secondjob002"), exclusive=True)  # the exclusive create of a new lease
    assert lease.read(workdir) == old
    # A writer that dies between writing the temporary file and the rename leaves the old lease, and no temp file.
    real_replace = os.replace

    def fail(*args):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        lease.write(workdir, _holder(job="thirdjob0003"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert lease.read(workdir) == old and os.listdir(workdir) == ["lease.json"]
    # A reader racing a writer always sees a whole lease.
    stop, seen = threading.Event(), []

    def reader():
        while not stop.is_set():
            with open(os.path.join(workdir, "lease.json")) as f:
                seen.append(lease.Holder.parse(f.read()))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(100):
        lease.write(workdir, _holder(job=f"job{i:09d}", host="h" * (i % 50)))
    stop.set()
    thread.join()
    assert seen and all(h is not None for h in seen)


def test_a_file_that_is_not_a_lease_is_replaced(tmp_path):
    (tmp_path / "lease.json").write_text('{"host": "half a le')
    mine = lease.Lease(str(tmp_path)).take()
    assert lease.read(str(tmp_path)).job == mine.holder.job
    mine.release()


def test_nested_workdirs_share_the_jobs_lease(tmp_path):
    workdir = str(tmp_path / "run")
    with lease.hold(workdir) as top:
        assert top is not None
        with lease.hold(os.path.join(workdir, "vae")) as stage:  # a stage's folder: already covered
            assert stage is None and lease.covering(os.path.join(workdir, "vae")) is top
        assert lease.read(workdir).job == top.holder.job
    assert lease.read(workdir) is None and lease.covering(workdir) is None
    with pytest.raises(checkpoint.CheckpointError), lease.hold(workdir):  # released however the block ends
        raise checkpoint.CheckpointError("boom")
    assert lease.read(workdir) is None


def test_the_timeout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(lease.STALE_ENV, "7.5")
    mine = lease.Lease(str(tmp_path)).take()
    assert lease.read(str(tmp_path)).stale_after_s == 7.5
    mine.release()
    monkeypatch.setenv(lease.STALE_ENV, "soon")
    with pytest.raises(checkpoint.CheckpointError, match=f"^{lease.STALE_ENV}='soon' is not a number of seconds"):
        lease.Lease(str(tmp_path))


# --- launch/supervise.sh waits a live lease out --------------------------------------------------------------------

FAKE_GCLOUD = r'''#!PYTHON
"""Fake gcloud: logs argv; answers describe, the workers' job status and `storage cat` of the lease from lists."""
import json, os, shutil, sys, time
d = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")

def pop(name):
    path = os.path.join(d, name)
    lines = open(path).read().splitlines()
    if not lines:  # the script is over: stop the supervisor (its session) rather than let it poll for ever
        sys.stderr.write(f"fake gcloud: {name} exhausted at {args}\n")
        os.killpg(os.getpgid(0), 15)
    open(path, "w").write("\n".join(lines[1:]))
    return lines[0]

if args[:2] == ["storage", "cat"]:
    age = pop("lease.txt")  # 'none', or the heartbeat's age in seconds
    if age == "none":
        sys.stderr.write("ERROR: (gcloud.storage.cat) The following URLs matched no objects or files\n")
        sys.exit(1)
    template = open(os.path.join(d, "lease.json")).read()
    sys.stdout.write(template.replace("HEARTBEAT", repr(time.time() - float(age))))
elif args[3] == "describe":
    state = pop("describe.txt")
    if state == "NOT_FOUND":
        sys.stderr.write("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource not found\n")
        sys.exit(1)
    print(state)
elif args[3] == "ssh" and "worker_train.sh status" in " ".join(args):
    for worker in pop("status.txt").split("|"):
        print(worker)
elif args[3] == "scp":
    shutil.copy(args[4], os.path.join(d, "uploaded"))
'''


def _supervise(tmp_path, describes, statuses, leases):
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    gcloud = fake / "bin" / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    for name, lines in (("describe.txt", describes), ("status.txt", statuses), ("lease.txt", leases)):
        (fake / name).write_text("\n".join(lines) + "\n")
    # The lease exactly as codi_jax.lease writes it, its heartbeat filled in when read.
    text = _holder(host="t1v-n-1a2b-w-0.c.proj.internal", pid=4242, heartbeat=123456789.25, stale_after_s=300.0)
    (fake / "lease.json").write_text(text.to_json().replace("123456789.25", "HEARTBEAT"))
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "configs" / "depth.py").write_text("def get_config(arg=None):\n  return None\n")
    (repo / "requirements.txt").write_text("jax>=0.9.7\n")
    for git in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *git],
                       check=True, capture_output=True)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(home), "LANG": "C.UTF-8",
           "TMPDIR": str(home), "FAKE_GCLOUD_DIR": str(fake)}
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "supervise.sh"), "--project=proj-a", "--zone=us-central2-b",
         "--name=codi-v4", "--accelerator=v4-32", f"--repo={repo}", "--config=configs/depth.py",
         "--workdir=gs://bucket/depth", "--poll-seconds=0", "--backoff-seconds=0", "--no-check"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120, start_new_session=True)
    calls = [json.loads(line) for line in (fake / "calls.jsonl").read_text().splitlines()]

    def verb(c):
        if c[0] == "storage":
            assert c == ["storage", "cat", "gs://bucket/depth/lease.json"]
            return "lease"
        if c[3] == "ssh":
            words = shlex.split(c[-1].split("=", 1)[1])
            return "ssh:" + words[words.index("bash") + 1].split("/")[-1].split(".")[0] + (
                ":" + words[words.index("bash") + 2] if "worker_train.sh" in c[-1] else "")
        return c[3]

    return proc, [verb(c) for c in calls]


def test_supervisor_waits_out_a_live_lease_then_starts_again(tmp_path):
    statuses = ["running|running|running|running", "|".join(["exit 78"] * 4), "|".join(["exit 0"] * 4)]
    proc, verbs = _supervise(tmp_path, ["ACTIVE"] * 6 + ["NOT_FOUND"], statuses, ["5", "40", "none"])
    assert proc.returncode == 0, proc.stderr
    assert verbs == [
        "describe", "ssh:worker_train:status",  # a job runs: adopted
        "describe", "ssh:worker_train:status", "lease", "ssh:worker_train:stop",  # refused: a live job holds the lease
        "describe", "lease",  # still live (40 s < 300 s): wait
        "describe", "lease", "scp", "ssh:worker_install", "ssh:worker_train:start",  # gone: start again
        "describe", "ssh:worker_train:status", "describe", "delete", "describe"], proc.stderr
    assert ("gs://bucket/depth is in use by another job (host t1v-n-1a2b-w-0.c.proj.internal, pid 4242, heartbeat 5s "
            "ago, stale after 300s): the trainer refused to write over it; waiting") in proc.stderr
    assert "gone or stale: starting the trainer again" in proc.stderr and "recovery" not in proc.stderr


def test_supervisor_restarts_once_the_lease_is_stale_and_gives_up_on_other_refusals(tmp_path):
    # A lease whose heartbeat stopped 301 s ago (its timeout is 300 s) is stale: the next trainer takes it over.
    proc, verbs = _supervise(tmp_path, ["ACTIVE"] * 4, ["running|running|running|running"] + ["|".join(
        ["exit 78"] * 4)] * 2, ["0", "301", "301"])
    assert proc.returncode == 1 and verbs[:8] == [
        "describe", "ssh:worker_train:status", "describe", "ssh:worker_train:status", "lease", "ssh:worker_train:stop",
        "describe", "lease"], (verbs, proc.stderr)
    assert verbs[8:11] == ["scp", "ssh:worker_install", "ssh:worker_train:start"], verbs
    # The restarted trainer refuses again with no live lease behind it (another mode, ...): give up, as before.
    assert verbs[-3:] == ["ssh:worker_train:status", "lease", "ssh:worker_train:stop"], verbs
    assert "trainer: exit 78: a refused workdir or checkpoint" in proc.stderr and "recovery" not in proc.stderr
