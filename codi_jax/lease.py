"""One writer per workdir: a training job holds a lease, <workdir>/lease.json, while it runs.

A second job started on a workdir whose first job still lives (a supervisor's restart while a hung job holds on, a
command typed twice) would resume from the first job's checkpoint and write its steps over the first job's. So a job
takes the lease before it writes anything in the workdir or loads a teacher, and a job that finds a live lease refuses
with one line and EXIT_REFUSED (78), naming the holder and what to do.

The lease is a small JSON file: host, pid, a job id, start time, heartbeat time, and the holder's staleness timeout. A
background thread refreshes the heartbeat every stale_after_s / 4 seconds (a compile or a stalled read can keep the
training loop away for many minutes; the thread runs meanwhile), and the file is removed when the job ends in any way
it can clean up after (finished, preempted, failed). In a multi-host run process 0 holds it; train.py makes every
process follow process 0's verdict.

A lease is stale, and the next job takes it over (logged), when
- its heartbeat is older than the holder's stale_after_s (CODI_LEASE_STALE_S when it started, default 120 s): a job
  killed with SIGKILL, a host that went away, a process too hung to run its heartbeat thread;
- or it was written on this machine (same boot and pid namespace, so not merely the same host name) by a pid that no
  longer exists: a job killed there is taken over at once, without waiting for its heartbeat to age.

A holder re-reads the lease at each heartbeat and before each checkpoint (verify()): if another job has taken it over
(this one was stalled past its timeout), it stops without writing, with the same status.

Guarantees. Local paths: every write goes to a temporary file in the workdir, then os.replace, so a reader sees the old
lease or the new one, never part of one; the first lease of a workdir is created exclusively (os.link fails if one
exists), so of two jobs started at once exactly one gets it; taking over a stale lease re-reads it just before the
replace and reads its own lease back afterwards, so two jobs taking over the same stale lease within that window are
settled by the read-back (the later replace wins, the other refuses). gs:// and other remote workdirs go through etils
epath (as the checkpoints do): an object is written whole, so a reader never sees half a lease, but there is no
exclusive create and no atomic rename. Two jobs that start on the same remote workdir within about one settle time
(SETTLE_REMOTE_S) of each other can both believe they hold it; the loser finds out at its next heartbeat or checkpoint
and stops before writing one. Clocks: the age of a heartbeat is the reader's clock minus the holder's, so hosts' clocks
must agree to well within the timeout (NTP does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

from codi_jax.checkpoint import CheckpointError

LEASE_NAME = "lease.json"
STALE_ENV = "CODI_LEASE_STALE_S"
DEFAULT_STALE_S = 120.0
SETTLE_LOCAL_S = 0.05  # the read-back after taking over a stale lease: a racing replace lands within this
SETTLE_REMOTE_S = 2.0  # the same on object stores, where a write takes a round trip


def stale_after_s() -> float:
    """The staleness timeout this process writes into its leases: CODI_LEASE_STALE_S, default 120 s."""
    text = os.environ.get(STALE_ENV, "")
    try:
        value = float(text) if text else DEFAULT_STALE_S
    except ValueError:
        raise CheckpointError(f"{STALE_ENV}={text!r} is not a number of seconds (the age after which a workdir "
                              f"lease's heartbeat counts as stale; default {DEFAULT_STALE_S:.0f})") from None
    if value <= 0:
        raise CheckpointError(f"{STALE_ENV}={text!r} must be a positive number of seconds")
    return value


def _machine() -> str:
    """This kernel and pid namespace (a pid is only meaningful there): the boot id and the namespace's inode on Linux,
    the host name elsewhere. Two containers on one host share the boot id but not the pid namespace."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remote(path: str) -> bool:
    return "://" in path


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lease file says."""

    host: str
    pid: int
    job: str
    started: float  # unix time
    heartbeat: float  # unix time of the last refresh
    stale_after_s: float  # the holder's own timeout: it promised a heartbeat well within it
    machine: str = ""  # see _machine

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """None for text that is not a lease (an empty or foreign file: treated as no lease, and replaced)."""
        try:
            d = json.loads(text)
            return cls(host=str(d["host"]), pid=int(d["pid"]), job=str(d["job"]), started=float(d["started"]),
                       heartbeat=float(d["heartbeat"]), stale_after_s=float(d["stale_after_s"]),
                       machine=str(d.get("machine", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why this lease may be taken over, or None while its holder counts as alive."""
        if self.machine and self.machine == _machine() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host ({self.host}) no longer exists"
        if self.age(now) > self.stale_after_s:
            return f"its heartbeat is {self.age(now):.0f} s old, past its {self.stale_after_s:.0f} s timeout"
        return None

    def describe(self, now: float | None = None) -> str:
        return f"host {self.host}, pid {self.pid}, heartbeat {self.age(now):.0f} s ago, job {self.job}"


