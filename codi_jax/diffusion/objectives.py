"""Training objectives as pure functions (docs/algorithm.md "The CoDi objective" and the baselines of Table 1-2).

Every objective has the signature

    loss, metrics = fn(params, batch, rng, *, nets, schedule, cfg, ema_params=None)

and the caller differentiates w.r.t. `params`. `batch['latents']` (B, h, w, C) are clean, VAE-scaled latents x;
`batch['text']` / `batch['text_null']` are text embeddings (text_null broadcastable to text); every other entry
('cond', ...) goes to the networks untouched. The unconditional batch is the batch with 'text' replaced by the
broadcast 'text_null'. With cfg.cfg_aware the networks also get batch['guidance_scale'] (B,) = the drawn w.
Frozen networks and the EMA target enter only under stop_gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from codi_jax.diffusion import parameterization as pz
from codi_jax.diffusion import schedules as sch

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class Networks:
    """The networks an objective calls. Frozen and hashable, so it can be a static argument of jit."""

    apply: Callable[..., jax.Array]  # (params, z, t, batch) -> raw output of the trained model; t: (B,) int32
    teacher: Callable[..., jax.Array] | None = None  # (z, t, batch) -> raw output of a frozen teacher
    decode: Callable[[jax.Array], jax.Array] | None = None  # latents -> pixels (frozen VAE decoder)


# name, default, doc. default_config() and FIELD_DOCS are both built from this table so they cannot drift apart.
_FIELDS = (
    ("prediction_type", "epsilon", "Output type of the trained model: epsilon | v_prediction | sample."),
    ("teacher_prediction_type", "", "Output type of nets.teacher; '' = same as prediction_type."),
    ("loss_weighting", "none", "pretrain/finetune weighting: none | min_snr (Hang et al. 2023)."),
    ("min_snr_gamma", 5.0, "gamma of the min-SNR weight min(SNR, gamma)."),
    ("text_drop_prob", 0.1, "pretrain/finetune: per-example probability of replacing 'text' by 'text_null' (CFG)."),
    ("distill_steps", 50, "N of the CoDi/CM grid t = k T/N, k ~ U{1..N-1}; the codi sampler walks the same grid."),
    ("pf_ode", "auto", "How z_s is reached from z_t: online (paper eq. 14: a_s stopgrad(f_theta) + s_s eps, same "
                       "eps) | teacher (DDIM step of nets.teacher, official code) | online_ddim (DDIM step of the "
                       "online model under stop_gradient) | auto: teacher in x space (the official code's pair; the "
                       "better FID/KID on two seeds there, README), online in eps space (where the teacher's was far "
                       "worse with all three embedded teachers, as in the paper's Fig. 7)."),
    ("consistency_space", "x", "Consistency distance on f (x, the official code's) or on eps_f (eps, paper eq. 15). "
                               "x scored the better FID/KID at the same depth error with both embedded teachers "
                               "(README, Table 2)."),
    ("distance", "l2", "Consistency distance: l2 (mean squared error) | pseudo_huber (sqrt(d^2 + c^2) - c)."),
    ("huber_c", 0.001, "c of the pseudo-Huber distance."),
    ("signal_loss", "latent_l2", "Conditional guidance d_x(x, f_theta): latent_l2 | pixel_l2 (through nets.decode) "
                                 "| none (r = 0 ablation)."),
    ("w_consistency", 1.0, "Weight of the consistency term."),
    ("w_signal", 1.0, "Weight of the signal (conditional guidance) term."),
    ("timestep_sampling", "auto", "batch: ONE k for the whole batch (CoDi, paper Fig. 7) | sample: one k per example "
                                  "(as CM and progressive distillation draw it) | auto: sample for the cm and gd "
                                  "baselines; for codi sample in x space (with the teacher's PF-ODE the better KID "
                                  "and depth error on two seeds, README), batch in eps space (the paper's pair)."),
    ("timestep_scaling", 10.0, "c = timestep_scaling * n in the boundary coefficients (LCM form of eq. 11)."),
    ("sigma_data", 0.5, "sigma_data of the boundary coefficients."),
    ("cfg_aware", False, "Guidance-aware distillation: draw w ~ U[guidance_min, guidance_max] per batch; the online "
                         "prediction, the PF-ODE step and the target all use the guided u + w (c - u) (both calls "
                         "guided, as the official code: guiding only the target compounds w over EMA generations). "
                         "Sample such a model with the same guidance scale."),
    ("guidance_min", 2.0, "Lower end of the guidance scale range for cfg_aware."),
    ("guidance_max", 8.0, "Upper end of the guidance scale range for cfg_aware."),
    ("gd_student_steps", 4, "gd: steps of the student; one student DDIM step matches two teacher DDIM steps on the "
                            "'trailing' grid of the DDIM sampler (sample the student with method='ddim', "
                            "timestep_spacing='trailing', num_steps=gd_student_steps)."),
    ("gd_set_alpha_to_one", False, "gd: final alpha of the last student step (the DDIM sampler's set_alpha_to_one)."),
    ("gd_teacher_substeps", 2, "gd: teacher DDIM steps per student step. 2 is progressive distillation's halving; "
                               "the first GD-II round may take more, so that it distils (nearly) the teacher's full "
                               "ODE as Meng et al. do, not a coarse DDIM of it. Later rounds always use 2."),
)
FIELD_DOCS = {name: doc for name, _, doc in _FIELDS}

_CHOICES = {
    "prediction_type": pz.PREDICTION_TYPES,
    "loss_weighting": ("none", "min_snr"),
    "pf_ode": ("auto", "online", "teacher", "online_ddim"),
    "consistency_space": ("eps", "x"),
    "distance": ("l2", "pseudo_huber"),
    "signal_loss": ("latent_l2", "pixel_l2", "none"),
    "timestep_sampling": ("auto", "batch", "sample"),
}


def default_config() -> ml_collections.ConfigDict:
    """Every objective field with its default; FIELD_DOCS[name] documents each one."""
    return ml_collections.ConfigDict({name: default for name, default, _ in _FIELDS})


def validate(cfg) -> None:
    """Raises ValueError naming the first bad field."""
    missing = [name for name, _, _ in _FIELDS if name not in cfg]
    if missing:
        raise ValueError(f"objective config lacks fields {missing}; start from objectives.default_config()")
    for name, choices in _CHOICES.items():
        if cfg[name] not in choices:
            raise ValueError(f"cfg.{name} must be one of {choices}, got {cfg[name]!r}")
    if cfg.teacher_prediction_type not in ("",) + pz.PREDICTION_TYPES:
        raise ValueError(f"cfg.teacher_prediction_type must be '' or one of {pz.PREDICTION_TYPES}, "
                         f"got {cfg.teacher_prediction_type!r}")
    if not 0.0 <= cfg.text_drop_prob <= 1.0:
        raise ValueError(f"cfg.text_drop_prob must be in [0, 1], got {cfg.text_drop_prob}")
    if not isinstance(cfg.distill_steps, int) or cfg.distill_steps < 2:
        raise ValueError(f"cfg.distill_steps must be an int >= 2, got {cfg.distill_steps!r}")
    if not isinstance(cfg.gd_student_steps, int) or cfg.gd_student_steps < 1:
        raise ValueError(f"cfg.gd_student_steps must be an int >= 1, got {cfg.gd_student_steps!r}")
    if not isinstance(cfg.gd_teacher_substeps, int) or cfg.gd_teacher_substeps < 2:
        raise ValueError(f"cfg.gd_teacher_substeps must be an int >= 2, got {cfg.gd_teacher_substeps!r}")
    for name in ("min_snr_gamma", "huber_c", "timestep_scaling", "sigma_data"):
        if not cfg[name] > 0:
            raise ValueError(f"cfg.{name} must be > 0, got {cfg[name]}")
    for name in ("w_consistency", "w_signal"):
        if not cfg[name] >= 0:
            raise ValueError(f"cfg.{name} must be >= 0, got {cfg[name]}")
    if not cfg.guidance_min <= cfg.guidance_max:
        raise ValueError(f"cfg.guidance_min ({cfg.guidance_min}) must be <= cfg.guidance_max ({cfg.guidance_max})")


# ---------------------------------------------------------------------------------------------------------------- #
# Shared pieces.

def _latents(batch) -> jax.Array:
    if "latents" not in batch:
        raise ValueError("batch needs 'latents' (B, h, w, C): the clean VAE-scaled latents")
    return batch["latents"]


def _null_text(batch) -> jax.Array:
    if "text" not in batch or "text_null" not in batch:
        raise ValueError("batch needs 'text' and 'text_null' to build the unconditional batch")
    return jnp.broadcast_to(batch["text_null"], batch["text"].shape).astype(batch["text"].dtype)


def uncond_batch(batch: dict) -> dict:
    """The batch with 'text' replaced by the broadcast 'text_null'."""
    return {**batch, "text": _null_text(batch)}


def drop_text(batch: dict, rng: jax.Array, prob: float) -> dict:
    """Caption dropout: per example, 'text' becomes 'text_null' with probability prob."""
    if prob == 0.0:
        return batch
    null = _null_text(batch)
    drop = jax.random.bernoulli(rng, prob, (null.shape[0],))
    return {**batch, "text": jnp.where(pz.bcast(drop, null), null, batch["text"])}


def resolved_pf_ode(cfg) -> str:
    """cfg.pf_ode with 'auto' resolved: the teacher's PF-ODE in x space, the online one (eq. 14) in eps space."""
    if cfg.pf_ode != "auto":
        return cfg.pf_ode
    return "teacher" if cfg.consistency_space == "x" else "online"


