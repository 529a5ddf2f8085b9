"""Which classifier-free guidance each evaluated row is sampled at: by default each model's own (the scale a
cfg_aware model was distilled for, else 1), or the one config.eval.guidance_scale forces on every row."""

import numpy as np
import pytest

from codi_jax import evaluate


class _Pipe:
    def __init__(self, own: float):
        self.own, self.asked = own, []

    def default_guidance(self):
        return self.own

    def __call__(self, cond, captions, *, method, steps, seed, guidance_scale):
        self.asked.append(guidance_scale)
        return np.zeros((len(captions), 4, 4, 3), np.uint8)


def _rows(guidance_in_config: float, own: float):
    from codi_jax.testing import tiny_config

    config = tiny_config("depth")
    config.eval.guidance_scale = guidance_in_config
    pipe, report = _Pipe(own), {}
    batches = [{"cond": np.zeros((2, 4, 4, 1), np.float32), "caption": ["a red sphere", "a blue box"]}] * 2
    evaluate.sample_rows(pipe, "codi", [("", "codi", 1), ("", "codi", 4)], batches, config, lambda x: {}, report, {})
    return pipe.asked, {n: r["guidance_scale"] for n, r in report["codi"].items()}


def test_each_model_is_sampled_at_its_own_guidance_by_default():
    asked, recorded = _rows(0.0, own=3.0)
    assert asked == [3.0] * 4 and recorded == {"1": 3.0, "4": 3.0}
    asked, recorded = _rows(0.0, own=1.0)
    assert asked == [1.0] * 4 and recorded == {"1": 1.0, "4": 1.0}


def test_config_guidance_overrides_every_model():
    asked, recorded = _rows(2.0, own=3.0)
    assert asked == [2.0] * 4 and recorded == {"1": 2.0, "4": 2.0}


def test_negative_guidance_is_refused():
    from codi_jax.testing import tiny_config

    with pytest.raises(ValueError, match="eval.guidance_scale"):
        tiny_config("depth", **{"eval.guidance_scale": -1.0})
