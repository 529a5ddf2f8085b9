"""Schedules, parameterisations and samplers against diffusers' schedulers (SD1.5 config) on an analytic model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from codi_jax import diffusion as D

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1)
SHAPE = (2, 4, 4, 3)


@pytest.fixture(scope="module")
def schedule():
    return D.make_schedule()


@pytest.fixture(scope="module")
def z_T():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


# One analytic "network" written once for both frameworks: smooth, nonlinear in z and t, elementwise (so layout-free).
def _net(z, t, xp, tcast):
    tt = tcast(t).reshape(-1, 1, 1, 1) / 1000.0
    base = xp.tanh(0.9 * z + 0.3 * xp.sin(3.0 * tt)) * (0.5 + 0.4 * xp.cos(2.0 * tt)) + 0.05 * z
    return base + 0.3 * xp.sin(1.7 * z + tt), base  # (conditional, unconditional)


def jax_model(guided):
    def fn(z, t):
        c, u = _net(z, t, jnp, lambda t: t.astype(jnp.float32))
        return (c, u) if guided else c
    return fn


def torch_model(z, t, w):
    c, u = _net(z, t, torch, lambda t: t.to(torch.float32))
    return c if w == 1.0 else u + w * (c - u)


def diffusers_loop(method, z_T, num_steps, prediction_type, spacing, w):
    if method == "ddim":
        sched = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
                              timestep_spacing=spacing)
    elif method == "dpmpp_2m":
        sched = DPMSolverMultistepScheduler(**SD15, solver_order=2, algorithm_type="dpmsolver++",
                                            prediction_type=prediction_type, timestep_spacing=spacing)
    else:
        sched = EulerDiscreteScheduler(**SD15, prediction_type=prediction_type, timestep_spacing=spacing)
    sched.set_timesteps(num_steps)
    latents = torch.from_numpy(z_T) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        out = torch_model(inp, t.expand(latents.shape[0]), w)
        latents = sched.step(out, t, latents).prev_sample
    return latents.numpy()


def ours(method, z_T, num_steps, prediction_type, spacing, w, schedule):
    fn = jax.jit(lambda z: D.sample(jax_model(w != 1.0), z, method=method, num_steps=num_steps, schedule=schedule,
                                    prediction_type=prediction_type, timestep_spacing=spacing, guidance_scale=w))
    return np.asarray(fn(jnp.asarray(z_T)))


PARITY = (
    # every method x prediction type x guidance at the SD1.5 spacing ...
    [(m, n, pt, "leading", w) for (m, n), pt, w in itertools.product(
        [("ddim", 50), ("dpmpp_2m", 20), ("euler", 30)], ["epsilon", "v_prediction"], [1.0, 7.5])]
    # ... every spacing, and the short-schedule branches of DPM-Solver++ (lower_order_final below 15 steps).
    + [(m, n, "epsilon", sp, 1.0) for (m, n), sp in itertools.product(
        [("ddim", 10), ("dpmpp_2m", 20), ("euler", 10)], ["trailing", "linspace"])]
    + [("dpmpp_2m", 5, "v_prediction", "leading", 3.0), ("dpmpp_2m", 1, "epsilon", "trailing", 1.0),
       ("ddim", 4, "sample", "trailing", 1.0), ("euler", 7, "v_prediction", "linspace", 2.0)]
)


@pytest.mark.parametrize("method,num_steps,prediction_type,spacing,w", PARITY)
def test_parity_with_diffusers(method, num_steps, prediction_type, spacing, w, schedule, z_T):
    ref = diffusers_loop(method, z_T, num_steps, prediction_type, spacing, w)
    got = ours(method, z_T, num_steps, prediction_type, spacing, w, schedule)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # The result is not trivially small or equal to the input: the comparison has teeth.
    assert np.abs(got - z_T).max() > 0.1


def test_schedule_tables_match_diffusers():
    for kind, dkind in [("scaled_linear", "scaled_linear"), ("linear", "linear"), ("cosine", "squaredcos_cap_v2")]:
        kw = dict(beta_start=0.00085, beta_end=0.012) if kind != "linear" else dict(beta_start=1e-4, beta_end=0.02)
        ours_ = D.make_schedule(kind, **kw)
        ref = DDIMScheduler(beta_schedule=dkind, **kw).alphas_cumprod.numpy()
        np.testing.assert_allclose(np.asarray(ours_.alphas_cumprod), ref, rtol=2e-5, atol=1e-7)
    with pytest.raises(ValueError, match="schedule kind"):
        D.make_schedule("quadratic")


def test_timestep_grids_match_diffusers():
    for n, sp in itertools.product([1, 4, 7, 50], ["leading", "trailing", "linspace"]):
        d = DDIMScheduler(**SD15, timestep_spacing=sp)
        d.set_timesteps(n)
        np.testing.assert_array_equal(D.ddim_timesteps(n, 1000, sp), d.timesteps.numpy())
        d = DPMSolverMultistepScheduler(**SD15, timestep_spacing=sp)
        d.set_timesteps(n)
        np.testing.assert_array_equal(D.dpm_timesteps(n, 1000, sp), d.timesteps.numpy())
        d = EulerDiscreteScheduler(**SD15, timestep_spacing=sp)
        d.set_timesteps(n)
        np.testing.assert_array_equal(D.euler_timesteps(n, 1000, sp), d.timesteps.numpy())


def test_alpha_sigma_discrete_and_continuous(schedule):
    n = jnp.arange(1000)
    a, s = schedule.alpha_sigma(n)
    np.testing.assert_allclose(np.asarray(a**2 + s**2), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(schedule.log_snr(n)), np.log(np.asarray(a**2 / s**2)), rtol=1e-4, atol=1e-4)
    # t = n / T lands on the table; in between, log-SNR is linear and alpha^2 + sigma^2 stays 1.
    at, st = schedule.alpha_sigma_t(jnp.asarray([0.0, 0.25, 0.5]))
    np.testing.assert_allclose(np.asarray(at), np.asarray(schedule.alpha(jnp.asarray([0, 250, 500]))), rtol=1e-5)
    lam = schedule.log_snr_t(0.2505)
    np.testing.assert_allclose(float(lam), 0.5 * float(schedule.log_snr(250) + schedule.log_snr(251)), rtol=1e-5)
    at, st = schedule.alpha_sigma_t(0.2505)
    np.testing.assert_allclose(float(at**2 + st**2), 1.0, atol=1e-6)
    assert float(schedule.alpha(251)) < float(at) < float(schedule.alpha(250))
    # log-SNR decreases monotonically (more noise at larger n).
    assert np.all(np.diff(np.asarray(schedule.log_snr(n))) < 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eq8_round_trip(prediction_type, schedule):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x, eps = jax.random.normal(k1, SHAPE), jax.random.normal(k2, SHAPE)
    n = jnp.asarray([10, 900])
    a, s = schedule.alpha_sigma(n)
    z = a[:, None, None, None] * x + s[:, None, None, None] * eps
    out = D.from_x_eps(x, eps, a, s, prediction_type)
    x_hat, eps_hat = D.to_x_eps(out, z, a, s, prediction_type)
    np.testing.assert_allclose(np.asarray(x_hat), np.asarray(x), atol=2e-4)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), atol=2e-4)
    if prediction_type == "v_prediction":  # eq. 8 literally: x = a z - s v, eps = a v + s z
        v = a[:, None, None, None] * eps - s[:, None, None, None] * x
        np.testing.assert_allclose(np.asarray(out), np.asarray(v), atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        D.to_x_eps(out, z, a, s, "velocity")


def test_boundary(schedule):
    c_skip, c_out = D.boundary_coefficients(jnp.asarray([0, 1, 500]))
    np.testing.assert_allclose(np.asarray(c_skip), [1.0, 0.25 / 100.25, 0.25 / (5000.0**2 + 0.25)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c_out), [0.0, 10 / np.sqrt(100.25), 5000 / np.sqrt(5000.0**2 + 0.25)],
                               rtol=1e-6)
    z, x_hat = jax.random.normal(jax.random.PRNGKey(2), (2,) + SHAPE)
    a, s = schedule.alpha_sigma(jnp.asarray([0, 0]))
    f, eps_f = D.boundary(x_hat, z, jnp.asarray([0, 0]), a, s)
    np.testing.assert_array_equal(np.asarray(f), np.asarray(z))  # f(z, 0) = z whatever the network says
    n = jnp.asarray([300, 700])
    a, s = schedule.alpha_sigma(n)
    f, eps_f = D.boundary(x_hat, z, n, a, s)
    np.testing.assert_allclose(np.asarray(a[:, None, None, None] * f + s[:, None, None, None] * eps_f), np.asarray(z),
                               atol=1e-5)


def test_codi_timesteps():
    np.testing.assert_array_equal(D.codi_timesteps(4, 50, 1000), [980, 740, 480, 240])
    np.testing.assert_array_equal(D.codi_timesteps(1, 50, 1000), [980])
    np.testing.assert_array_equal(D.distill_grid(50, 1000)[:3], [0, 20, 40])
    assert len(D.codi_timesteps(11, 50, 1000)) == 11  # LCM's stride rule gave 10
    with pytest.raises(ValueError, match="distill_steps - 1"):
        D.codi_timesteps(25, 25, 1000)  # the grid has only 24 entries above n = 0


@pytest.mark.parametrize("distill_steps", [25, 50])
def test_every_codi_step_is_a_model_evaluation_whose_output_is_used(distill_steps, schedule, z_T):
    """Flaw 2: LCM's stride rule ended the 8-step grid on n = 0 (N = 25: 7 entries; N = 50: the last at 0), where
    c_out = 0 discards the network's output. Now each of 1, 2, 4, 8 steps is one evaluation that changes the result."""
    base = jax_model(False)
    for steps in (1, 2, 4, 8):
        ts = D.codi_timesteps(steps, distill_steps, 1000)
        grid = D.distill_grid(distill_steps, 1000)
        assert len(ts) == steps and len(set(ts.tolist())) == steps and np.all(np.isin(ts, grid)) and np.all(ts > 0)
        _, c_out = D.boundary_coefficients(jnp.asarray(ts))
        assert float(jnp.min(c_out)) > 0.99
        calls = []

        def counting(z, t):
            jax.debug.callback(lambda: calls.append(1))  # runs once per evaluation, not per trace
            return base(z, t)

        run = jax.jit(lambda z, at: D.sample(
            lambda z_, t_: base(z_, t_) + 0.1 * (t_[:, None, None, None] == at), z, method="codi", num_steps=steps,
            schedule=schedule, prediction_type="epsilon", distill_steps=distill_steps, unroll=True))
        jax.block_until_ready(D.sample(counting, jnp.asarray(z_T), method="codi", num_steps=steps, schedule=schedule,
                                       prediction_type="epsilon", distill_steps=distill_steps))
        jax.effects_barrier()
        assert len(calls) == steps
        clean = np.asarray(run(jnp.asarray(z_T), -1))
        for t in ts:  # a change of the model's output at any one step changes the sample
            assert np.abs(np.asarray(run(jnp.asarray(z_T), int(t))) - clean).max() > 1e-4, (steps, int(t))


