"""config.resolve: what a teacher folder defines (image size, tokenizer, caption length, prediction type, noise schedule)
is taken from it unless the user set it, where each came from is recorded, and a run that lacks a teacher, a dataset or a
tokenizer that fits the text encoder stops in one line naming the flag. Folders here hold config JSONs only: resolving
reads no weights."""

import importlib.util
import json
import os

import pytest

from codi_jax import config as config_lib
from codi_jax import teacher as teacher_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(name="depth", arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def sd_folder(root, *, sample_size=8, vae_blocks=4, prediction_type="v_prediction", beta_schedule="linear",
              vocab=300, text_vocab=300, max_length=77):
    """The JSON skeleton of a Stable Diffusion folder (SD 2.x-like by default: v-prediction)."""
    _write(os.path.join(root, "unet", "config.json"), {"_class_name": "UNet2DConditionModel",
                                                        "sample_size": sample_size})
    _write(os.path.join(root, "vae", "config.json"), {"_class_name": "AutoencoderKL",
                                                       "block_out_channels": [8] * vae_blocks})
    _write(os.path.join(root, "text_encoder", "config.json"), {"vocab_size": text_vocab,
                                                                "max_position_embeddings": 77})
    _write(os.path.join(root, "tokenizer", "vocab.json"), {f"t{i}": i for i in range(vocab)})
    _write(os.path.join(root, "tokenizer", "tokenizer_config.json"), {"model_max_length": max_length})
    _write(os.path.join(root, "scheduler", "scheduler_config.json"), {
        "_class_name": "DDIMScheduler", "prediction_type": prediction_type, "beta_schedule": beta_schedule,
        "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 500})
    return str(root)


def user_config(teacher, **fields):
    c = get_config("depth")
    c.teacher = teacher
    c.data.dataset, c.data.data_dir = "folder", "/data/photos"
    for key, value in fields.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_sd_scale_config_takes_everything_the_teacher_defines(tmp_path):
    teacher = sd_folder(tmp_path / "sd2")
    c = config_lib.resolve(user_config(teacher))
    assert c.data.image_size == 64  # sample_size 8 x VAE factor 8, not the tiny 32
    assert c.data.tokenizer == os.path.join(teacher, "tokenizer")  # not the scenes tokenizer
    assert c.data.max_length == 77
    assert c.model.prediction_type == c.objective.prediction_type == "v_prediction"
    assert c.schedule.to_dict() == {"kind": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                                    "num_train_timesteps": 500}
    assert c.derived.image_size == f"teacher {teacher}: unet sample_size 8 x VAE factor 8"
    assert c.derived.prediction_type == c.derived.schedule == f"teacher {teacher}: scheduler/scheduler_config.json"
    assert c.derived.tokenizer == f"teacher {teacher}: tokenizer/"
    # Resolving again (the recipe does, after main) changes nothing.
    before = c.to_dict()
    assert config_lib.resolve(c).to_dict() == before


def test_a_value_the_user_sets_wins_and_says_what_the_teacher_had(tmp_path):
    teacher = sd_folder(tmp_path / "sd2")
    c = config_lib.resolve(user_config(teacher, **{"data.image_size": 128, "model.prediction_type": "epsilon"}))
    assert c.data.image_size == 128 and c.model.prediction_type == "epsilon"
    assert c.derived.image_size == "config (the teacher's: 64)"
    assert c.derived.prediction_type == "config (the teacher's: 'v_prediction')"
    assert c.derived.tokenizer.startswith("teacher ")


def test_missing_teacher_and_missing_dataset_name_the_flag(tmp_path):
    c = get_config("depth")  # the SD-scale config as a user would start it: neither set
    with pytest.raises(ValueError, match=r"^config.teacher: .*--config.teacher="):
        config_lib.resolve(c)
    c.teacher = sd_folder(tmp_path / "sd")
    with pytest.raises(ValueError, match=r"^config.data.dataset: .*--config.data.dataset=folder"):
        config_lib.resolve(c)
    # A launch machine that cannot see the workers' folders checks the same, reading nothing.
    c = get_config("depth")
    with pytest.raises(ValueError, match=r"^config.teacher: "):
        config_lib.resolve(c, check_paths=False)
    c = user_config("/only/on/the/workers")
    assert config_lib.resolve(c, check_paths=False).data.image_size == 0  # left to the worker's resolve
    with pytest.raises(ValueError, match=r"^config.teacher: '/only/on/the/workers': no such folder"):
        config_lib.resolve(c)


def test_tokenizer_that_does_not_fit_the_text_encoder_is_refused_naming_both(tmp_path):
    teacher = sd_folder(tmp_path / "sd", vocab=49408, text_vocab=49408)
    config_lib.resolve(user_config(teacher))  # the teacher's own pair fits
    c = user_config(teacher, **{"data.tokenizer": "builtin:scenes"})
    with pytest.raises(ValueError, match=r"^config.data.tokenizer: 'builtin:scenes' has \d+ token ids but the text "
                                         r"encoder .*text_encoder' has 49408"):
        config_lib.resolve(c)


def test_unsupported_schedule_is_one_line(tmp_path):
    teacher = sd_folder(tmp_path / "sd", beta_schedule="sigmoid")
    with pytest.raises(ValueError, match=r"^config.teacher: .*beta_schedule 'sigmoid' is not one codi_jax"):
        config_lib.resolve(user_config(teacher))


def test_tiny_default_is_unchanged_by_resolving():
    """The embedded default sets every field itself (the scratch route's teacher does not exist when it starts), to
    the shipped teacher's values: resolving keeps them all, and the shipped folder defines the same."""
    c = get_config("depth", "tiny")
    before = c.to_dict()
    c = config_lib.resolve(c)
    after = c.to_dict()
    assert {k: v for k, v in after.items() if k != "derived"} == {k: v for k, v in before.items() if k != "derived"}
    shipped = teacher_lib.read(teacher_lib.folder("builtin:scenes32"))
    assert (shipped.image_size, shipped.max_length, shipped.prediction_type, shipped.schedule) == (
        c.data.image_size, c.data.max_length, c.model.prediction_type, c.schedule.to_dict())
    assert shipped.text_vocab_size == teacher_lib.tokenizer_vocab_size(c.data.tokenizer)


def test_no_teacher_defaults_are_recorded():
    """A text-to-image model from scratch at SD scale: the preset's size and SD's schedule, said to be defaults; the
    tokenizer has no default."""
    c = get_config("pretrain")
    c.vae_from, c.data.dataset, c.data.data_dir = "/data/vae", "folder", "/data/photos"
    with pytest.raises(ValueError, match=r"^config.data.tokenizer: no teacher: pass --config.data.tokenizer="):
        config_lib.resolve(c)
    c.data.tokenizer = "builtin:scenes"
    c = config_lib.resolve(c)
    assert (c.data.image_size, c.model.prediction_type, c.schedule.kind) == (512, "epsilon", "scaled_linear")
    assert c.derived.image_size == "default of model.preset 'sd15' (no teacher)"