def path_of(workdir: str) -> str:
    return os.path.join(workdir.rstrip("/") if _remote(workdir) else os.path.abspath(workdir), LEASE_NAME)


def _read_text(workdir: str) -> str | None:
    path = path_of(workdir)
    try:
        if _remote(path):
            return epath.Path(path).read_text()
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def read(workdir: str) -> Holder | None:
    """The workdir's lease, or None when there is none (or the file is not a lease)."""
    text = _read_text(workdir)
    return None if text is None else Holder.parse(text)


def _write_local(path: str, text: str, *, exclusive: bool) -> bool:
    """Writes `text` to path through a temporary file in the same folder: os.link (exclusive: fails, returning False,
    if path exists) or os.replace. The temporary file never outlives the call."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write(workdir: str, holder: Holder, *, exclusive: bool = False) -> bool:
    """Writes the lease (see the module docstring for what is atomic where). exclusive: only if none exists (local
    paths; remote ones cannot promise it and write anyway). False if an exclusive write found one."""
    path = path_of(workdir)
    if _remote(path):
        epath.Path(path).write_text(holder.to_json())
        return True
    return _write_local(path, holder.to_json(), exclusive=exclusive)


def _refusal(workdir: str, holder: Holder) -> CheckpointError:
    return CheckpointError(
        f"{workdir} is in use by another job ({holder.describe()}; lease {path_of(workdir)}): wait for it to end or "
        f"stop it, or use another workdir; a lease whose heartbeat is older than {holder.stale_after_s:.0f} s "
        f"({STALE_ENV} of its job), or whose process on this host is gone, is taken over by the next start")


class Lease:
    """This job's lease on a workdir: take() it, verify() it before writes, release() it at the end."""

    def __init__(self, workdir: str, *, stale_s: float | None = None):
        self.workdir = workdir
        self.path = path_of(workdir)
        self.stale_s = float(stale_s) if stale_s is not None else stale_after_s()
        started = time.time()
        self.holder = Holder(host=socket.gethostname(), pid=os.getpid(), job=uuid.uuid4().hex[:12], started=started,
                             heartbeat=started, stale_after_s=self.stale_s, machine=_machine())
        self.taken = False
        self.lost: Holder | None = None  # set when another job took it over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # a heartbeat and release() never interleave

    def take(self) -> Lease:
        """Takes the lease, or raises CheckpointError (one line, status 78) while another live job holds it.
        Creates a local workdir if needed (object stores have no folders): the lease is the first thing written."""
        if not _remote(self.workdir):
            os.makedirs(self.workdir, exist_ok=True)
        for _ in range(3):  # a lease that appears or goes between our read and our write: look again
            text = _read_text(self.workdir)
            current = None if text is None else Holder.parse(text)
            if text is None:
                if not write(self.workdir, self.holder, exclusive=True):
                    continue
                if _remote(self.path):
                    self._read_back()
                break
            if current is None:  # not a lease (edited by hand, or cut short on a remote store): nobody's
                logging.warning("%s is not a lease (%d characters): replacing it", self.path, len(text))
                write(self.workdir, self.holder)
                self._read_back()
                break
            reason = current.stale_reason()
            if reason is None:
                raise _refusal(self.workdir, current)
            again = read(self.workdir)
            if again != current:  # changed under us: someone else is taking it over or refreshing it
                continue
            write(self.workdir, self.holder)
            logging.warning("took over the stale lease on %s (%s): %s", self.workdir, current.describe(), reason)
            self._read_back()
            break
        else:
            current = read(self.workdir)
            raise _refusal(self.workdir, current) if current is not None else CheckpointError(
                f"{self.workdir}: could not take the workdir lease {self.path}: it kept changing; is another job "
                "starting there?")
        self.taken = True
        logging.info("lease %s taken: %s (stale after %.0f s)", self.path, self.holder.describe(), self.stale_s)
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()
        return self

    def _read_back(self) -> None:
        """After a takeover (or any remote write): whoever wrote last holds the lease; the others refuse."""
        time.sleep(SETTLE_REMOTE_S if _remote(self.path) else SETTLE_LOCAL_S)
        current = read(self.workdir)
        if current is None or current.job != self.holder.job:
            raise _refusal(self.workdir, current) if current is not None else CheckpointError(
                f"{self.workdir}: the workdir lease {self.path} vanished right after this job wrote it: is another "
                "job starting there?")

    def _beat(self) -> None:
        interval = self.stale_s / 4
        while not self._stop.wait(interval):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    current = read(self.workdir)
                    if current is None or current.job != self.holder.job:
                        # Taken over (this job was stalled past its timeout), or removed by hand to force a start:
                        # either way another job may be writing now, so this one must not write again.
                        self.lost = current or self.holder
                        logging.error("lost the lease on %s %s: it stops before its next checkpoint", self.workdir,
                                      f"to job {current.job} ({current.describe()})" if current else
                                      "(its file was removed)")
                        return
                    self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
                    write(self.workdir, self.holder)
                except Exception as e:  # noqa: BLE001 - a transient storage error: the next beat tries again
                    logging.warning("could not refresh the lease %s: %s", self.path, e)

    def verify(self) -> None:
        """CheckpointError unless this job still holds the lease (read from the file, not from memory)."""
        current = read(self.workdir)
        if current is not None and current.job == self.holder.job and self.lost is None:
            return
        other = current if current is not None and current.job != self.holder.job else None
        if other is None and self.lost is not None and self.lost.job != self.holder.job:
            other = self.lost
        how = f"to another job ({other.describe()}), which took it over as stale" if other else "(its file was removed)"
        raise CheckpointError(
            f"{self.workdir}: this job (pid {self.holder.pid}) lost its workdir lease {how}; it stopped without "
            "writing another checkpoint: let that job go on, or stop it and start this one again")

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still this job's. Never raises."""
        self._stop.set()
        with self._lock:
            try:
                current = read(self.workdir)
                if current is not None and current.job == self.holder.job:
                    if _remote(self.path):
                        epath.Path(self.path).unlink()
                    else:
                        os.unlink(self.path)
            except Exception as e:  # noqa: BLE001 - the job is ending; a stale lease is taken over later
                logging.warning("could not remove the lease %s: %s", self.path, e)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        _HELD.pop(self.path, None)