def codi_reference(model, z, schedule, prediction_type, timesteps, noises=None):
    """A plain numpy loop of the CoDi sampler: f = c_skip z + c_out x_hat; z <- a' f + s' eps_f (or fresh noise)."""
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    z = np.asarray(z, np.float64)
    for i, t in enumerate(timesteps):
        a, s = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
        out = np.asarray(model(jnp.asarray(z, jnp.float32), jnp.full((z.shape[0],), t, jnp.int32)), np.float64)
        x_hat = {"epsilon": (z - s * out) / a, "v_prediction": a * z - s * out, "sample": out}[prediction_type]
        c = 10.0 * t
        f = 0.25 / (c * c + 0.25) * z + c / np.sqrt(c * c + 0.25) * x_hat
        if i == len(timesteps) - 1:
            return f
        eps = (z - a * f) / s if noises is None else noises[i]
        tn = timesteps[i + 1]
        z = np.sqrt(abar[tn]) * f + np.sqrt(1 - abar[tn]) * eps


@pytest.mark.parametrize("prediction_type,steps,w", [("v_prediction", 4, 1.0), ("epsilon", 2, 4.0), ("sample", 1, 1.0)])
def test_codi_sampler_matches_reference(prediction_type, steps, w, schedule, z_T):
    model = jax_model(w != 1.0)
    ref_model = lambda z, t: torch_free_guided(model, z, t, w)
    got = jax.jit(lambda z: D.sample(model, z, method="codi", num_steps=steps, schedule=schedule,
                                     prediction_type=prediction_type, guidance_scale=w))(jnp.asarray(z_T))
    ref = codi_reference(ref_model, z_T, schedule, prediction_type, D.codi_timesteps(steps, 50, 1000))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)


