"""The one training loop, for every mode (vae, pretrain, finetune, codi, pe_codi, cm, gd).

Read top to bottom: config -> mesh -> recipe (what trains, what is frozen) -> shardings from abstract values ->
start-up (workdir checkpoint > init_from > teacher import > scratch) -> an ahead-of-time compiled, donated train step ->
the loop (logging, sample grids, checkpoints, preemption) -> export of the EMA weights. All of it under the workdir's
lease (workdir_lease): one job writes a workdir at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import socket
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from codi_jax import checkpoint, evaluate, lease, modes, parallel, recipes, tasks
from codi_jax import config as common
from codi_jax import data as data_lib
from codi_jax import export as export_lib
from codi_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32
    params: Any  # trainable parameters only
    opt_state: Any
    ema_params: Any  # the slow EMA that is exported (same tree as params); also the consistency target unless ...
    rng: jax.Array  # (2,) uint32 raw key; per-step keys are fold_in(rng, step)
    target_params: Any = None  # ... a separate fast EMA is kept (config.target_ema_decay > 0), as CM and LCM do


def uses_target_ema(config) -> bool:
    """A separate fast EMA for the consistency target (codi, pe_codi, cm) when config.target_ema_decay > 0."""
    return float(config.target_ema_decay) > 0 and modes.get(config.mode).consistency


def _label(path) -> str:
    """'control/controlnet_mid_block/kernel' for a dict path; partitioning boxes' '.value' is left out."""
    names = (getattr(p, "key", getattr(p, "name", None)) for p in path)
    return "/".join(str(n) for n in names if n is not None and n != "value")


def is_zero_initialised(name: str) -> bool:
    """The layers that start at zero so the adapted model starts as the pretrained one: ControlNet's zero convs
    (control/controlnet_down_blocks_*, controlnet_mid_block) and the hint net's last conv."""
    parts = name.split("/")
    return any(p.startswith("controlnet_") and p != "controlnet_cond_embedding" for p in parts) or (
        "controlnet_cond_embedding" in parts and "conv_out" in parts)


def weight_decay_mask(params, kind: str = "kernels"):
    """Which leaves AdamW decays. 'kernels': weight matrices and conv kernels (>= 2-D), except mu and the
    zero-initialised layers, whose decay would pull them back to the zero they start from (the condition's way into
    the network); biases and norm scales are not decayed either. 'all': every leaf."""
    def decay(path, x):
        name = _label(path)
        if kind == "all":
            return True
        return x.ndim >= 2 and not is_zero_initialised(name) and name.split("/")[-1] != "mu"
    return jax.tree_util.tree_map_with_path(decay, params)


def _lr_schedule(config, peak: float) -> optax.Schedule:
    o = config.optimizer
    warmup = max(int(o.warmup_steps), 0)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(config.total_steps, warmup + 1))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                                [max(warmup, 1)])


def _top_level_labels(keys: set[str], label: str):
    """optax.multi_transform labels: `label` for every leaf under the parameter tree's top-level `keys`, else 'rest'."""
    return lambda params: {k: jax.tree.map(lambda _: label if k in keys else "rest", v) for k, v in params.items()}


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (masked weight decay) with global-norm clipping. Full CoDi's mu gets its own Adam learning rate and no
    weight decay: Adam moves a scalar by about its learning rate per step, so at the network's rate (1e-5 at SD scale,
    2e-4 in the embedded default) mu, which starts at 0, could not let the condition in within a short run."""
    o = config.optimizer
    lr = _lr_schedule(config, float(o.learning_rate))
    adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=functools.partial(weight_decay_mask, kind=o.weight_decay_mask))
    chain = []
    if o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip))
    if modes.get(config.mode).cond_form == "mu":
        mu_lr = _lr_schedule(config, float(o.mu_learning_rate or o.learning_rate))
        chain.append(optax.multi_transform({"rest": adamw, "mu": optax.adam(mu_lr, b1=o.b1, b2=o.b2, eps=o.eps)},
                                           _top_level_labels({"mu"}, "mu")))
    elif config.mode == "vae" and config.vae.train == "decoder":
        chain.append(optax.multi_transform({"rest": adamw, "frozen": optax.set_to_zero()},
                                           _top_level_labels(set(recipes.VAE_ENCODER_PARTS), "frozen")))
    else:
        chain.append(adamw)
    return optax.chain(*chain), lr


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the loader delivers, known without reading data (for the ahead-of-time compile)."""
    b, s = int(config.batch_size), int(config.data.image_size)
    spec = {
        "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((b, int(config.data.max_length)), jnp.int32),
    }
    channels = data_lib.cond_channels(config.data)
    if channels:
        spec["cond"] = jax.ShapeDtypeStruct((b, s, s, channels), jnp.float32)
    return spec