_HELD: dict[str, Lease] = {}  # lease path -> this process's lease on it


def covering(workdir: str) -> Lease | None:
    """The lease this job holds on `workdir` or on a folder above it (a stage's, a GD round's), if any; on processes
    other than 0 of a multi-host run, the untaken placeholder that marks it covered (Lease.taken is False)."""
    target = workdir.rstrip("/") if _remote(workdir) else os.path.abspath(workdir)
    for held in list(_HELD.values()):
        root = held.workdir.rstrip("/") if _remote(held.workdir) else os.path.abspath(held.workdir)
        if target == root or target.startswith(root + "/"):
            return held
    return None


@contextlib.contextmanager
def hold(workdir: str, *, take: bool = True):
    """Holds the workdir's lease for the block, released however the block ends. Yields the Lease, or None where a
    lease of this job already covers the workdir (nested stages) or take=False (processes other than 0 of a
    multi-host run, which neither take nor check it: they only note the workdir as covered, so that nested calls
    decide alike on every process)."""
    if covering(workdir) is not None:
        yield None
        return
    lease = Lease(workdir)
    if take:
        lease.take()
    _HELD[lease.path] = lease
    try:
        yield lease if take else None
    finally:
        if take:
            lease.release()
        _HELD.pop(lease.path, None)


def release_all() -> None:
    """Releases every lease of this process: for exits that skip `finally` blocks (os._exit)."""
    for held in list(_HELD.values()):
        if held.taken:
            held.release()