def torch_free_guided(model, z, t, w):
    out = model(z, t)
    return out if w == 1.0 else out[1] + w * (out[0] - out[1])


def test_codi_sampler_stochastic(schedule, z_T):
    model = jax_model(False)
    rng = jax.random.PRNGKey(3)
    run = jax.jit(lambda z, rng: D.sample(model, z, method="codi", num_steps=3, schedule=schedule,
                                          prediction_type="epsilon", rng=rng, stochastic=True))
    got = run(jnp.asarray(z_T), rng)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng, i), SHAPE)) for i in range(2)]
    ref = codi_reference(model, z_T, schedule, "epsilon", D.codi_timesteps(3, 50, 1000), noises)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)
    det = D.sample(model, jnp.asarray(z_T), method="codi", num_steps=3, schedule=schedule, prediction_type="epsilon")
    assert np.abs(np.asarray(got) - np.asarray(det)).max() > 1e-3
    with pytest.raises(ValueError, match="rng"):
        D.sample(model, jnp.asarray(z_T), method="codi", num_steps=3, schedule=schedule, prediction_type="epsilon",
                 stochastic=True)


def test_sampler_traces_model_once_and_takes_traced_schedule(schedule, z_T):
    calls = []

    def model(z, t):
        calls.append(t.dtype)
        return jax_model(False)(z, t)

    run = jax.jit(lambda z, sched: D.sample(model, z, method="dpmpp_2m", num_steps=25, schedule=sched,
                                            prediction_type="epsilon"))
    out = run(jnp.asarray(z_T), schedule)
    assert len(calls) == 1 and calls[0] == jnp.int32  # one trace of the network for 25 steps: a lax loop
    np.testing.assert_allclose(np.asarray(out), diffusers_loop("dpmpp_2m", z_T, 25, "epsilon", "leading", 1.0),
                               atol=1e-4)


