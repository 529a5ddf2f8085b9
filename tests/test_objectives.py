"""The CoDi objective and its baselines on tiny analytic networks: equations, stop-gradients, switches, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import diffusion as D
from codi_jax.diffusion import objectives as O
from codi_jax.diffusion import parameterization as pz

B, H, W, C, L, E = 4, 4, 4, 3, 5, 6


@pytest.fixture(scope="module")
def schedule():
    return D.make_schedule()


@pytest.fixture(scope="module")
def batch():
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "latents": jax.random.normal(ks[0], (B, H, W, C)),
        "text": jax.random.normal(ks[1], (B, L, E)),
        "text_null": jax.random.normal(ks[2], (1, L, E)),
        "cond": jax.random.normal(ks[3], (B, H, W, 1)),
    }


def init_params(seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    return {"w": 0.5 * jax.random.normal(ks[0], (C, C)), "w2": 0.5 * jax.random.normal(ks[1], (C, C)),
            "freq": jax.random.normal(ks[2], (C,)), "wt": 0.3 * jax.random.normal(ks[3], (E, C)),
            "wc": jax.random.normal(ks[4], (1, C))}


def toy_apply(p, z, t, batch):
    """A tiny conditional 'UNet': depends on z, t, text and the condition image."""
    temb = jnp.sin(t.astype(jnp.float32)[:, None] / 1000.0 * 6.0 * p["freq"])
    txt = batch["text"].mean(axis=1) @ p["wt"]
    h = jnp.tanh(z @ p["w"] + (temb + txt)[:, None, None, :] + batch["cond"] @ p["wc"])
    return 0.5 * h @ p["w2"]


TEACHER_PARAMS = init_params(7)
NETS = O.Networks(apply=toy_apply, teacher=lambda z, t, b: toy_apply(TEACHER_PARAMS, z, t, b),
                  decode=lambda lat: jnp.tanh(jnp.repeat(jnp.repeat(lat, 2, axis=1), 2, axis=2)))


def cfg_with(**kw):
    cfg = O.default_config()
    cfg.update(kw)
    return cfg


def test_config_docs_and_validation():
    cfg = O.default_config()
    assert set(cfg.keys()) == set(O.FIELD_DOCS) and all(len(d) > 10 for d in O.FIELD_DOCS.values())
    O.validate(cfg)
    for bad, match in [(dict(pf_ode="euler"), "pf_ode"), (dict(distance="l1"), "distance"),
                       (dict(prediction_type="v"), "prediction_type"), (dict(text_drop_prob=1.5), "text_drop_prob"),
                       (dict(distill_steps=1), "distill_steps"), (dict(guidance_min=9.0), "guidance_min"),
                       (dict(timestep_sampling="per_batch"), "timestep_sampling"), (dict(huber_c=0.0), "huber_c"),
                       (dict(signal_loss="lpips"), "signal_loss"), (dict(w_signal=-1.0), "w_signal")]:
        with pytest.raises(ValueError, match=match):
            O.validate(cfg_with(**bad))
    small = O.default_config()
    del small["pf_ode"]
    with pytest.raises(ValueError, match="lacks fields"):
        O.validate(small)
    assert set(O.OBJECTIVES) == {"pretrain", "finetune", "codi", "cm", "gd"}  # pe_codi: the codi objective


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_oracle_is_zero_and_min_snr(prediction_type, schedule, batch):
    cfg = cfg_with(prediction_type=prediction_type)

    def oracle(p, z, t, b):  # knows x, so it can produce the exact target of any type
        a, s = schedule.alpha_sigma(t)
        x = b["latents"]
        return p["scale"] * pz.from_x_eps(x, (z - pz.bcast(a, z) * x) / pz.bcast(s, z), a, s, prediction_type)

    nets = O.Networks(apply=oracle)
    loss, m = O.pretrain({"scale": 1.0}, batch, jax.random.PRNGKey(1), nets=nets, schedule=schedule, cfg=cfg)
    assert float(loss) < 1e-6 and 0 <= float(m["t_mean"]) < 1000
    loss, _ = O.finetune({"scale": 0.9}, batch, jax.random.PRNGKey(1), nets=nets, schedule=schedule, cfg=cfg)
    assert float(loss) > 1e-4
    # min-SNR only reweights.
    nets = O.Networks(apply=toy_apply)
    p = init_params(1)
    l0, _ = O.pretrain(p, batch, jax.random.PRNGKey(2), nets=nets, schedule=schedule, cfg=cfg)
    l1, m1 = O.pretrain(p, batch, jax.random.PRNGKey(2), nets=nets, schedule=schedule,
                        cfg=cfg_with(prediction_type=prediction_type, loss_weighting="min_snr", min_snr_gamma=0.05))
    assert np.isfinite(float(l1)) and abs(float(l1) - float(l0)) > 1e-6
    np.testing.assert_allclose(float(m1["loss_diffusion"]), float(l0), rtol=1e-6)


def test_caption_dropout(batch):
    full = O.drop_text(batch, jax.random.PRNGKey(0), 1.0)
    np.testing.assert_array_equal(np.asarray(full["text"]),
                                  np.broadcast_to(np.asarray(batch["text_null"]), batch["text"].shape))
    assert full["cond"] is batch["cond"]  # everything else passes through untouched
    part = O.drop_text({**batch, "text": jnp.tile(batch["text"], (64, 1, 1))}, jax.random.PRNGKey(0), 0.5)
    dropped = np.all(np.asarray(part["text"]) == np.asarray(batch["text_null"]), axis=(1, 2))
    assert 0 < dropped.sum() < dropped.size


def test_timestep_sampling_batch_vs_sample(schedule, batch):
    big = {k: (jnp.tile(v, (8,) + (1,) * (v.ndim - 1)) if k != "text_null" else v) for k, v in batch.items()}
    kw = dict(nets=NETS, schedule=schedule, ema_params=init_params(2))
    one = O.consistency_terms(init_params(1), big, jax.random.PRNGKey(3), cfg=cfg_with(timestep_sampling="batch"), **kw)
    many = O.consistency_terms(init_params(1), big, jax.random.PRNGKey(3), cfg=cfg_with(timestep_sampling="sample"),
                               **kw)
    assert len(np.unique(np.asarray(one.t))) == 1
    assert len(np.unique(np.asarray(many.t))) > 4
    for terms in (one, many):  # t = k T/N and s one grid step below, on the sampler's grid
        t, s = np.asarray(terms.t), np.asarray(terms.s)
        np.testing.assert_array_equal(t - s, 20)
        assert np.all(t % 20 == 0) and np.all((t >= 20) & (t <= 980))


@pytest.mark.parametrize("pf_ode", ["online", "teacher", "online_ddim"])
def test_stop_gradients(pf_ode, schedule, batch):
    cfg = cfg_with(pf_ode=pf_ode, prediction_type="v_prediction")
    kw = dict(nets=NETS, schedule=schedule, cfg=cfg)
    p, ema, rng = init_params(1), init_params(2), jax.random.PRNGKey(4)
    g_ema = jax.grad(lambda e: O.codi(p, batch, rng, ema_params=e, **kw)[0])(ema)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_ema))
    g_zs = jax.grad(lambda q: jnp.sum(O.consistency_terms(q, batch, rng, ema_params=ema, **kw).z_s ** 2))(p)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_zs))
    g_tgt = jax.grad(lambda q: jnp.sum(O.consistency_terms(q, batch, rng, ema_params=ema, **kw).eps_target))(p)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_tgt))
    g = jax.grad(lambda q: O.codi(q, batch, rng, ema_params=ema, **kw)[0])(p)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) > 1e-4  # the online model does learn


def test_eq14_same_eps(schedule, batch):
    cfg = cfg_with(pf_ode="online")
    terms = O.consistency_terms(init_params(1), batch, jax.random.PRNGKey(5), nets=NETS, schedule=schedule, cfg=cfg,
                                ema_params=init_params(2))
    x = batch["latents"]
    a_t, s_t = schedule.alpha_sigma(terms.t)
    a_s, s_s = schedule.alpha_sigma(terms.s)
    eps_from_zt = (terms.z_t - pz.bcast(a_t, x) * x) / pz.bcast(s_t, x)
    eps_from_zs = (terms.z_s - pz.bcast(a_s, x) * terms.f_theta) / pz.bcast(s_s, x)
    np.testing.assert_allclose(np.asarray(eps_from_zt), np.asarray(terms.eps), atol=1e-4)
    np.testing.assert_allclose(np.asarray(eps_from_zs), np.asarray(terms.eps), atol=1e-4)


def exact_x_apply(schedule, cfg):
    """A network whose clean estimate x_hat is the data point x at every (z, t), in the output type of cfg."""
    def apply(p, z, t, batch):
        a, s = schedule.alpha_sigma(t)
        x_hat = batch["latents"] * p["scale"]
        return pz.from_x_eps(x_hat, (z - pz.bcast(a, z) * x_hat) / pz.bcast(s, z), a, s, cfg.prediction_type)
    return apply


def _codi_metrics_at_k(k, cfg, nets, params, ema, schedule, batch):
    """The codi metrics with every example at grid index k (the rng is searched until it draws k)."""
    for seed in range(400):
        rng = jax.random.PRNGKey(seed)
        terms = O.consistency_terms(params, batch, rng, nets=nets, schedule=schedule, cfg=cfg, ema_params=ema)
        if int(terms.t[0]) == k * schedule.num_train_timesteps // cfg.distill_steps:
            return O.codi(params, batch, rng, nets=nets, schedule=schedule, cfg=cfg, ema_params=ema)[1]
    raise AssertionError(f"no seed draws k = {k}")


@pytest.mark.parametrize("space,pf_ode,prediction_type", [("eps", "online", "v_prediction"), ("x", "online", "epsilon"),
                                                          ("eps", "teacher", "sample"), ("x", "online_ddim", "epsilon"),
                                                          ("eps", "online", "epsilon")])
def test_exact_model_has_zero_loss_at_every_k(space, pf_ode, prediction_type, schedule, batch):
    """Flaw 1: with f(z, 0) = z as the target at s = 0, an exact model had eps-space loss ~1.1 at k = 1 (eps_f there is
    (1 - a_0) z / s_0, not the noise) and ~1e-14 elsewhere. Now it is ~0 at every k, k = 1 included."""
    cfg = cfg_with(consistency_space=space, pf_ode=pf_ode, prediction_type=prediction_type, distill_steps=5)
    apply = exact_x_apply(schedule, cfg)
    nets = O.Networks(apply=apply, teacher=lambda z, t, b: apply({"scale": 1.0}, z, t, b))
    exact = {"scale": jnp.float32(1.0)}
    for k in range(1, cfg.distill_steps):
        m = _codi_metrics_at_k(k, cfg, nets, exact, exact, schedule, batch)
        assert float(m["loss_consistency"]) < 1e-8, (k, float(m["loss_consistency"]))
        assert float(m["loss_signal"]) < 1e-8
        # A perturbed online model against the exact target: the loss is not zero by construction.
        m = _codi_metrics_at_k(k, cfg, nets, {"scale": jnp.float32(1.05)}, exact, schedule, batch)
        assert float(m["loss_consistency"]) > 1e-6, k


def test_target_at_s0_is_the_target_networks_own_estimate(schedule, batch):
    cfg = cfg_with(distill_steps=5, prediction_type="v_prediction", timestep_sampling="batch")  # all at s = 0
    p, ema = init_params(1), init_params(2)
    for seed in range(200):
        terms = O.consistency_terms(p, batch, jax.random.PRNGKey(seed), nets=NETS, schedule=schedule, cfg=cfg,
                                    ema_params=ema)
        if int(terms.s[0]) == 0:
            break
    assert int(terms.s[0]) == 0
    zero = jnp.zeros_like(terms.s)
    a0, s0 = schedule.alpha_sigma(zero)
    x_hat, eps_hat = pz.to_x_eps(toy_apply(ema, terms.z_s, zero, batch), terms.z_s, a0, s0, "v_prediction")
    np.testing.assert_allclose(np.asarray(terms.f_target), np.asarray(x_hat), atol=1e-6)
    np.testing.assert_allclose(np.asarray(terms.eps_target), np.asarray(eps_hat), atol=1e-5)
    assert float(jnp.abs(terms.f_target - terms.z_s).max()) > 1e-2  # not the boundary's f(z, 0) = z


SWITCHES = list(itertools.product(["online", "teacher", "online_ddim"], ["eps", "x"], ["l2", "pseudo_huber"],
                                  ["latent_l2", "pixel_l2", "none"]))


@pytest.mark.parametrize("pf_ode,space,dist,signal", SWITCHES)
def test_every_switch_runs(pf_ode, space, dist, signal, schedule, batch):
    cfg = cfg_with(pf_ode=pf_ode, consistency_space=space, distance=dist, signal_loss=signal,
                   prediction_type="v_prediction", teacher_prediction_type="epsilon")
    loss, m = O.codi(init_params(1), batch, jax.random.PRNGKey(6), nets=NETS, schedule=schedule, cfg=cfg,
                     ema_params=init_params(2))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert set(m) >= {"loss", "loss_consistency", "loss_signal", "t_mean"}
    np.testing.assert_allclose(float(loss), float(m["loss_consistency"] + m["loss_signal"]), rtol=1e-5)
    assert (float(m["loss_signal"]) == 0.0) == (signal == "none")


def test_codi_jits_with_value_and_grad(schedule, batch):
    cfg = cfg_with(prediction_type="v_prediction", cfg_aware=True)
    step = jax.jit(jax.value_and_grad(lambda p, e, b, r: O.OBJECTIVES["codi"](p, b, r, nets=NETS, schedule=schedule,
                                                                               cfg=cfg, ema_params=e), has_aux=True))
    (loss, m), g = step(init_params(1), init_params(2), batch, jax.random.PRNGKey(8))
    assert np.isfinite(float(loss)) and cfg.guidance_min <= float(m["guidance_scale"]) <= cfg.guidance_max
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))


def test_cfg_aware_changes_the_target(schedule, batch):
    p, ema, rng = init_params(1), init_params(2), jax.random.PRNGKey(9)
    terms = {}
    for aware in (False, True):
        for null in ("own", "same_as_text"):
            b = batch if null == "own" else {**batch, "text_null": batch["text"]}
            terms[aware, null] = O.consistency_terms(p, b, rng, nets=NETS, schedule=schedule,
                                                     cfg=cfg_with(cfg_aware=aware), ema_params=ema)
    diff = lambda a, b: float(jnp.abs(a.f_target - b.f_target).max())
    assert diff(terms[False, "own"], terms[True, "own"]) > 1e-3  # guidance moves the target
    assert diff(terms[False, "same_as_text"], terms[True, "same_as_text"]) < 1e-5  # ... only through cond - uncond
    np.testing.assert_array_equal(np.asarray(terms[False, "own"].t), np.asarray(terms[True, "own"].t))
    # With the teacher PF-ODE the guided teacher moves z_s too.
    zs = [O.consistency_terms(p, batch, rng, nets=NETS, schedule=schedule, ema_params=ema,
                              cfg=cfg_with(cfg_aware=a, pf_ode="teacher")).z_s for a in (False, True)]
    assert float(jnp.abs(zs[0] - zs[1]).max()) > 1e-3


@pytest.mark.parametrize("pf_ode", ["online", "teacher"])
def test_cfg_aware_guidance_does_not_compound_over_ema_generations(pf_ode, schedule, batch):
    """Flaw 3: a model whose c - u = d is fixed. Guiding only the target taught the online (unguided) conditional
    output u + w d, so each EMA generation widened c - u by w. Both calls guided, d is a fixed point (with the
    online PF-ODE, and with the teacher's, here the same model frozen at the start)."""
    ones = {**batch, "text": jnp.ones_like(batch["text"]), "text_null": jnp.zeros_like(batch["text_null"])}
    cfg = cfg_with(cfg_aware=True, guidance_min=3.0, guidance_max=3.0, prediction_type="sample",
                   consistency_space="x", signal_loss="none", distill_steps=10, pf_ode=pf_ode)

    def apply(p, z, t, b):  # u = base, c = base + d (the text is all ones, the null text all zeros)
        flag = b["text"].mean(axis=(1, 2))
        return jnp.broadcast_to(p["base"] + pz.bcast(flag, z) * p["d"], z.shape)

    params = {"base": jnp.full((C,), 0.3), "d": jnp.full((C,), 0.2)}
    nets = O.Networks(apply=apply, teacher=lambda z, t, b, p0=params: apply(p0, z, t, b))
    loss_fn = lambda p, e, r: O.codi(p, ones, r, nets=nets, schedule=schedule, cfg=cfg, ema_params=e)[0]  # noqa
    # Step 0.02: GD on the guided output base + 3 d is stable below 2 / (2 (1 + 9)) = 0.1.
    step = jax.jit(lambda p, e, r: jax.tree.map(lambda x, g: x - 0.02 * g, p, jax.grad(loss_fn)(p, e, r)))
    for generation in range(3):
        ema = params
        for i in range(30):
            params = step(params, ema, jax.random.PRNGKey(100 * generation + i))
    np.testing.assert_allclose(np.asarray(params["d"]), 0.2, rtol=0.02)
    np.testing.assert_allclose(np.asarray(params["base"]), 0.3, rtol=0.02)


def test_pf_ode_auto_is_the_teacher_in_x_space_and_online_in_eps_space(schedule, batch):
    """The default PF-ODE follows the consistency space (README, Table 2): the teacher's DDIM step in x space, eq. 14's
    online step in eps space. Told apart by a teacher whose x estimate is far from the online model's."""
    assert O.default_config().pf_ode == "auto"
    assert O.resolved_pf_ode(cfg_with(consistency_space="x")) == "teacher"
    assert O.resolved_pf_ode(cfg_with(consistency_space="eps")) == "online"
    assert O.resolved_pf_ode(cfg_with(consistency_space="x", pf_ode="online")) == "online"
    teacher = lambda z, t, b: jnp.full_like(z, 5.0)  # noqa: E731  (x_hat = 5 everywhere, prediction_type sample)
    nets = O.Networks(apply=NETS.apply, teacher=teacher)
    kw = dict(nets=nets, schedule=schedule, ema_params=init_params(2))
    for space in ("x", "eps"):
        z_s = {p: O.consistency_terms(init_params(1), batch, jax.random.PRNGKey(4), cfg=cfg_with(
            consistency_space=space, pf_ode=p, prediction_type="sample", teacher_prediction_type="sample"), **kw).z_s
            for p in ("auto", "online", "teacher")}
        same = "teacher" if space == "x" else "online"
        np.testing.assert_array_equal(np.asarray(z_s["auto"]), np.asarray(z_s[same]))
        assert not np.allclose(np.asarray(z_s["online"]), np.asarray(z_s["teacher"]), atol=1e-3)
    with pytest.raises(ValueError, match="nets.teacher"):
        O.consistency_terms(init_params(1), batch, jax.random.PRNGKey(4), cfg=cfg_with(consistency_space="x"),
                            nets=O.Networks(apply=NETS.apply), schedule=schedule, ema_params=init_params(2))


def test_timestep_sampling_auto_per_objective(schedule, batch):
    """Flaw 4: CM-II and GD-II draw t per example, as their papers; CoDi one t per batch (its Fig. 7 change) in eps
    space, the paper's form, and one per example in x space, where it measured better (README)."""
    big = {k: (jnp.tile(v, (8,) + (1,) * (v.ndim - 1)) if k != "text_null" else v) for k, v in batch.items()}
    assert O.default_config().timestep_sampling == "auto"
    distinct = {}
    for space in ("x", "eps"):
        kw = dict(nets=NETS, schedule=schedule, ema_params=init_params(2), cfg=cfg_with(consistency_space=space))
        codi = O.consistency_terms(init_params(1), big, jax.random.PRNGKey(3), **kw)
        cm = O.consistency_terms(init_params(1), big, jax.random.PRNGKey(3), default_sampling="sample", **kw)
        distinct[space] = (len(np.unique(np.asarray(codi.t))), len(np.unique(np.asarray(cm.t))))
    assert distinct["eps"][0] == 1 and distinct["x"][0] > 4
    assert distinct["eps"][1] > 4 and distinct["x"][1] > 4
    forced = cfg_with(consistency_space="x", timestep_sampling="batch")
    one = O.consistency_terms(init_params(1), big, jax.random.PRNGKey(3), nets=NETS, schedule=schedule,
                              ema_params=init_params(2), cfg=forced)
    assert len(np.unique(np.asarray(one.t))) == 1
    _, m = O.gd(init_params(1), big, jax.random.PRNGKey(12), nets=NETS, schedule=schedule,
                cfg=cfg_with(gd_student_steps=4))
    assert float(m["t_mean"]) not in (999.0, 749.0, 499.0, 249.0)  # a mix of the student's steps


def test_gd_substeps_reach_the_same_grid_and_stay_exact(schedule, batch):
    """Flaw 4: the first GD-II round can distil many teacher DDIM steps per student step (nearly the full ODE)."""
    t, mid, prev = O.gd_timesteps(4, 1000)
    np.testing.assert_array_equal(O.gd_substep_timesteps(4, 2, 1000), np.stack([t, mid, prev], 1))
    path = O.gd_substep_timesteps(4, 10, 1000)
    assert path.shape == (4, 11) and np.all(np.diff(path, axis=1) < 0)
    np.testing.assert_array_equal(path[:, 0], t)
    np.testing.assert_array_equal(path[:, -1], prev)
    teacher = lambda z, t_, b: b["latents"]  # knows x: any number of DDIM steps stays on the forward process
    student = lambda p, z, t_, b: b["latents"] * p["scale"]
    nets = O.Networks(apply=student, teacher=teacher)
    cfg = cfg_with(prediction_type="sample", teacher_prediction_type="sample", gd_teacher_substeps=10)
    loss, _ = O.gd({"scale": 1.0}, batch, jax.random.PRNGKey(11), nets=nets, schedule=schedule, cfg=cfg)
    assert float(loss) < 1e-6
    # More teacher substeps reach a different z_prev with a real (curved) teacher: the target changes.
    kw = dict(nets=NETS, schedule=schedule)
    l2, _ = O.gd(init_params(1), batch, jax.random.PRNGKey(12), cfg=cfg_with(gd_teacher_substeps=2), **kw)
    l8, _ = O.gd(init_params(1), batch, jax.random.PRNGKey(12), cfg=cfg_with(gd_teacher_substeps=8), **kw)
    assert abs(float(l2) - float(l8)) > 1e-6


def test_cm_runs_with_teacher_and_uses_it(schedule, batch):
    cfg = cfg_with(prediction_type="epsilon")
    kw = dict(schedule=schedule, cfg=cfg, ema_params=init_params(2))
    loss, m = O.cm(init_params(1), batch, jax.random.PRNGKey(10), nets=NETS, **kw)
    assert np.isfinite(float(loss)) and float(m["loss_signal"]) == 0.0 and float(loss) > 0
    other = O.Networks(apply=toy_apply, teacher=lambda z, t, b: toy_apply(init_params(8), z, t, b))
    loss2, _ = O.cm(init_params(1), batch, jax.random.PRNGKey(10), nets=other, **kw)
    assert abs(float(loss2) - float(loss)) > 1e-6
    with pytest.raises(ValueError, match="nets.teacher"):
        O.cm(init_params(1), batch, jax.random.PRNGKey(10), nets=O.Networks(apply=toy_apply), **kw)


def test_gd_timesteps_and_oracle(schedule, batch):
    t, mid, prev = O.gd_timesteps(4, 1000)
    np.testing.assert_array_equal(t, [999, 749, 499, 249])
    np.testing.assert_array_equal(mid, [874, 624, 374, 124])
    np.testing.assert_array_equal(prev, [749, 499, 249, -1])
    # Student prev matches what the DDIM sampler does at num_steps=4, 'trailing'; the teacher's at 8 steps.
    np.testing.assert_array_equal(D.ddim_timesteps(8, 1000, "trailing"), np.stack([t, mid], 1).reshape(-1))
    # A teacher that knows x makes two DDIM steps that stay on the forward process: the target is exactly x,
    # so a student that also predicts x has zero loss, whatever the prediction types.
    cfg = cfg_with(prediction_type="v_prediction", teacher_prediction_type="sample", timestep_sampling="sample")
    teacher = lambda z, t, b: b["latents"]

    def student(p, z, t, b):
        a, s = schedule.alpha_sigma(t)
        x = b["latents"] * p["scale"]
        return pz.from_x_eps(x, (z - pz.bcast(a, z) * x) / pz.bcast(s, z), a, s, "v_prediction")

    nets = O.Networks(apply=student, teacher=teacher)
    loss, m = O.gd({"scale": 1.0}, batch, jax.random.PRNGKey(11), nets=nets, schedule=schedule, cfg=cfg)
    assert float(loss) < 1e-6
    loss, _ = O.gd({"scale": 1.1}, batch, jax.random.PRNGKey(11), nets=nets, schedule=schedule, cfg=cfg)
    assert float(loss) > 1e-4


def test_gd_runs_with_teacher_and_cfg(schedule, batch):
    for aware in (False, True):
        cfg = cfg_with(prediction_type="epsilon", cfg_aware=aware, gd_student_steps=2, timestep_sampling="batch")
        loss, m = O.gd(init_params(1), batch, jax.random.PRNGKey(12), nets=NETS, schedule=schedule, cfg=cfg)
        assert np.isfinite(float(loss)) and float(loss) > 0
        assert float(m["t_mean"]) in (999.0, 499.0)  # one student step for the whole batch
    with pytest.raises(ValueError, match="nets.teacher"):
        O.gd(init_params(1), batch, jax.random.PRNGKey(12), nets=O.Networks(apply=toy_apply), schedule=schedule,
             cfg=O.default_config())


def test_errors(schedule, batch):
    kw = dict(schedule=schedule, cfg=O.default_config())
    with pytest.raises(ValueError, match="ema_params"):
        O.codi(init_params(1), batch, jax.random.PRNGKey(0), nets=NETS, **kw)
    with pytest.raises(ValueError, match="nets.decode"):
        O.codi(init_params(1), batch, jax.random.PRNGKey(0), nets=O.Networks(apply=toy_apply), ema_params=init_params(2),
               schedule=schedule, cfg=cfg_with(signal_loss="pixel_l2", pf_ode="online"))
    with pytest.raises(ValueError, match="nets.teacher"):
        O.codi(init_params(1), batch, jax.random.PRNGKey(0), nets=O.Networks(apply=toy_apply), ema_params=init_params(2),
               schedule=schedule, cfg=cfg_with(pf_ode="teacher"))
    with pytest.raises(ValueError, match="text_null"):
        O.pretrain(init_params(1), {k: v for k, v in batch.items() if k != "text_null"}, jax.random.PRNGKey(0),
                   nets=NETS, **kw)
    with pytest.raises(ValueError, match="latents"):
        O.codi(init_params(1), {k: v for k, v in batch.items() if k != "latents"}, jax.random.PRNGKey(0), nets=NETS,
               ema_params=init_params(2), **kw)
