"""The training system: sharded step == single-device step, exact resume after SIGKILL, atomic checkpoints,
non-finite stop, and two processes x 4 CPU devices restoring onto another mesh."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg="tiny"):
    spec = importlib.util.spec_from_file_location("depth_config", os.path.join(REPO, "configs", "depth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(teacher, **overrides):
    c = load_config("tiny")
    c.stages = ()
    c.run_eval = False
    c.teacher = teacher
    c.vae_from = ""
    c.batch_size = 8
    c.total_steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from codi_jax.testing import make_random_pipeline

    return make_random_pipeline(str(tmp_path_factory.mktemp("teacher")))


def _main_cmd(teacher, workdir, *extra):
    return [sys.executable, "-m", "codi_jax.main", "--config=configs/depth.py:tiny", f"--workdir={workdir}",
            "--config.stages=()", "--config.run_eval=False", f"--config.teacher={teacher}", "--config.vae_from=",
            "--config.batch_size=8", *extra]


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **extra})
    return env


def _restore_ema(workdir, step=None):
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints")
    step = step or max(int(d) for d in os.listdir(directory) if d.isdigit())
    with ocp.PyTreeCheckpointer() as ckpt:
        state = ckpt.restore(os.path.join(directory, str(step), "state"))
    return step, state["ema_params"]


@pytest.mark.slow
def test_sharded_step_matches_single_device(teacher, tmp_path):
    from codi_jax import parallel, train

    assert jax.device_count() == 8
    config = tiny_config(teacher)
    one = train.setup(config, str(tmp_path / "one"), mesh=parallel.make_mesh({"data": 1}, jax.devices()[:1]))
    eight = train.setup(config, str(tmp_path / "eight"), mesh=parallel.make_mesh({"data": 2, "fsdp": 4}))

    # FSDP really shards: the UNet's first conv kernel (3, 3, 4, 32) keeps 1/4 of its input... its conv_out axis on
    # tensor=1 stays whole, conv_in=4 splits 4 ways over fsdp.
    kernel = eight.state.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    shard_shapes = {s.data.shape for s in kernel.addressable_shards}
    assert shard_shapes == {(3, 3, kernel.shape[2] // 4, kernel.shape[3])}, shard_shapes
    assert len(kernel.sharding.device_set) == 8

    s1, s8 = one.state, eight.state
    for _ in range(3):
        local = next(one.data_iter)
        local8 = next(eight.data_iter)
        for k in one.batch_spec:
            np.testing.assert_array_equal(local[k], local8[k])
        s1, m1 = one.step_fn(s1, one.frozen, parallel.global_batch({k: local[k] for k in one.batch_spec}, one.mesh))
        s8, m8 = eight.step_fn(s8, eight.frozen,
                               parallel.global_batch({k: local8[k] for k in eight.batch_spec}, eight.mesh))
        np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v): a parameter whose gradient is exactly zero on one device and ~1e-20 (reduction order)
    # on eight moves by up to ~lr (1.2e-5 at step 3 of the warmup); everything else agrees to float32 precision.
    # mu has its own (larger) Adam rate, so its bound is its own rate.
    lr = 3 * config.optimizer.learning_rate / config.optimizer.warmup_steps
    mu_lr = 3 * config.optimizer.mu_learning_rate / config.optimizer.warmup_steps
    one_params, eight_params = jax.device_get(s1.params), jax.device_get(s8.params)
    for key in one_params:
        for a, b in zip(jax.tree.leaves(one_params[key]), jax.tree.leaves(eight_params[key])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=mu_lr if key == "mu" else lr)
    one_ema, eight_ema = jax.device_get(s1.ema_params), jax.device_get(s8.ema_params)
    for key in one_ema:
        for a, b in zip(jax.tree.leaves(one_ema[key]), jax.tree.leaves(eight_ema[key])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=mu_lr if key == "mu" else lr)
    assert len(one.traces) == 1 and len(eight.traces) == 1  # compiled once, ahead of time
    assert int(s8.step) == 3
    assert one.compile_info["flops"] > 0
    one.checkpointer.close()
    eight.checkpointer.close()


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(teacher, tmp_path):
    steps = ["--config.total_steps=8", "--config.checkpoint_every=2", "--config.log_every=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_main_cmd(teacher, full, *steps), cwd=REPO, env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(_main_cmd(teacher, killed, *steps), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "4"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
    assert saved and max(saved) < 8, f"the run was not killed mid-way: {saved}"

    out = subprocess.run(_main_cmd(teacher, killed, *steps), cwd=REPO, env=_env(), check=True, capture_output=True,
                         text=True)
    assert "resumed from" in out.stderr
    step_a, ema_a = _restore_ema(str(full))
    step_b, ema_b = _restore_ema(str(killed))
    assert step_a == step_b == 8
    for a, b in zip(jax.tree.leaves(ema_a), jax.tree.leaves(ema_b)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_interrupted_checkpoint_write_leaves_older_one_restorable(tmp_path):
    from codi_jax import checkpoint

    state = {"params": {"w": np.arange(6, dtype=np.float32)}, "step": np.int32(1)}
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, state)
    ckpt.close()
    # What a kill in the middle of writing step 2 leaves behind: Orbax's temporary folder, never renamed.
    partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    assert ckpt.latest_step() == 1
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = ckpt.restore(abstract)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    ckpt.close()



def test_data_position_for_other_data_restarts_the_pipeline_and_keeps_the_state(tmp_path, caplog):
    """An image added to a folder dataset changes the source's size, and grain refuses the saved data position: the
    train state still restores (the step is not set aside as damaged) and the data pipeline starts afresh."""
    from PIL import Image

    from codi_jax import checkpoint
    from codi_jax import data as data_lib

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def add(i):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")

    for i in range(6):
        add(i)
    cfg = data_lib.default_config()
    cfg.dataset, cfg.data_dir, cfg.image_size, cfg.task = "folder", str(folder), 16, "t2i"
    cfg.folder_test_fraction = cfg.folder_validation_fraction = 0.0

    def loader():
        return iter(data_lib.make_train_loader(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1))

    it = loader()
    next(it)
    state = {"params": {"w": np.arange(6, dtype=np.float32)}, "step": np.int32(1)}
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), keep=3, async_save=False)
    ckpt.save(1, state, it)
    ckpt.close()
    add(6)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), keep=3)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with caplog.at_level("WARNING"):
        step, restored = ckpt.restore_readable(abstract, loader())
    assert step == 1 and not ckpt.quarantined()
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(6))
    assert "data position does not fit" in caplog.text
    ckpt.close()


def test_relative_workdir_checkpoints(tmp_path, monkeypatch):
    """`--workdir=runs/x` (as in the README): Orbax's OCDBT writer rejects relative paths in the middle of a save."""
    import jax.numpy as jnp

    from codi_jax import checkpoint

    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": jnp.arange(6, dtype=jnp.float32)}, "step": jnp.int32(3)}
    ckpt = checkpoint.Checkpointer("runs/rel", keep=2)
    ckpt.save(3, state)
    ckpt.close()
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "3" / "state").is_dir()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = checkpoint.Checkpointer("runs/rel").restore(abstract)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(6))