def _ema_update(ema, params, decay):
    """decay * ema + (1 - decay) * params, leaf by leaf, in each EMA leaf's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def _tree_norm(tree) -> jax.Array:
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def make_train_step(recipe: recipes.Recipe, tx: optax.GradientTransformation, lr_schedule, config):
    accum = int(config.optimizer.grad_accum_steps)
    decay = float(config.ema_decay)

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        target = state.ema_params if state.target_params is None else state.target_params

        def loss_fn(params, micro_batch, key):
            return recipe.loss(params, target, frozen, micro_batch, key)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, rng)
        else:
            # Micro-batch i takes rows i, i + accum, i + 2 accum, ...: the batch axis is sharded in contiguous blocks,
            # so this strided split leaves every device its own rows of every micro-batch (no resharding per scan
            # step), where a contiguous split would put whole micro-batches on a quarter of the devices.
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

            def body(carry, inputs):
                micro_batch, i = inputs
                (_, m), g = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(
                lambda x: x[0], micro), rng)))
            zero_grads, zero_metrics = zeros[1], zeros[0][1]
            (grads, metrics), _ = jax.lax.scan(body, (zero_grads, zero_metrics), (micro, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = jax.tree.map(lambda m: m / accum, metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Warm-up (as tf.train.ExponentialMovingAverage with num_updates): a fixed 0.999 after 600 steps would still
        # weigh the random init by 0.999**600 = 55 %, which made short runs' exported EMA models useless.
        n = state.step.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if config.ema_warmup else jnp.float32(decay)
        ema = _ema_update(state.ema_params, params, d)
        target_params = state.target_params
        if target_params is not None:  # the fast consistency target: a fixed decay, as CM / LCM
            target_params = _ema_update(target_params, params, jnp.float32(config.target_ema_decay))
        metrics = dict(metrics)
        metrics.update(
            grad_norm=_tree_norm(grads), param_norm=_tree_norm(params), update_norm=_tree_norm(updates),
            learning_rate=lr_schedule(state.step),
        )
        if isinstance(params, dict) and "mu" in params:
            metrics["mu"] = params["mu"].astype(jnp.float32).reshape(())
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                                  target_params=target_params)
        return new_state, metrics

    return train_step


# Exit statuses, for supervisors (launch/supervise.sh) and schedulers.
EXIT_PREEMPTED = 75  # SIGTERM honoured: a checkpoint of the current step was written; rerun to resume (EX_TEMPFAIL)
EXIT_NO_PROGRESS = 76  # SIGTERM, but no step finished within preemption_grace_s: no new checkpoint, older ones intact
EXIT_NO_DATA = 65  # a whole pass over the data had no readable record (EX_DATAERR): restarting cannot help


class NoDataError(checkpoint.OneLineExit):
    """The data yields nothing; raised in place of an endless wait, after the loop has closed its checkpointer."""

    status = EXIT_NO_DATA


class _Preemption:
    """SIGTERM (what a preempted TPU VM or a scheduler sends) asks for a checkpoint at the next step, then a clean exit.

    The next step may never come: the loop can be blocked in next(data) on a stalled read, or in a compile. Python runs
    signal handlers only between bytecodes of the main thread, so the handler alone cannot bound that. The C-level
    handler also writes the signal number to a wakeup socket, which a watcher thread reads at once; it gives the loop
    `grace_s` to reach its checkpoint, then exits the process with EXIT_NO_PROGRESS. The committed checkpoints stay
    as they are (a save in flight is never committed half-written).
    """

    def __init__(self, grace_s: float = 0.0, last_checkpoint=lambda: None):
        self.requested = False
        self._grace_s, self._last_checkpoint = float(grace_s), last_checkpoint
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False
        self._sockets = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread (e.g. under a test runner thread).
            self._previous = None
            return
        if self._grace_s > 0:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._sockets = (reader, writer)
            threading.Thread(target=self._watch, name="sigterm-watchdog", daemon=True).start()

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing at the next step, then exiting")
        self.requested = True

    def _watch(self):
        reader = self._sockets[0]
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            with self._lock:
                if self._closed or not data:
                    return
                if int(signal.SIGTERM) in data and self._timer is None:
                    self._timer = threading.Timer(self._grace_s, self._give_up)
                    self._timer.daemon = True
                    self._timer.start()

    def _give_up(self):
        with self._lock:
            if self._closed:
                return
        try:
            step = self._last_checkpoint()
        except Exception:  # noqa: BLE001 - the message must go out whatever the checkpoint folder's state
            step = "unknown"
        logging.error("SIGTERM: no training step finished within %.0f s (the run was starting up, compiling or waiting for data); "
                      "exiting with status %d and no new checkpoint; %s", self._grace_s, EXIT_NO_PROGRESS,
                      "no checkpoint had been written" if step is None else f"checkpoint {step} is the latest and intact")
        lease.release_all()  # os._exit skips every `finally`: the next start need not wait for the lease to go stale
        logging.flush()
        os._exit(EXIT_NO_PROGRESS)

    def disarm(self):
        """The loop reached its checkpoint: the save must not be cut short."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except Exception:  # noqa: BLE001 - no preemption service outside managed TPU runtimes.
                pass
            # Every host must agree, or some would wait forever in the checkpoint's collectives.
            return bool(multihost_utils.process_allgather(np.asarray(self.requested)).any())
        return self.requested

    def restore(self):
        self.disarm()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._sockets is not None:
            signal.set_wakeup_fd(self._previous_fd)
            reader, writer = self._sockets
            try:
                writer.send(b"\0")  # wakes the watcher, which sees _closed and returns
            except OSError:
                pass
            writer.close()


