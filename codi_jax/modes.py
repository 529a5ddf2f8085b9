"""The mode table: what each training mode is, in one place.

A mode is a row. config.finalize takes the conditioning form and what is frozen from it, the recipe its objective and
teacher, export its sampler, spacing and diffusers scheduler, evaluate and sample which models are conditional and
which Table 2 rows a model contributes. Adding a baseline is a new row here plus its objective function in
diffusion/objectives.py (docs/adding.md walks through one).

Nothing here imports JAX: the table is read by config parsing and by the launch tooling as well as the trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["vae", "t2i", "conditional"]


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    family: Family  # vae: the autoencoder; t2i: a text-to-image UNet; conditional: a UNet adapted to a condition
    objective: str | None  # key of diffusion.objectives.OBJECTIVES; None for the VAE (its loss is the recipe's)
    summary: str  # one line, for docs and errors
    # Conditional models only:
    cond_form: Literal["mu", "controlnet"] | None = None  # full CoDi's mu mixing (eq. 12) or zero-conv residuals
    # True/False: forced; None: the user's config.model.freeze_unet (ControlNet form: False trains the UNet as well)
    freeze_unet: bool | None = None
    # What the run starts from and keeps frozen as its teacher:
    #   'pretrained'  a text-to-image model to adapt (config.teacher, or config.init_from); with
    #                 objective.pf_ode='teacher' (the x-space default) its UNet is also kept frozen as the PF-ODE
    #                 teacher
    #   'conditional' a finished fine-tuned conditional run (config.init_from), frozen as the teacher (CM-II, GD-II)
    #   'none'        nothing
    teacher: Literal["none", "pretrained", "conditional"] = "none"
    pf_ode_teacher: bool = False  # objective.pf_ode='teacher' is meaningful (the x-space default; Fig. 7)
    consistency: bool = False  # a consistency model: the 'codi' sampler, LCMScheduler in diffusers, a target EMA
    sampler: str = "ddim"  # how the model is evaluated and exported by default
    sampler_steps: int | str = 50  # an int, or the name of an objective field (gd: 'gd_student_steps')
    spacing: Literal["leading", "trailing"] = "leading"  # DDIM grid; GD students are distilled on 'trailing'
    # Table 2 rows: (label suffix, sampler, which steps): 'eval' = config.eval.steps in their order, 'eval+teacher' =
    # those and config.eval.teacher_steps, sorted
    rows: tuple[tuple[str, str, str], ...] = ()
    init_controlnet: str | None = None  # None: may start from a diffusers ControlNet; else why it cannot
    progressive: bool = False  # trained in config.gd_rounds rounds, each halving the student's steps (GD-II)

    @property
    def conditional(self) -> bool:
        return self.family == "conditional"

    def default_sampler(self, objective_cfg) -> tuple[str, int]:
        steps = self.sampler_steps if isinstance(self.sampler_steps, int) else objective_cfg[self.sampler_steps]
        return self.sampler, int(steps)

    def eval_rows(self, steps: tuple[int, ...], teacher_steps: int) -> list[tuple[str, str, int]]:
        """(row label suffix, sampler, steps) for every Table 2 row a model of this mode contributes."""
        out = []
        for suffix, sampler, which in self.rows:
            counts = sorted(set(steps) | {teacher_steps}) if which == "eval+teacher" else list(steps)
            out += [(suffix, sampler, s) for s in counts]
        return out


_NO_ENCODER = "it trains no conditional encoder"
_DISTILS = ("it distils a fine-tuned model: start a finetune run from the ControlNet and give its workdir as "
            "config.init_from")

TABLE: dict[str, Mode] = {m.name: m for m in (
    Mode("vae", "vae", None, "the KL autoencoder of the latent space (embedded default's first stage)",
         sampler="ddim", init_controlnet=_NO_ENCODER),
    Mode("pretrain", "t2i", "pretrain", "a text-to-image UNet (the teacher), from scratch",
         rows=((" ddim", "ddim", "eval+teacher"), (" dpm++", "dpmpp_2m", "eval")), init_controlnet=_NO_ENCODER),
    Mode("finetune", "conditional", "finetune",
         "conditional fine-tuning of the adapted teacher (ControlNet form): the multi-step baseline",
         cond_form="controlnet", teacher="pretrained",
         rows=((" ddim", "ddim", "eval+teacher"), (" dpm++", "dpmpp_2m", "eval"))),
    Mode("codi", "conditional", "codi",
         "full CoDi: duplicated encoder mixed in by a learnable mu, conditional consistency distillation",
         cond_form="mu", freeze_unet=False, teacher="pretrained", pf_ode_teacher=True, consistency=True,
         sampler="codi", sampler_steps=4, rows=(("", "codi", "eval"),),
         init_controlnet="full CoDi's mu form mixes the encoder's raw features into the UNet's and has no zero convs, "
                         "so a ControlNet's have nowhere to go (use mode pe_codi or finetune)"),
    Mode("pe_codi", "conditional", "codi",
         "parameter-efficient CoDi: the UNet frozen, a ControlNet-form encoder trained with the CoDi objective",
         cond_form="controlnet", freeze_unet=True, teacher="pretrained", pf_ode_teacher=True, consistency=True,
         sampler="codi", sampler_steps=4, rows=(("", "codi", "eval"),)),
    Mode("cm", "conditional", "cm", "CM-II: consistency distillation of a fine-tuned conditional model",
         cond_form="controlnet", teacher="conditional", consistency=True, sampler="codi", sampler_steps=4,
         rows=(("", "codi", "eval"),), init_controlnet=_DISTILS),
    # CM-II (frozen), the paper's Table 2 row: from a finetune run made with model.freeze_unet=True.
    Mode("cm_frozen", "conditional", "cm", "CM-II (frozen): consistency distillation with the UNet frozen",
         cond_form="controlnet", freeze_unet=True, teacher="conditional", consistency=True, sampler="codi",
         sampler_steps=4, rows=(("", "codi", "eval"),), init_controlnet=_DISTILS),
    Mode("gd", "conditional", "gd", "GD-II: guided progressive distillation of a fine-tuned conditional model",
         cond_form="controlnet", teacher="conditional", sampler="ddim", sampler_steps="gd_student_steps",
         spacing="trailing", rows=(("", "ddim", "eval"),), init_controlnet=_DISTILS, progressive=True),
)}

MODES = tuple(TABLE)


def get(name: str) -> Mode:
    if name not in TABLE:
        raise ValueError(f"mode {name!r} is not one of {tuple(TABLE)}")
    return TABLE[name]


def is_conditional(name: str | None) -> bool:
    """True for a conditional mode; False for vae, pretrain, an unknown name or None (e.g. a plain SD folder)."""
    return name in TABLE and TABLE[name].conditional
