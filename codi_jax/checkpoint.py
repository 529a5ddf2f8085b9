"""Orbax checkpoints: train state (params, EMA, optimizer, step, rng), the grain iterator position, and the config.

Layout: <workdir>/checkpoints/<step>/{state,data,config}. Orbax writes each step to a temporary folder and renames it
when complete, so a run killed mid-write leaves the previous step restorable.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(_absolute(workdir), "checkpoints")
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

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs), which may be a new mesh."""
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self._has_item(step, "data"):
            saved = self.read(step, "meta") if self._has_item(step, "meta") else {}
            if saved.get("process_count") == jax.process_count():
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                logging.warning("checkpoint %d was written by %s processes, this run has %d: the data pipeline starts "
                                "afresh (same seed) instead of at the saved position", step,
                                saved.get("process_count", "?"), jax.process_count())
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("restored checkpoint %d from %s", step, self.directory)
        return restored["state"]

    def read(self, step: int, name: str) -> dict:
        """A JSON item ('config' or 'meta') of a saved step."""
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

    def _has_item(self, step: int, name: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), name))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _absolute(path: str) -> str:
    """Orbax (tensorstore's OCDBT) rejects relative local paths mid-save; gs:// and other URLs pass unchanged."""
    return path if "://" in path else os.path.abspath(path)


def restore_params(path: str, abstract_params: Any) -> tuple[Any, Any]:
    """(params, ema_params) of another run (config.init_from): a workdir, its checkpoints/ folder or one step folder.

    Only these two subtrees are read (partial restore), so the other run may have used another optimizer.
    """
    path = _absolute(path.rstrip("/"))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.basename(path) == "checkpoints" or not os.path.isdir(os.path.join(path, "state")):
        manager = ocp.CheckpointManager(path, item_handlers={"state": ocp.StandardCheckpointHandler()})
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"config.init_from={path!r}: no codi_jax checkpoint found there")
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