def _next_batch(data_iter):
    """next(data_iter), with a data source that yields nothing turned into NoDataError's one line."""
    try:
        return next(data_iter)
    except Exception as e:  # noqa: BLE001 - grain re-raises a worker's error under its own type
        if pipeline.NoReadableData.MARKER in str(e):
            message = next(line for line in str(e).splitlines() if pipeline.NoReadableData.MARKER in line)
            raise NoDataError(message[message.index("data:"):] if "data:" in message else message) from e
        raise


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_finite(metrics: dict, step: int, checkpointer: checkpoint.Checkpointer) -> None:
    bad = {k: float(v) for k, v in metrics.items() if not np.all(np.isfinite(v))}
    if bad:
        raise FloatingPointError(
            f"non-finite training metrics at step {step}: {bad}. The run stopped without saving; the last checkpoint "
            f"(step {checkpointer.latest_step()}) in {checkpointer.directory} is intact. Lower optimizer.learning_rate or "
            "check the data."
        )


@dataclasses.dataclass
class Setup:
    """Everything the loop needs, built once; tests build it on several meshes and compare."""

    recipe: recipes.Recipe
    mesh: jax.sharding.Mesh
    state: TrainState
    frozen: dict
    step_fn: Any  # the ahead-of-time compiled train step (state, frozen, batch) -> (state, metrics)
    batch_spec: dict
    state_shardings: Any
    abstract_state: Any
    data_iter: Any
    checkpointer: checkpoint.Checkpointer
    start_step: int
    compile_info: dict
    traces: list  # one entry per trace of the step function (must stay at 1)
    finished: bool = False  # reached total_steps (False: stopped by a preemption signal)