def timestep_sampling(cfg, default: str | None = None) -> str:
    """cfg.timestep_sampling with 'auto' resolved to the objective's own `default` (cm, gd: one t per example, as
    their papers); CoDi's (None) follows the consistency space as pf_ode does: one t per example in x space, one per
    batch (the paper's Fig. 7) in eps space."""
    if cfg.timestep_sampling != "auto":
        return cfg.timestep_sampling
    return default or ("sample" if cfg.consistency_space == "x" else "batch")


def sample_indices(rng: jax.Array, batch_size: int, low: int, high: int, mode: str) -> jax.Array:
    """Integers in [low, high): one shared by the whole batch ('batch') or one per example ('sample'). (B,) int32."""
    if mode == "batch":
        return jnp.full((batch_size,), jax.random.randint(rng, (), low, high), jnp.int32)
    if mode == "sample":
        return jax.random.randint(rng, (batch_size,), low, high).astype(jnp.int32)
    raise ValueError(f"timestep_sampling must be 'batch' or 'sample', got {mode!r}")


def _per_example_mean(d: jax.Array) -> jax.Array:
    return jnp.mean(d.reshape(d.shape[0], -1).astype(jnp.float32), axis=1)


def distance(a: jax.Array, b: jax.Array, kind: str = "l2", huber_c: float = 0.001) -> jax.Array:
    """Per-example distance (B,): mean squared error, or mean elementwise pseudo-Huber (LCM)."""
    diff = (a - b).astype(jnp.float32)
    if kind == "l2":
        return _per_example_mean(diff**2)
    if kind == "pseudo_huber":
        return _per_example_mean(jnp.sqrt(diff**2 + huber_c**2) - huber_c)
    raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {kind!r}")