@pytest.mark.slow
def test_non_finite_loss_stops_with_intact_checkpoint(teacher, tmp_path):
    from codi_jax import train

    config = tiny_config(teacher, **{"total_steps": 6, "checkpoint_every": 1, "log_every": 1,
                                     "optimizer.learning_rate": 1e30, "optimizer.grad_clip": 0.0,
                                     "optimizer.warmup_steps": 0})
    with pytest.raises(FloatingPointError, match="non-finite"):
        train.train(config, str(tmp_path))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps, "no checkpoint survived"
    _, ema = _restore_ema(str(tmp_path), steps[-1])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ema))


@pytest.mark.slow
def test_two_processes_then_restore_on_another_mesh(teacher, tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    workdir = tmp_path / "run"
    common = ["--config.total_steps=2", "--config.checkpoint_every=2", "--config.mesh.data=2",
              "--config.mesh.fsdp=4"]
    procs = [
        subprocess.Popen(_main_cmd(teacher, workdir, *common), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=_env(CODI_COORDINATOR=f"127.0.0.1:{port}", CODI_NUM_PROCESSES="2",
                                  CODI_PROCESS_ID=str(i), CODI_LOCAL_DEVICES="4"))
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
    assert (workdir / "checkpoints" / "2").is_dir()

    # One process, 8 devices, a different mesh: restores the 2-process checkpoint and trains on.
    out = subprocess.run(
        _main_cmd(teacher, workdir, "--config.total_steps=4", "--config.checkpoint_every=2", "--config.mesh.data=1",
                  "--config.mesh.fsdp=8"),
        cwd=REPO, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "fsdp': 8" in out.stderr
    step, ema = _restore_ema(str(workdir))
    assert step == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ema))
    from codi_jax import checkpoint

    ckpt = checkpoint.Checkpointer(str(workdir))
    assert ckpt.read(4, "config")["mode"] == "codi"
    assert ckpt.read(2, "meta")["process_count"] == 2 and ckpt.read(4, "meta")["process_count"] == 1
    ckpt.close()


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_warmup_forgets_the_init(warmup):
    """With warm-up the EMA decay is min(ema_decay, (1 + n) / (10 + n)): a short run's EMA no longer holds most of
    the random init (0.999**600 = 55 % without it)."""
    import jax.numpy as jnp
    import optax

    from codi_jax import train

    class Quadratic:  # stands in for recipes.Recipe: only .loss is used by the step
        @staticmethod
        def loss(params, ema_params, frozen, batch, rng):
            loss = jnp.sum((params["w"] - batch["target"]) ** 2)
            return loss, {"loss": loss}

    c = load_config("tiny")
    c.ema_decay, c.ema_warmup = 0.999, warmup
    tx = optax.sgd(0.5)  # w -> target in one step from any start: (w - 0.5 * 2 (w - target))
    step = jax.jit(train.make_train_step(Quadratic(), tx, lambda n: 0.5, c))
    w0 = jnp.zeros(3)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params={"w": w0}, opt_state=tx.init({"w": w0}),
                             ema_params={"w": w0}, rng=jax.random.key_data(jax.random.key(0)))
    target = jnp.ones(3)
    for _ in range(600):
        state, _ = step(state, {}, {"target": target})
    expected_init_weight = (np.prod([min(0.999, (1 + n) / (10 + n)) for n in range(600)]) if warmup else 0.999 ** 600)
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), 1.0 - expected_init_weight, rtol=1e-4)
    assert (expected_init_weight < 1e-3) if warmup else (expected_init_weight > 0.5)