@dataclasses.dataclass
class Plan:
    """A config's train step before any weight exists: the state's abstract value and shardings, the frozen parts'
    shardings, the batch it takes, and the step itself. train.setup runs it; the AOT pod plan
    (benchmarks/aot_tpu.py) and the GPU benchmark compile it for hardware they do not have."""

    recipe: recipes.Recipe
    mesh: jax.sharding.Mesh
    rules: Any
    tx: optax.GradientTransformation
    init_boxed_state: Any  # rng -> TrainState with boxed (logically annotated) params: for eval_shape and scratch init
    state_shardings: Any
    frozen_shardings: dict
    abstract_state: Any  # ShapeDtypeStructs with shardings
    batch_spec: dict
    step_fn: Any  # (state, frozen, batch) -> (state, metrics), not yet jitted

    def jit(self, frozen_keys=None, step_fn=None):
        """The step jitted with explicit shardings and the state donated; frozen_keys: the frozen parts passed."""
        keys = self.frozen_shardings if frozen_keys is None else frozen_keys
        batch_shardings = {k: parallel.batch_sharding(self.mesh, len(v.shape)) for k, v in self.batch_spec.items()}
        return jax.jit(step_fn or self.step_fn,
                       in_shardings=(self.state_shardings, {k: self.frozen_shardings[k] for k in keys},
                                     batch_shardings),
                       out_shardings=(self.state_shardings, parallel.replicated(self.mesh)), donate_argnums=(0,))


def plan(config: ml_collections.ConfigDict, recipe: recipes.Recipe, mesh: jax.sharding.Mesh) -> Plan:
    rules = parallel.rules_from_config(config.logical_axis_rules)
    tx, lr_schedule = make_optimizer(config)
    target = uses_target_ema(config)

    def init_boxed_state(rng):
        params = recipe.init_fn(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=params,
                          rng=rng, target_params=params if target else None)

    # Shardings from abstract values: nothing is materialised before it is placed.
    with nn.logical_axis_rules(rules):
        abstract_boxed = jax.eval_shape(init_boxed_state, jax.random.PRNGKey(config.seed))
        state_shardings = parallel.logical_shardings(abstract_boxed, mesh, rules)
        frozen_shardings = parallel.logical_shardings(recipe.frozen_abstract, mesh, rules)
    abstract_state = checkpoint.abstract_with_shardings(nn.meta.unbox(abstract_boxed), state_shardings)
    return Plan(recipe=recipe, mesh=mesh, rules=rules, tx=tx, init_boxed_state=init_boxed_state,
                state_shardings=state_shardings, frozen_shardings=frozen_shardings, abstract_state=abstract_state,
                batch_spec=batch_spec(config), step_fn=make_train_step(recipe, tx, lr_schedule, config))


def _open_checkpointer(config: ml_collections.ConfigDict, workdir: str) -> checkpoint.Checkpointer:
    if "://" not in workdir:
        os.makedirs(workdir, exist_ok=True)
    return checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)