def _teacher_type(cfg) -> str:
    return cfg.teacher_prediction_type or cfg.prediction_type


def _guided_call(fn: Callable, z, t, batch, w) -> jax.Array:
    """fn(z, t, batch) or, with a guidance scale w, the CFG combination of the conditional and unconditional calls."""
    if w is None:
        return fn(z, t, batch)
    return pz.guide(fn(z, t, batch), fn(z, t, uncond_batch(batch)), w)


def _draw_guidance(rng, batch, cfg):
    """cfg_aware: one w per batch, also handed to the networks as batch['guidance_scale'] (B,)."""
    if not cfg.cfg_aware:
        return None, batch
    w = jax.random.uniform(rng, (), jnp.float32, cfg.guidance_min, cfg.guidance_max)
    return w, {**batch, "guidance_scale": jnp.full((_latents(batch).shape[0],), w)}


# ---------------------------------------------------------------------------------------------------------------- #
# pretrain / finetune: the diffusion loss on the model's own output type.

def diffusion_loss(params, batch, rng, *, nets: Networks, schedule: sch.Schedule, cfg, ema_params=None):
    """eps / v / x MSE at t ~ U{0..T-1} per example, optional min-SNR weight, caption dropout."""
    del ema_params  # not used: plain diffusion training has no target network
    validate(cfg)
    x = _latents(batch)
    B, T = x.shape[0], schedule.num_train_timesteps
    r_t, r_eps, r_drop = jax.random.split(rng, 3)
    t = jax.random.randint(r_t, (B,), 0, T).astype(jnp.int32)
    eps = jax.random.normal(r_eps, x.shape, x.dtype)
    a, s = schedule.alpha_sigma(t)
    z = pz.bcast(a, x) * x + pz.bcast(s, x) * eps
    out = nets.apply(params, z, t, drop_text(batch, r_drop, cfg.text_drop_prob))
    target = pz.from_x_eps(x, eps, a, s, cfg.prediction_type)
    mse = _per_example_mean((out - target) ** 2)
    if cfg.loss_weighting == "min_snr":
        snr = schedule.snr(t)
        clipped = jnp.minimum(snr, cfg.min_snr_gamma)
        # The min-SNR weight is defined on the x loss; dividing by the output type's implicit weight converts it.
        weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1.0), "sample": clipped}[
            cfg.prediction_type]
    else:
        weight = jnp.ones_like(mse)
    loss = jnp.mean(sg(weight) * mse)
    return loss, {"loss": loss, "loss_diffusion": jnp.mean(mse), "t_mean": jnp.mean(t.astype(jnp.float32))}