def test_grad_accumulation_equals_one_big_batch():
    """accum micro-batches of a per-example-mean loss give the full batch's gradient, hence the same update; the
    metrics are the micro-batch average (here the batch mean, since every micro-batch has the same size)."""
    import jax.numpy as jnp
    import optax

    from codi_jax import train

    class Regression:  # loss depends on each example, so a dropped or repeated row changes the gradient
        @staticmethod
        def loss(params, ema_params, frozen, batch, rng):
            loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
            return loss, {"loss": loss}

    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=(12,)),
                                                                                       jnp.float32)}
    w0 = jnp.asarray([0.3, -0.2, 0.1])
    results = {}
    for accum in (1, 3):
        c = load_config("tiny")
        c.optimizer.grad_accum_steps = accum
        tx = optax.sgd(0.1)
        step = jax.jit(train.make_train_step(Regression(), tx, lambda n: 0.1, c))
        state = train.TrainState(step=jnp.zeros((), jnp.int32), params={"w": w0}, opt_state=tx.init({"w": w0}),
                                 ema_params={"w": w0}, rng=jax.random.key_data(jax.random.key(0)))
        state, metrics = step(state, {}, batch)
        results[accum] = (np.asarray(state.params["w"]), float(metrics["loss"]), float(metrics["grad_norm"]))
    np.testing.assert_allclose(results[3][0], results[1][0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results[3][2], results[1][2], rtol=1e-5)
    np.testing.assert_allclose(results[3][1], results[1][1], rtol=1e-5)
    assert not np.allclose(results[1][0], w0)


def _toy_step(c, loss_fn, params):
    import jax.numpy as jnp

    from codi_jax import train

    class Toy:  # stands in for recipes.Recipe: only .loss is used by the step
        loss = staticmethod(loss_fn)

    tx, lr = train.make_optimizer(c)
    step = jax.jit(train.make_train_step(Toy(), tx, lr, c))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             ema_params=params, rng=jax.random.key_data(jax.random.key(0)),
                             target_params=params if train.uses_target_ema(c) else None)
    return step, state