def setup(config: ml_collections.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None,
          checkpointer: checkpoint.Checkpointer | None = None) -> Setup:
    """Mesh, recipe, shardings, start-up (workdir checkpoint > init_from > teacher > scratch) and the compiled step."""
    checkpointer = checkpointer or _open_checkpointer(config, workdir)
    # The workdir's own checkpoints are checked against this config before anything is built or loaded.
    _check_workdir(config, checkpointer)
    mesh = mesh or parallel.make_mesh(config.mesh.to_dict())
    logging.info("mode %s, mesh %s on %d devices (%d processes)", config.mode, dict(mesh.shape), jax.device_count(),
                 jax.process_count())
    if config.batch_size % parallel.data_parallel_size(mesh):
        raise ValueError(f"config.batch_size={config.batch_size} does not divide over the data x fsdp mesh axes "
                         f"({parallel.data_parallel_size(mesh)} shards)")
    if config.batch_size % jax.process_count():
        raise ValueError(f"config.batch_size={config.batch_size} does not divide over {jax.process_count()} processes")

    recipe = recipes.make(config, workdir)
    p = plan(config, recipe, mesh)
    rules, tx, init_boxed_state = p.rules, p.tx, p.init_boxed_state
    state_shardings, frozen_shardings, abstract_state = p.state_shardings, p.frozen_shardings, p.abstract_state
    target = uses_target_ema(config)
    rng0 = jax.random.PRNGKey(config.seed)
    replicated = parallel.replicated(mesh)
    frozen = recipe.placed_frozen(parallel.put_global(recipe.frozen_host,
                                                      {k: frozen_shardings[k] for k in recipe.frozen_host}),
                                  abstract_state.params)

    # Data: each process reads its own slice of the global batch.
    loader = data_lib.make_train_loader(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                        process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = iter(loader)

    # Start-up order: latest checkpoint in workdir that reads > init_from > teacher import > scratch.
    start = checkpointer.latest_step()
    if start is not None:
        start, state = checkpointer.restore_readable(abstract_state, data_iter)
        logging.info("resumed from %s at step %d", checkpointer.directory, start)
    else:
        make_state = jax.jit(
            lambda params, ema, rng: TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                opt_state=tx.init(params), ema_params=ema, rng=rng,
                                                target_params=ema if target else None),
            out_shardings=state_shardings,
        )
        rng = jax.device_put(rng0, replicated)
        if config.init_from:
            params, ema = checkpoint.restore_params(config.init_from, abstract_state.params)
            state = make_state(params, ema, rng)
        elif recipe.initial_params is not None:
            params = parallel.put_global(recipe.initial_params, state_shardings.params)
            state = make_state(params, params, rng)
        else:
            with nn.logical_axis_rules(rules):
                state = jax.jit(lambda r: nn.meta.unbox(init_boxed_state(r)), out_shardings=state_shardings)(rng0)
        start = 0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    logging.info("%s: %.2fM trainable parameters", config.mode, n_params / 1e6)

    # The train step: explicit shardings, donated state, compiled ahead of time (once).
    batch_spec = p.batch_spec
    traces: list = []

    def traced_step(state, frozen, batch):
        traces.append(1)
        return p.step_fn(state, frozen, batch)

    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        jitted = p.jit(frozen_keys=frozen, step_fn=traced_step)
        if start < config.total_steps:
            t0 = time.time()
            compiled = jitted.lower(abstract_state, jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen), batch_spec).compile()
            info = log_compiled(compiled, time.time() - t0)
        else:  # A finished run restarted (e.g. to redo the export or evaluation): nothing to compile.
            compiled, info = None, {}
    info["trainable_parameters"] = n_params
    return Setup(recipe=recipe, mesh=mesh, state=state, frozen=frozen, step_fn=compiled, batch_spec=batch_spec,
                 state_shardings=state_shardings, abstract_state=abstract_state, data_iter=data_iter,
                 checkpointer=checkpointer, start_step=start, compile_info=info, traces=traces)