def test_sampler_errors(schedule, z_T):
    z = jnp.asarray(z_T)
    kw = dict(schedule=schedule, prediction_type="epsilon", num_steps=2)
    with pytest.raises(ValueError, match="method"):
        D.sample(jax_model(False), z, method="heun", **kw)
    with pytest.raises(ValueError, match="timestep_spacing"):
        D.sample(jax_model(False), z, method="ddim", timestep_spacing="uniform", **kw)
    with pytest.raises(ValueError, match="conditional, unconditional"):
        D.sample(jax_model(False), z, method="ddim", guidance_scale=3.0, **kw)
    with pytest.raises(ValueError, match="guidance_scale == 1"):
        D.sample(jax_model(True), z, method="ddim", **kw)
    with pytest.raises(ValueError, match="unknown sampler options"):
        D.sample(jax_model(False), z, method="ddim", eta=0.5, **kw)
    with pytest.raises(ValueError, match="only apply to method 'codi'"):
        D.sample(jax_model(False), z, method="ddim", distill_steps=20, **kw)
    with pytest.raises(ValueError, match="num_steps"):
        D.sample(jax_model(False), z, method="codi", schedule=schedule, prediction_type="epsilon", num_steps=60)


@pytest.mark.parametrize("method", ["codi", "dpmpp_2m"])
def test_unroll_is_only_a_compilation_choice(method, schedule, z_T):
    kw = dict(method=method, num_steps=3, schedule=schedule, prediction_type="v_prediction")
    rolled = jax.jit(lambda z: D.sample(jax_model(False), z, **kw))(jnp.asarray(z_T))
    unrolled = jax.jit(lambda z: D.sample(jax_model(False), z, unroll=True, **kw))(jnp.asarray(z_T))
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(rolled), atol=1e-6)