def test_mu_has_its_own_learning_rate_and_no_weight_decay():
    """Flaw 6 and 5: Adam moves a scalar by about its learning rate per step, so mu (starting at 0) crept to 0.03 in
    400 steps at the network's 2e-4; with its own rate it moves at that rate. AdamW's decay skips mu, biases and the
    zero-initialised convs (it would pull them back to the zero the condition starts from)."""
    import jax.numpy as jnp

    moved = {}
    for mu_lr, mask in ((1e-2, "kernels"), (0.0, "all")):
        c = load_config("tiny")
        c.optimizer.learning_rate, c.optimizer.mu_learning_rate = 1e-4, mu_lr
        c.optimizer.weight_decay, c.optimizer.weight_decay_mask = 0.5, mask
        c.optimizer.warmup_steps, c.optimizer.grad_clip = 0, 0.0
        params = {"mu": jnp.zeros(()), "unet": {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}},
                  "control": {"controlnet_mid_block": {"kernel": jnp.ones((3, 3))},
                              "controlnet_cond_embedding": {"conv_out": {"kernel": jnp.ones((3, 3))},
                                                            "conv_in": {"kernel": jnp.ones((3, 3))}}}}
        # A constant pull on mu, nothing on the rest: only weight decay moves the other leaves.
        step, state = _toy_step(c, lambda p, e, f, b, r: (-p["mu"], {"loss": -p["mu"]}), params)
        for _ in range(20):
            state, metrics = step(state, {}, {})
        moved[mu_lr] = jax.device_get(state.params)
        np.testing.assert_allclose(float(metrics["mu"]), float(moved[mu_lr]["mu"]))  # mu's trajectory is logged
    # 19 steps at the full rate: a one-step warm-up still gives step 0 a learning rate of 0.
    np.testing.assert_allclose(moved[1e-2]["mu"], 19 * 1e-2, rtol=1e-3)
    np.testing.assert_allclose(moved[0.0]["mu"], 19 * 1e-4, rtol=1e-3)
    kernels = moved[1e-2]
    decayed = 1.0 - (1.0 - 1e-4 * 0.5) ** 19
    np.testing.assert_allclose(kernels["unet"]["conv"]["kernel"], 1.0 - decayed, rtol=1e-5)  # an ordinary kernel
    np.testing.assert_allclose(kernels["control"]["controlnet_cond_embedding"]["conv_in"]["kernel"], 1.0 - decayed,
                               rtol=1e-5)
    for leaf in (kernels["unet"]["conv"]["bias"], kernels["control"]["controlnet_mid_block"]["kernel"],
                 kernels["control"]["controlnet_cond_embedding"]["conv_out"]["kernel"]):
        np.testing.assert_array_equal(leaf, 1.0)  # not decayed
    assert np.all(moved[0.0]["control"]["controlnet_mid_block"]["kernel"] < 1.0)  # 'all' decays everything


def test_separate_fast_target_ema():
    """Flaw 5: with target_ema_decay > 0 the consistency target is its own fast EMA (CM / LCM), while the exported
    EMA keeps the slow decay."""
    import jax.numpy as jnp

    c = load_config("tiny")
    c.target_ema_decay, c.ema_decay, c.ema_warmup = 0.5, 0.99, False
    c.optimizer.warmup_steps = 0

    def loss(p, target, f, b, r):  # reports which tree the objective was given as its target
        value = jnp.sum((p["w"] - 1.0) ** 2)
        return value, {"loss": value, "target_w": target["w"][0]}

    step, state = _toy_step(c, loss, {"w": jnp.zeros(3)})
    targets, seen = [], []
    for _ in range(5):
        targets.append(float(state.target_params["w"][0]))
        state, metrics = step(state, {}, {})
        seen.append(float(metrics["target_w"]))
    np.testing.assert_allclose(seen, targets, rtol=1e-6)  # the loss got the fast target, not the slow EMA
    w = float(state.params["w"][0])
    assert abs(float(state.target_params["w"][0]) - w) < abs(float(state.ema_params["w"][0]) - w)
    c.target_ema_decay = 0.0
    _, state = _toy_step(c, loss, {"w": jnp.zeros(3)})
    assert state.target_params is None  # off: the exported EMA is the target, no extra copy of the weights