def _check_workdir(config: ml_collections.ConfigDict, checkpointer: checkpoint.Checkpointer) -> None:
    """One line (checkpoint.CheckpointError) before any work, for a workdir this config cannot go on with: another
    mode or task saved there, a checkpoint past total_steps, only damaged checkpoints left, or a missing init_from."""
    # Compared as the run will build it (main resolved it already; API callers may not have): what the teacher folder
    # and init_controlnet define (its hint net replaces model.hint_channels) is filled in first.
    common.resolve(config)
    steps = checkpointer.all_steps()
    where = checkpointer.directory
    if not steps and checkpointer.quarantined():
        checkpointer.close()
        raise checkpoint.CheckpointError(
            f"no checkpoint in {where} reads (set aside as damaged: {', '.join(checkpointer.quarantined())}); nothing "
            "was deleted: repair or move them, or use a new workdir, to start again")
    saved = checkpointer.saved_config()
    if saved is not None:
        step, saved_config = saved
        mine = {"mode": config.mode, "task": config.get("task")}
        theirs = {k: saved_config.get(k) for k in mine}
        if mine != theirs:
            checkpointer.close()
            raise checkpoint.CheckpointError(
                f"{where} holds a run of mode {theirs['mode']!r}, task {theirs['task']!r} (checkpoint {step}); this "
                f"config asks for mode {mine['mode']!r}, task {mine['task']!r}: use another workdir, or that run's "
                "config")
        # The model's settings (its shape, what trains, what it predicts), from the saved config alone: refused before
        # a teacher is loaded. Keys one side lacks (a config from an older version) are not compared.
        ours = json.loads(json.dumps(config.model.to_dict()))
        saved_model = saved_config.get("model") or {}
        differ = sorted(k for k in ours.keys() & saved_model.keys() if ours[k] != saved_model[k])
        if differ:
            checkpointer.close()
            shown = "; ".join(f"model.{k}={saved_model[k]!r} there, {ours[k]!r} here" for k in differ[:3])
            raise checkpoint.CheckpointError(
                f"{where} holds a run with other model settings (checkpoint {step}): {shown}"
                f"{f' (and {len(differ) - 3} more)' if len(differ) > 3 else ''}: use another workdir, or the model "
                "settings that run was saved with")
    if steps and steps[-1] > config.total_steps:
        checkpointer.close()
        raise checkpoint.CheckpointError(
            f"{where} already holds checkpoint {steps[-1]}, past config.total_steps={config.total_steps}: raise "
            f"total_steps to train on from step {steps[-1]}, or use a new workdir (nothing is rolled back, and "
            f"step {steps[-1]}'s model is not exported as a {config.total_steps}-step one)")
    if not steps and config.init_from and "://" not in config.init_from and not os.path.exists(config.init_from):
        checkpointer.close()
        raise checkpoint.CheckpointError(
            f"config.init_from={config.init_from!r} does not exist (it is only read, never created)")


@contextlib.contextmanager
def workdir_lease(workdir: str):
    """Holds the workdir's lease (codi_jax.lease) for the block: one job per workdir. Process 0 takes it; the others
    follow its verdict, so that a refusal ends every process in the same line's status instead of leaving them in a
    collective. A no-op inside a lease this job already holds on the workdir or a folder above it."""
    if lease.covering(workdir) is not None:
        yield
        return
    refused = None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lease.hold(workdir, take=jax.process_index() == 0))
        except checkpoint.CheckpointError as e:
            refused = e
        _everywhere_or_raise(refused, f"{workdir}: process 0 refused the workdir (its log says why: another job holds "
                                      "its lease)")
        yield


def _everywhere_or_raise(error: checkpoint.CheckpointError | None, elsewhere: str) -> None:
    """Raises `error` here, or `elsewhere` on the processes where it did not occur, if it occurred on any process."""
    if jax.process_count() > 1:
        anywhere = bool(multihost_utils.process_allgather(np.asarray(error is not None)).any())
        if anywhere and error is None:
            raise checkpoint.CheckpointError(elsewhere)
    if error is not None:
        raise error


def _check_lease(workdir: str) -> None:
    """Before a write that another job must not meet (a checkpoint, the export): stops, writing nothing, if this job
    lost the workdir's lease to another (it was stalled past its heartbeat timeout and a restart took over)."""
    held = lease.covering(workdir)
    error = None
    if held is not None and held.taken:
        try:
            held.verify()
        except checkpoint.CheckpointError as e:
            error = e
    _everywhere_or_raise(error, f"{workdir}: process 0 found that this job lost the workdir's lease to another job "
                                "(its log says which): stopped without writing")


