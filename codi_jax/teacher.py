"""What a teacher folder defines, read from its JSON files alone: no JAX, no weights.

A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) fixes the settings a
distillation run must share with it:

| config field | read from |
|---|---|
| data.image_size | unet/config.json `sample_size` x the VAE's downsampling factor (vae/config.json) |
| data.tokenizer | the folder's tokenizer/ |
| data.max_length | tokenizer/tokenizer_config.json `model_max_length`, else the text encoder's positions |
| model.prediction_type | scheduler/scheduler_config.json `prediction_type` |
| schedule.* | scheduler/scheduler_config.json `beta_schedule`, `beta_start`, `beta_end`, `num_train_timesteps` |

`config.resolve` fills every one of these the user left unset from `read(teacher)`, and records where each came from
in `config.derived` (the export's model card shows it). Kept free of JAX so that a launch script can check a config on
a machine that only has the code.
"""

from __future__ import annotations

import dataclasses
import json
import os

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")

# diffusers beta_schedule -> codi_jax.diffusion.make_schedule kind.
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
# transformers writes a huge sentinel for "no limit"; such a tokenizer takes its length from the text encoder.
_NO_LIMIT = 10**6


def folder(path: str, workdir: str | None = None) -> str:
    """'@stage' -> <workdir>/<stage>/export (a stage of this run; '' without a workdir); 'builtin:NAME' -> the pipeline
    shipped in the package; anything else as given."""
    if path.startswith("@"):
        return os.path.join(workdir, path[1:], "export") if workdir else ""
    if path.startswith("builtin:"):
        found = os.path.join(PRETRAINED_DIR, path[len("builtin:"):])
        if not os.path.isdir(found):
            shipped = sorted(os.listdir(PRETRAINED_DIR)) if os.path.isdir(PRETRAINED_DIR) else []
            raise FileNotFoundError(f"{path!r}: no pretrained pipeline {found!r} in this installation (shipped: "
                                    f"{', '.join('builtin:' + s for s in shipped)})")
        return found
    return path


@dataclasses.dataclass(frozen=True)
class Defined:
    """The settings a teacher folder defines (None: it does not say) and, for each, where it was read."""

    image_size: int | None = None
    tokenizer: str | None = None
    max_length: int | None = None
    prediction_type: str | None = None
    schedule: dict | None = None
    text_vocab_size: int | None = None
    sources: dict = dataclasses.field(default_factory=dict)


def _json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def read(path: str, *, text_encoder_from: str = "") -> Defined:
    """The settings `path` (a diffusers pipeline folder) defines. A part the folder lacks defines nothing; a part
    that says something codi_jax cannot follow (a beta schedule it does not implement) is a ValueError naming it."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such folder {path!r} (a diffusers pipeline folder: unet/, vae/, text_encoder/, "
                                "tokenizer/, scheduler/)")
    values: dict = {}
    sources: dict = {}
    unet, vae = _json(os.path.join(path, "unet", "config.json")), _json(os.path.join(path, "vae", "config.json"))
    if unet is not None and vae is not None and unet.get("sample_size") and vae.get("block_out_channels"):
        size = unet["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        values["image_size"] = int(size) * factor
        sources["image_size"] = f"unet sample_size {size} x VAE factor {factor}"
    tok = os.path.join(path, "tokenizer")
    if os.path.isdir(tok):
        values["tokenizer"] = tok
        sources["tokenizer"] = "tokenizer/"
        limit = (_json(os.path.join(tok, "tokenizer_config.json")) or {}).get("model_max_length")
        if isinstance(limit, int) and 2 <= limit < _NO_LIMIT:
            values["max_length"] = limit
            sources["max_length"] = f"tokenizer model_max_length {limit}"
    text_dir = text_encoder_from or os.path.join(path, "text_encoder")
    text = _json(os.path.join(text_dir, "config.json"))
    if text is not None:
        text = text.get("text_config", text)  # a full CLIPModel config nests the text tower's
        if text.get("vocab_size"):
            values["text_vocab_size"] = int(text["vocab_size"])
        if "max_length" not in values and text.get("max_position_embeddings"):
            values["max_length"] = int(text["max_position_embeddings"])
            sources["max_length"] = f"text encoder max_position_embeddings {values['max_length']}"
    sched = scheduler(path)
    if sched is not None:
        values["schedule"], values["prediction_type"] = sched
        sources["schedule"] = sources["prediction_type"] = "scheduler/scheduler_config.json"
    return Defined(**values, sources=sources)


def scheduler(path: str) -> tuple[dict, str] | None:
    """(noise schedule as codi_jax.diffusion.make_schedule takes it, prediction type) of a pipeline folder's
    scheduler/scheduler_config.json, with diffusers' own defaults for keys it leaves out; None without one. A schedule
    codi_jax does not implement (an explicit beta table, another beta_schedule) is a ValueError naming it."""
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    sched = _json(sched_file)
    if sched is None:
        return None
    if sched.get("trained_betas"):
        raise ValueError(f"{sched_file}: trained_betas (an explicit beta table) is not supported; set "
                         "config.schedule.* to a beta_schedule codi_jax implements")
    kind = sched.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"{sched_file}: beta_schedule {kind!r} is not one codi_jax implements "
                         f"({', '.join(BETA_SCHEDULES)})")
    return ({"kind": BETA_SCHEDULES[kind], "beta_start": float(sched.get("beta_start", 0.0001)),
             "beta_end": float(sched.get("beta_end", 0.02)),
             "num_train_timesteps": int(sched.get("num_train_timesteps", 1000))},
            sched.get("prediction_type", "epsilon"))


def controlnet_hint_channels(path: str) -> tuple[int, ...] | None:
    """conditioning_embedding_out_channels (the hint net) of a diffusers ControlNet folder, or of a pipeline's
    controlnet/, from its config.json (diffusers' default when it leaves the key out); None when neither holds a
    config (recipes.controlnet_source then says what is wrong with the folder)."""
    for folder in (path, os.path.join(path, "controlnet")):
        found = _json(os.path.join(folder, "config.json"))
        if found is not None:
            return tuple(int(c) for c in found.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    return None


def tokenizer_vocab_size(spec: str) -> int | None:
    """Ids a tokenizer can emit (its largest id + 1), from its files; None when the folder holds none we read."""
    if spec.startswith("builtin:"):
        from codi_jax.data import tokenizer  # builds the builtin vocabulary; no JAX

        return tokenizer.builtin_vocab_size()
    ids: list[int] = []
    vocab = _json(os.path.join(spec, "vocab.json"))
    if vocab:
        ids += [int(i) for i in vocab.values()]
    fast = _json(os.path.join(spec, "tokenizer.json"))
    if fast:
        ids += [int(i) for i in ((fast.get("model") or {}).get("vocab") or {}).values()]
        ids += [int(t["id"]) for t in fast.get("added_tokens") or []]
    added = _json(os.path.join(spec, "added_tokens.json"))
    if added:
        ids += [int(i) for i in added.values()]
    return max(ids) + 1 if ids else None