pretrain = diffusion_loss
finetune = diffusion_loss


# ---------------------------------------------------------------------------------------------------------------- #
# CoDi (and CM-II, which is the same consistency machinery with a teacher PF-ODE in x-space).

@struct.dataclass
class ConsistencyTerms:
    """Intermediate values of one consistency step (exposed for tests and debugging)."""

    t: jax.Array  # (B,) int32, index of z_t
    s: jax.Array  # (B,) int32, index of z_s (one grid step below t)
    eps: jax.Array  # (B, h, w, C) the noise in z_t
    z_t: jax.Array  # (B, h, w, C)
    z_s: jax.Array  # (B, h, w, C) PF-ODE estimate, under stop_gradient
    f_theta: jax.Array  # (B, h, w, C) online boundary output at (z_t, t)
    eps_theta: jax.Array  # (B, h, w, C) its noise (z_t - a_t f) / s_t
    f_target: jax.Array  # (B, h, w, C) EMA boundary output at (z_s, s), under stop_gradient
    eps_target: jax.Array  # (B, h, w, C)
    guidance_scale: jax.Array | None  # () drawn w when cfg_aware


def consistency_terms(params, batch, rng, *, nets: Networks, schedule: sch.Schedule, cfg, ema_params,
                      pf_ode: str | None = None, default_sampling: str | None = None) -> ConsistencyTerms:
    """Steps 1-5 of the CoDi objective (docs/algorithm.md); pf_ode overrides cfg.pf_ode (cm uses 'teacher').

    The target at s = 0 (k = 1): the boundary's f(z, 0) = z treats z_0 as data, but in a discrete VP schedule
    z_0 = a_0 x + s_0 eps still holds noise (s_0 = 0.029 for SD), so an exact network would be pulled towards z_0 and,
    in eps space, towards eps_f = (1 - a_0) z / s_0 ~ 0.015 z instead of the noise. There the target is the target
    network's own prediction (x_hat, eps_hat) instead, which is exact for an exact network: the loss of a network
    whose x_hat is exact is ~0 at every k, in both spaces."""
    validate(cfg)
    pf_ode = pf_ode or resolved_pf_ode(cfg)
    if ema_params is None:
        raise ValueError("consistency objectives need ema_params (the EMA target network theta^-)")
    if pf_ode == "teacher" and nets.teacher is None:
        raise ValueError("pf_ode='teacher' needs nets.teacher (the frozen pretrained/fine-tuned model)")
    x = _latents(batch)
    B, T, N = x.shape[0], schedule.num_train_timesteps, cfg.distill_steps
    if N > T:
        raise ValueError(f"cfg.distill_steps ({N}) must not exceed the schedule's {T} timesteps")
    r_k, r_eps, r_w = jax.random.split(rng, 3)
    grid = jnp.asarray(sch.distill_grid(N, T), jnp.int32)
    k = sample_indices(r_k, B, 1, N, timestep_sampling(cfg, default_sampling))
    t, s = grid[k], grid[k - 1]
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    eps = jax.random.normal(r_eps, x.shape, x.dtype)
    z_t = pz.bcast(a_t, x) * x + pz.bcast(s_t, x) * eps
    w, batch = _draw_guidance(r_w, batch, cfg)
    bkw = dict(timestep_scaling=cfg.timestep_scaling, sigma_data=cfg.sigma_data)

    # With cfg_aware the online prediction is guided like the target: were it one unguided call, the network would
    # learn c = u + w (c - u) of its EMA, which widens c - u by w every EMA generation (the only fixed point is c = u).
    online = lambda z, t, b: nets.apply(params, z, t, b)  # noqa: E731
    out = _guided_call(online, z_t, t, batch, w)
    x_theta, _ = pz.to_x_eps(out, z_t, a_t, s_t, cfg.prediction_type)
    f_theta, eps_theta = pz.boundary(x_theta, z_t, t, a_t, s_t, **bkw)

    if pf_ode == "online":  # eq. 14: the online estimate, re-noised with the SAME eps as z_t
        z_s = pz.ddim_step(sg(f_theta), eps, a_s, s_s)
    elif pf_ode == "teacher":
        raw = _guided_call(nets.teacher, z_t, t, batch, w)
        z_s = pz.ddim_step(*pz.to_x_eps(raw, z_t, a_t, s_t, _teacher_type(cfg)), a_s, s_s)
    else:  # online_ddim
        z_s = pz.ddim_step(*pz.to_x_eps(out, z_t, a_t, s_t, cfg.prediction_type), a_s, s_s)
    z_s = sg(z_s)

    ema = lambda z, t, b: nets.apply(ema_params, z, t, b)
    raw_target = _guided_call(ema, z_s, s, batch, w)
    x_target, eps_pred = pz.to_x_eps(raw_target, z_s, a_s, s_s, cfg.prediction_type)
    f_b, eps_b = pz.boundary(x_target, z_s, s, a_s, s_s, **bkw)
    at_zero = pz.bcast(s == 0, z_s)
    f_target = sg(jnp.where(at_zero, x_target, f_b))
    eps_target = sg(jnp.where(at_zero, eps_pred, eps_b))
    return ConsistencyTerms(t=t, s=s, eps=eps, z_t=z_t, z_s=z_s, f_theta=f_theta, eps_theta=eps_theta,
                            f_target=f_target, eps_target=eps_target, guidance_scale=w)