def train(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Trains config.mode in workdir until config.total_steps; resumes from workdir by itself. Holds the workdir's
    lease meanwhile (see workdir_lease): a second job on the same workdir refuses instead of writing over this one."""
    with workdir_lease(workdir):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    # SIGTERM is honoured from here on: during start-up (teacher load, restore, the ahead-of-time compile) it is
    # noted, and the watchdog bounds the wait for the first step's checkpoint by preemption_grace_s.
    checkpointer = _open_checkpointer(config, workdir)
    preemption = _Preemption(config.preemption_grace_s, checkpointer.latest_step)
    try:
        s = setup(config, workdir, checkpointer=checkpointer)
    except BaseException:
        checkpointer.close()
        preemption.restore()
        raise
    recipe, mesh, state, frozen, compiled = s.recipe, s.mesh, s.state, s.frozen, s.step_fn
    data_iter, checkpointer, start, batch_spec = s.data_iter, s.checkpointer, s.start_step, s.batch_spec

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams(_hparams(config))
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)]
    if jax.process_index() == 0 and config.profile_steps > 0:
        hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps, logdir=workdir,
                                              first_profile=start + 3, every_secs=None))
    sampler = _make_sampler(recipe, frozen, config, mesh) if config.sample_every else None
    pending: list[dict] = []
    step = start
    try:
        while step < config.total_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                local = _next_batch(data_iter)
                batch = parallel.global_batch({k: local[k] for k in batch_spec}, mesh)
                state, metrics = compiled(state, frozen, batch)
            step += 1
            pending.append(metrics)
            for hook in hooks:
                hook(step)
            if step % config.log_every == 0 or step == config.total_steps:
                host = jax.device_get(pending)
                pending = []
                summary = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                _check_finite(summary, step, checkpointer)
                if data_lib.skipped_files():  # distinct unreadable files so far (each logged once, when first seen)
                    summary["data_skipped_files"] = float(data_lib.skipped_files())
                writer.write_scalars(step, summary)
            if sampler is not None and step % config.sample_every == 0:
                with hooks[0].timed("samples"):
                    writer.write_images(step, {"samples": sampler(state)})
            stop = preemption.reached(step)
            if stop:
                preemption.disarm()
            if step % config.checkpoint_every == 0 or step == config.total_steps or stop:
                _check_finite(jax.device_get(metrics), step, checkpointer)
                _check_lease(workdir)
                checkpointer.save(step, state, data_iter, _config_json(config))
            if stop:
                logging.warning("stopping at step %d after the preemption checkpoint", step)
                break
        writer.flush()
    except NoDataError as e:
        latest = checkpointer.latest_step()
        logging.error("%s; stopped at step %d with status %d (%s)", e, step, EXIT_NO_DATA,
                      "no checkpoint written" if latest is None else f"checkpoint {latest} is the latest and intact")
        raise
    finally:
        checkpointer.close()
        preemption.restore()
    if step >= config.total_steps:
        _check_lease(workdir)
        recipe.after_training(state.ema_params, data_iter)
        export_lib.export(recipe, state, frozen, os.path.join(workdir, "export"))
    s.state = state
    s.finished = step >= config.total_steps
    return s


def log_compiled(compiled, seconds: float) -> dict:
    info = {"compile_seconds": round(seconds, 2)}
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                          "generated_code_size_in_bytes", "alias_size_in_bytes"):
                info[field] = int(getattr(mem, field, 0))
    except Exception as e:  # noqa: BLE001 - not every backend reports memory.
        info["memory_analysis"] = f"unavailable: {e}"
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost:
            info["flops"] = float(cost.get("flops", 0.0))
            info["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    except Exception as e:  # noqa: BLE001
        info["cost_analysis"] = f"unavailable: {e}"
    logging.info("train step compiled: %s", info)
    return info


def _hparams(config) -> dict:
    """The config as TensorBoard hparams: dotted keys, scalars kept, anything else (tuples, None) as text."""
    flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _make_sampler(recipe: recipes.Recipe, frozen: dict, config, mesh):
    """Image grid of EMA samples on a fixed held-out batch (jitted once; frozen weights passed, not captured)."""
    n = int(config.num_sample_images)
    host = next(iter(data_lib.make_eval_batches(config.data, batch_size=n, num_examples=n, seed=config.eval.seed)))
    host = {k: np.asarray(v) for k, v in host.items() if k in ("image", "cond", "input_ids")}
    batch = parallel.put_global(host, {k: parallel.replicated(mesh) for k in host})
    method, steps = recipe.default_sampler()
    fn = jax.jit(lambda params, frozen, batch: recipe.sample(
        params, frozen, batch, jax.random.PRNGKey(config.eval.seed), method=method, num_steps=steps))

    def sample(state):
        images = np.asarray(multihost_utils.process_allgather(fn(state.ema_params, frozen, batch), tiled=True))
        rows = [images, host["image"]]
        if "cond" in host:
            rows.insert(0, tasks.condition_rgb(host["cond"]))
        grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
        return ((grid[None] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)

    return sample


def _gd_rounds(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Progressive / guided distillation (GD-II): each round halves the student's step count, and its teacher is the
    previous round's EMA student (the first round's is config.init_from, the fine-tuned model). Round k runs in
    <workdir>/gd_round_k; the last round in <workdir> itself."""
    rounds = int(config.gd_rounds)
    final = int(config.objective.gd_student_steps)
    previous = config.init_from
    for k in range(rounds):
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.objective.gd_student_steps = final * 2 ** (rounds - 1 - k)
        cfg.init_from = previous
        cfg.total_steps = max(1, config.total_steps // rounds)
        cfg.gd_rounds = 1
        round_dir = workdir if k == rounds - 1 else os.path.join(workdir, f"gd_round_{k}")
        logging.info("=== gd round %d/%d: %d student steps, teacher %s, in %s", k + 1, rounds,
                     cfg.objective.gd_student_steps, previous, round_dir)
        if not train(cfg, round_dir).finished:
            return False
        previous = round_dir
    return True


def train_mode(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """The main mode alone (no stages, no evaluation): GD-II's progressive rounds or one train(). False if preempted."""
    if modes.get(config.mode).progressive and config.gd_rounds > 1:
        return _gd_rounds(config, workdir)
    logging.info("=== %s in %s", config.mode, workdir)
    return train(config, workdir).finished


def run_stage(config: ml_collections.ConfigDict, workdir: str, label: str = "") -> bool:
    """Trains `config` in `workdir` unless a finished export is already there; True once it is, False when a
    preemption stopped it. How a run's prerequisite stages and the Table 2 benchmark's methods are each run."""
    label = label or config.mode
    if export_lib.is_finished(os.path.join(workdir, "export")):
        logging.info("%s already done in %s", label, workdir)
        return True
    logging.info("=== %s (%d steps) in %s", label, config.total_steps, workdir)
    return train_mode(config, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Runs the prerequisite stages (embedded default: VAE, then the text-to-image teacher), the main mode, and
    optionally the evaluation, each resuming where it stopped. False when a preemption stopped it early. The
    workdir's lease is taken first, before anything is written there or a teacher loads, and held throughout."""
    with workdir_lease(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> bool:
    for stage in config.stages:
        stage_cfg = common.stage_config(config, stage)
        # '@stage' names are relative to the top workdir, not to the stage's own folder.
        for field in ("teacher", "vae_from", "text_encoder_from"):
            stage_cfg[field] = recipes.resolve(stage_cfg[field], workdir)
        if not run_stage(stage_cfg, os.path.join(workdir, stage), f"stage {stage}"):
            return False
    if not train_mode(config, workdir):
        return False
    if config.run_eval:

        evaluate.run(config, workdir)
    return True
