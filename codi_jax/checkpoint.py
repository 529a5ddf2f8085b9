"""Orbax checkpoints: train state (params, EMA, optimizer, step, rng), the grain iterator position, and the config.

Layout: <workdir>/checkpoints/<step>/{state,data,config,meta}. Orbax writes each step to a temporary folder and renames
it when complete, so a run killed mid-write leaves the previous step restorable. A committed step that no longer reads
(a data file truncated or deleted) is renamed to <step>.damaged-<n>, which Orbax's step listing ignores (it only takes
names that are a bare step number), and the newest older step that reads is restored instead: never deleted, never
retried on the next restart.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging as std_logging
import os
import sys
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

DAMAGED = ".damaged-"  # <step>.damaged-<n>: a quarantined step folder


# A refusal about the workdir or a checkpoint path (EX_CONFIG): restarting the same command cannot help, so
# supervisors (launch/supervise.sh) stop instead of retrying; except while another job's live lease holds the workdir
# (codi_jax.lease), which a supervisor waits out.
EXIT_REFUSED = 78


class OneLineExit(SystemExit):
    """An exit whose whole story is one line: the command line prints only the message (no traceback) and exits with
    the class's status (for supervisors); API callers catch it by its class."""

    status = 1

    def __init__(self, message: str):
        super().__init__(self.status)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointError(OneLineExit):
    """A refusal about a workdir or a checkpoint path, raised before any work (status EXIT_REFUSED)."""

    status = EXIT_REFUSED


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(_absolute(workdir), "checkpoints")
        self._closed = False  # refusals close it before raising; the caller's cleanup may close it again
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any = None, config: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        # Data positions are per process: they only carry over to a run with the same number of processes.
        items["meta"] = ocp.args.JsonSave({"process_count": jax.process_count(), "step": int(step)})
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        logging.info("checkpoint %d saving to %s", step, self.directory)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def quarantined(self) -> list[str]:
        """Step folders set aside as damaged (<step>.damaged-<n>), oldest name first."""
        path = epath.Path(self.directory)
        return sorted(p.name for p in path.iterdir() if DAMAGED in p.name) if path.exists() else []

    def saved_config(self) -> tuple[int, dict] | None:
        """(step, config) of the newest step whose config item reads, or None (no step saved one)."""
        for step in reversed(self.all_steps()):
            if self._has_item(step, "config"):
                try:
                    return step, self.read(step, "config")
                except Exception:  # noqa: BLE001 - a damaged step: restore() reports and sets it aside.
                    continue
        return None

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs), which may be a new mesh.

        Without `step`: the newest step that reads (see restore_readable)."""
        if step is None:
            return self.restore_readable(abstract_state, data_iterator)[1]
        self.check_fits(step, abstract_state)
        return self._restore(step, abstract_state, data_iterator)

    def restore_readable(self, abstract_state: Any, data_iterator: Any = None) -> tuple[int, Any]:
        """(step, state) of the newest step that reads. A step that fails to read is reported in one line, renamed
        to <step>.damaged-<n> and the next older one tried; if none reads, CheckpointError (nothing is deleted)."""
        failed = []
        for step in reversed(self.all_steps()):
            with _stderr_held() as held:
                try:
                    self.check_fits(step, abstract_state)
                    state, reason = self._restore(step, abstract_state, data_iterator), None
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - any read error (tensorstore, JSON, missing file) is damage.
                    state, reason = None, _one_line(e)
                if reason is not None:
                    _settle(held)
            if self._everywhere_ok(reason is None):
                return step, state
            reason = reason or "it failed to read on another process"
            moved = self._quarantine(step)
            logging.error("checkpoint %d in %s is damaged (%s): set aside as %s; trying the next older step", step,
                          self.directory, reason, moved)
            failed.append(f"{step} ({reason})")
        if failed:
            self.close()
            raise CheckpointError(
                f"no checkpoint in {self.directory} reads: {'; '.join(failed)}. All are kept, renamed to "
                f"<step>{DAMAGED}<n>; repair or move them, or use a new workdir, to start again")
        raise CheckpointError(f"no checkpoint in {self.directory} to restore")

    def check_fits(self, step: int, abstract_state: Any) -> None:
        """CheckpointError if step's saved train state has other leaves or shapes than `abstract_state` (another
        model shape, optimizer or mode), read from the checkpoint's metadata alone; a metadata read error raises
        as it is (damage)."""
        saved = _leaf_shapes(self.manager.item_metadata(step)["state"])
        wanted = _leaf_shapes(abstract_state)
        if saved == wanted:
            return
        differ = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
        only_saved, only_wanted = sorted(saved.keys() - wanted.keys()), sorted(wanted.keys() - saved.keys())
        example = (f"{differ[0]} is {saved[differ[0]]} there, {wanted[differ[0]]} here" if differ else
                   f"{only_saved[0]} only there" if only_saved else f"{only_wanted[0]} only here")
        self.close()
        raise CheckpointError(
            f"checkpoint {step} in {self.directory} holds another train state than this config builds "
            f"({len(differ)} shapes differ, {len(only_saved)} leaves only there, {len(only_wanted)} only here; e.g. "
            f"{example}): use a new workdir, or the model and optimizer settings that run was saved with")

    def _restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self._has_item(step, "data"):
            saved = self.read(step, "meta") if self._has_item(step, "meta") else {}
            if saved.get("process_count") == jax.process_count():
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                logging.warning("checkpoint %d was written by %s processes, this run has %d: the data pipeline starts "
                                "afresh (same seed) instead of at the saved position", step,
                                saved.get("process_count", "?"), jax.process_count())
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - grain and Orbax raise many types; the state-only retry decides
            if "data" not in items:
                raise
            # A data position saved for another source (an image added to the folder, a validation slice carved
            # from train) does not fit this pipeline: grain refuses it. The train state is what must not be lost, so
            # it is read alone; only if that fails too is the step damaged.
            restored = self.manager.restore(step, args=ocp.args.Composite(state=items["state"]))
            logging.warning("checkpoint %d: its data position does not fit this data pipeline (%s): the data "
                            "pipeline starts afresh (same seed) instead of at the saved position", step, _one_line(e))
        logging.info("restored checkpoint %d from %s", step, self.directory)
        return restored["state"]

    def _everywhere_ok(self, ok: bool) -> bool:
        """Every process must agree on which step it restored, or they would train from different states."""
        if jax.process_count() == 1:
            return ok
        return bool(multihost_utils.process_allgather(np.asarray(ok)).all())

    def _quarantine(self, step: int) -> str:
        """Renames step's folder to <step>.damaged-<n> (first free n), which Orbax's step listing skips."""
        source = epath.Path(self.directory) / str(step)
        n = 1
        while (epath.Path(self.directory) / f"{step}{DAMAGED}{n}").exists():
            n += 1
        target = epath.Path(self.directory) / f"{step}{DAMAGED}{n}"
        if jax.process_index() == 0:
            try:
                source.rename(target)
            except Exception as e:  # noqa: BLE001
                self.close()
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} is damaged and could not be set aside ({_one_line(e)}): "
                    f"move {source} out of the way by hand, then restart") from None
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"codi_jax quarantine {step}")
        self.manager.reload()
        return target.name

    def read(self, step: int, name: str) -> dict:
        """A JSON item ('config' or 'meta') of a saved step."""
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

    def _has_item(self, step: int, name: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), name))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.manager.wait_until_finished()
        self.manager.close()


@contextlib.contextmanager
def _stderr_held():
    """Holds what Python writes to sys.stderr (and asyncio's 'exception was never retrieved' log) during a restore;
    passed on afterwards unless `drop()` was called: see _settle."""
    real, held = sys.stderr, io.StringIO()
    held.dropped = False
    asyncio_log = std_logging.getLogger("asyncio")
    level = asyncio_log.level
    sys.stderr = held
    asyncio_log.setLevel(std_logging.CRITICAL)
    try:
        yield held
    finally:
        sys.stderr = real
        asyncio_log.setLevel(level)
        if not held.dropped and held.getvalue():
            real.write(held.getvalue())


def _settle(held: io.StringIO, quiet_s: float = 1.0, max_wait_s: float = 30.0) -> None:
    """After a failed restore, tensorstore's reads still in flight complete into Orbax's closed event loop, each
    printing a 'RuntimeError: Event loop is closed' traceback, and the abandoned coroutines print 'Exception ignored'
    when collected: thousands of lines for one bad file. Waits until that has been quiet for quiet_s, collects the
    garbage, and drops what was held."""
    for wait in (quiet_s, 0.2):  # the reads, then what collecting their coroutines prints
        start = last_change = time.time()
        size = -1
        while time.time() - last_change < wait and time.time() - start < max_wait_s:
            if held.tell() != size:
                size, last_change = held.tell(), time.time()
            time.sleep(0.05)
        gc.collect()
    held.dropped = True


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line: the type and first line of its root cause (tensorstore's own error, such as
    'OUT_OF_RANGE: Error reading ... in OCDBT database ...', rather than Orbax's wrapper)."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """{'params/unet/.../kernel': shape} for the array leaves of a train state or of its saved metadata (None leaves,
    such as an absent target EMA, are left out on both sides)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None or not hasattr(leaf, "shape"):
            continue
        names = (getattr(p, "key", getattr(p, "name", getattr(p, "idx", None))) for p in path)
        out["/".join(str(n) for n in names)] = tuple(leaf.shape)
    return out


def _absolute(path: str) -> str:
    """Orbax (tensorstore's OCDBT) rejects relative local paths mid-save; gs:// and other URLs pass unchanged."""
    return path if "://" in path else os.path.abspath(path)


def restore_params(path: str, abstract_params: Any) -> tuple[Any, Any]:
    """(params, ema_params) of another run (config.init_from): a workdir, its checkpoints/ folder or one step folder.

    Only these two subtrees are read (partial restore), so the other run may have used another optimizer.
    """
    path = _absolute(path.rstrip("/"))
    if not epath.Path(path).exists():  # Checked first: Orbax's CheckpointManager would create the folder.
        raise CheckpointError(f"config.init_from={path!r} does not exist (it is only read, never created)")
    if epath.Path(path, "checkpoints").is_dir():
        path = os.path.join(path, "checkpoints")
    if os.path.basename(path) == "checkpoints" or not epath.Path(path, "state").is_dir():
        options = ocp.CheckpointManagerOptions(create=False, read_only=True)
        manager = ocp.CheckpointManager(path, options=options,
                                        item_handlers={"state": ocp.StandardCheckpointHandler()})
        step = manager.latest_step()
        manager.close()
        if step is None:
            raise CheckpointError(f"config.init_from={path!r}: no codi_jax checkpoint found there")
        path = os.path.join(path, str(step))
    item = {"params": abstract_params, "ema_params": abstract_params}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(path, "state"), args=args)
    logging.info("initialised params and EMA from %s", path)
    return restored["params"], restored["ema_params"]


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