def _consistency_loss(terms: ConsistencyTerms, batch, *, nets: Networks, cfg, space: str, signal: str, w_signal):
    if space == "eps":
        d_c = distance(terms.eps_theta, terms.eps_target, cfg.distance, cfg.huber_c)
    else:
        d_c = distance(terms.f_theta, terms.f_target, cfg.distance, cfg.huber_c)
    x = _latents(batch)
    if signal == "latent_l2":
        d_x = distance(x, terms.f_theta)
    elif signal == "pixel_l2":
        if nets.decode is None:
            raise ValueError("signal_loss='pixel_l2' needs nets.decode (the frozen VAE decoder)")
        d_x = distance(sg(nets.decode(x)), nets.decode(terms.f_theta))
    else:
        d_x = jnp.zeros_like(d_c)
    loss_c, loss_x = jnp.mean(d_c), jnp.mean(d_x)
    loss = cfg.w_consistency * loss_c + w_signal * loss_x
    metrics = {"loss": loss, "loss_consistency": loss_c, "loss_signal": loss_x,
               "t_mean": jnp.mean(terms.t.astype(jnp.float32))}
    if terms.guidance_scale is not None:
        metrics["guidance_scale"] = terms.guidance_scale
    return loss, metrics


def codi(params, batch, rng, *, nets: Networks, schedule: sch.Schedule, cfg, ema_params=None):
    """CoDi (paper eq. 13-15): w_c d(eps_theta, eps^-) [or d(f_theta, f^-)] + w_x d_x(x, f_theta)."""
    terms = consistency_terms(params, batch, rng, nets=nets, schedule=schedule, cfg=cfg, ema_params=ema_params)
    return _consistency_loss(terms, batch, nets=nets, cfg=cfg, space=cfg.consistency_space, signal=cfg.signal_loss,
                             w_signal=cfg.w_signal)


def cm(params, batch, rng, *, nets: Networks, schedule: sch.Schedule, cfg, ema_params=None):
    """CM-II: consistency distillation of the frozen teacher (DDIM PF-ODE step), x-space, EMA target, no signal term."""
    terms = consistency_terms(params, batch, rng, nets=nets, schedule=schedule, cfg=cfg, ema_params=ema_params,
                              pf_ode="teacher", default_sampling="sample")
    return _consistency_loss(terms, batch, nets=nets, cfg=cfg, space="x", signal="none", w_signal=0.0)


# ---------------------------------------------------------------------------------------------------------------- #
# GD-II: progressive / guided distillation (Salimans & Ho 2022; Meng et al. 2023).

def gd_timesteps(student_steps: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, mid, prev) per student step on the DDIM sampler's 'trailing' grid: one student step t -> prev equals two
    teacher DDIM steps t -> mid -> prev. prev < 0 means the sampler's final alpha."""
    t = sch.ddim_timesteps(student_steps, T, "trailing")
    step = T // student_steps
    if step < 2:
        raise ValueError(f"gd_student_steps ({student_steps}) must be <= T/2 = {T // 2}")
    return t, t - step // 2, t - step


def gd_substep_timesteps(student_steps: int, substeps: int, T: int) -> np.ndarray:
    """(student_steps, substeps + 1) teacher timesteps from each student step's t down to its prev (< 0: the final
    alpha); substeps = 2 gives gd_timesteps' (t, mid, prev)."""
    t, _, prev = gd_timesteps(student_steps, T)
    step = T // student_steps
    if substeps > step:
        raise ValueError(f"gd_teacher_substeps ({substeps}) exceeds the {step} timesteps of a student step")
    offsets = (np.arange(substeps + 1) * step) // substeps
    return np.concatenate([t[:, None] - offsets[None, :-1], prev[:, None]], axis=1)


def gd(params, batch, rng, *, nets: Networks, schedule: sch.Schedule, cfg, ema_params=None):
    """The student's one DDIM step from z_t must land where gd_teacher_substeps teacher DDIM steps land; x-space target
    x~ = (z_prev - (s_p/s_t) z_t) / (a_p - (s_p/s_t) a_t), truncated-SNR weight max(SNR_t, 1). With cfg_aware the
    student's prediction is guided too, so the next round's re-guided teacher does not compound w."""
    del ema_params  # the student regresses the teacher directly; EMA is only for evaluation
    validate(cfg)
    if nets.teacher is None:
        raise ValueError("gd needs nets.teacher (the fine-tuned model, or the previous round's student)")
    x = _latents(batch)
    B, T = x.shape[0], schedule.num_train_timesteps
    grid = jnp.asarray(gd_substep_timesteps(cfg.gd_student_steps, cfg.gd_teacher_substeps, T), jnp.int32)
    r_j, r_eps, r_w = jax.random.split(rng, 3)
    j = sample_indices(r_j, B, 0, cfg.gd_student_steps, timestep_sampling(cfg, "sample"))
    path = grid[j]  # (B, substeps + 1)
    final = jnp.float32(1.0) if cfg.gd_set_alpha_to_one else schedule.alphas_cumprod[0]

    def alpha_sigma(n):
        abar = jnp.where(n >= 0, schedule.alphas_cumprod[jnp.maximum(n, 0)], final)
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

    t = path[:, 0]
    a_t, s_t = schedule.alpha_sigma(t)
    eps = jax.random.normal(r_eps, x.shape, x.dtype)
    z_t = pz.bcast(a_t, x) * x + pz.bcast(s_t, x) * eps
    w, batch = _draw_guidance(r_w, batch, cfg)

    tt = _teacher_type(cfg)

    def teacher_step(i, z):
        a_i, s_i = schedule.alpha_sigma(path[:, i])
        a_n, s_n = alpha_sigma(path[:, i + 1])
        raw = _guided_call(nets.teacher, z, path[:, i], batch, w)
        return pz.ddim_step(*pz.to_x_eps(raw, z, a_i, s_i, tt), a_n, s_n).astype(z.dtype)

    z_p = jax.lax.fori_loop(0, cfg.gd_teacher_substeps, teacher_step, z_t)
    a_p, s_p = alpha_sigma(path[:, -1])
    ratio = s_p / s_t
    x_target = sg((z_p - pz.bcast(ratio, z_t) * z_t) / pz.bcast(a_p - ratio * a_t, z_t))

    student = lambda z, t_, b: nets.apply(params, z, t_, b)  # noqa: E731
    x_hat, _ = pz.to_x_eps(_guided_call(student, z_t, t, batch, w), z_t, a_t, s_t, cfg.prediction_type)
    weight = jnp.maximum(schedule.snr(t), 1.0)
    mse = distance(x_hat, x_target)
    loss = jnp.mean(weight * mse)
    metrics = {"loss": loss, "loss_distill": jnp.mean(mse), "t_mean": jnp.mean(t.astype(jnp.float32))}
    if w is not None:
        metrics["guidance_scale"] = w
    return loss, metrics


OBJECTIVES: dict[str, Callable[..., tuple[jax.Array, dict[str, Any]]]] = {
    "pretrain": pretrain,
    "finetune": finetune,
    "codi": codi,
    "cm": cm,
    "gd": gd,
}
