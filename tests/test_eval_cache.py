"""The evaluation's cache (codi_jax/eval_cache.py): a second evaluation reads its reference rows and the real images'
features back, and they equal a recomputation (--no-cache); a changed input is a changed key."""

import os
import subprocess
import sys

import numpy as np
import pytest

from codi_jax import eval_cache, evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rows_and_arrays_are_read_back_and_a_disabled_cache_computes(tmp_path):
    cache = eval_cache.Cache(tmp_path)
    calls = []
    row = lambda: calls.append(1) or {"fid": 1.5, "kid_ci": [0.1, 0.2]}  # noqa: E731
    key = cache.key(what="x", held={"data": "abc"})
    assert cache.row("x", key, row) == cache.row("x", key, row) == {"fid": 1.5, "kid_ci": [0.1, 0.2]}
    assert len(calls) == 1 and cache.hits == ["x"] and cache.misses == ["x"]
    a = cache.array("f", key, lambda: np.arange(6.0).reshape(2, 3))
    assert np.array_equal(cache.array("f", key, lambda: 1 / 0), a)
    off = eval_cache.Cache(tmp_path, enabled=False)
    off.row("x", key, row)
    assert len(calls) == 2 and off.hits == []
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # written whole or not at all


def test_a_changed_input_is_a_changed_key(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "a.safetensors").write_bytes(b"weights")
    before = eval_cache.content_hash(tmp_path / "w")
    os.utime(tmp_path / "w" / "a.safetensors", ns=(1, 1))  # a new stat, so the file is read again
    (tmp_path / "w" / "a.safetensors").write_bytes(b"weightz")
    assert eval_cache.content_hash(tmp_path / "w") != before
    assert eval_cache.Cache.key(a=1) != eval_cache.Cache.key(a=2)
    assert eval_cache.array_hash(np.zeros(3, np.uint8)) != eval_cache.array_hash(np.zeros(3, np.float32))
    assert eval_cache.content_hash(None) is None


def _evaluate(workdir, cache_dir, cache=True):
    """evaluate.run in this process (the second and third share the first's compiled programs)."""
    from codi_jax import evaluate
    from codi_jax.testing import tiny_config

    config = tiny_config("sr", "builtin:scenes32", **{
        "eval.num_examples": 6, "eval.batch_size": 6, "eval.teacher_steps": 2, "eval.split": "validation",
        "eval.cache": cache, "eval.cache_dir": str(cache_dir)})
    return evaluate.run(config, str(workdir), steps=(1,))


def _references(report):
    drop = ("seconds_per_image",)  # wall time: not a result
    return {k: {s: {m: v for m, v in r.items() if m not in drop} for s, r in rows.items()}
            for k, rows in report.items() if k != "meta" and k != "codi"}


def test_no_cache_flag_turns_the_cache_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-m", "codi_jax.evaluate", f"--workdir={tmp_path}",
                          "--config=configs/sr.py:tiny", "--no-cache"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert "flags set eval.cache=False" in out.stderr, out.stderr[-3000:]
    assert "no finished conditional model" in out.stderr  # and on to the run itself


@pytest.mark.slow
def test_second_evaluation_reads_references_back_and_they_equal_a_recomputation(tmp_path, caplog):
    from codi_jax.testing import export_untrained, tiny_config

    workdir, cache_dir = tmp_path / "run", tmp_path / "cache"
    export_untrained(tiny_config("sr", "builtin:scenes32"), str(workdir))
    fresh = _evaluate(workdir, cache_dir, cache=False)
    assert fresh["meta"]["cache"]["dir"] is None and fresh["meta"]["cache"]["read_back"] == []
    assert not cache_dir.exists()  # off, it writes nothing either
    first = _evaluate(workdir, cache_dir)
    assert first["meta"]["cache"]["read_back"] == []
    with caplog.at_level("INFO"):
        second = _evaluate(workdir, cache_dir)
    assert set(second["meta"]["cache"]["read_back"]) == {
        "the real images' InceptionV3 features", "ground truth", "ground truth via VAE",
        "bicubic (the input upsampled)", "teacher (text only)"}
    assert "eval cache hit: ground truth (key " in caplog.text
    assert second["meta"]["cache"]["computed"] == []
    # Cached, computed into the cache, and computed without it: the same rows; the model's own row is never cached.
    assert _references(first) == _references(second) == _references(fresh)
    assert _references({"codi ": first["codi"]}) == _references({"codi ": second["codi"]})


def test_progress_eta_weights_sampling_by_steps_and_scoring_by_images():
    # A CoDi row at 4 steps and a teacher row at 50: after the first batch of the first, the ETA is the image-steps
    # left at the sampling rate plus the images left to score at the scoring rate, not images at one rate.
    progress = evaluate.Progress(every_s=1e9)
    progress.add(10, 4)
    progress.add(10, 50)
    assert progress.eta_s() is None  # no rate measured yet
    progress.sampled(10, 4, 1.0, "codi @ 4 steps")  # 0.025 s per image-step
    assert progress.eta_s() is None  # scoring has no rate yet
    progress.scored(10, 2.0)  # 0.2 s per image
    assert progress.eta_s() == pytest.approx(10 * 50 * 0.025 + 10 * 0.2)
    progress.sampled(10, 50, 12.5, "teacher @ 50 steps")
    progress.scored(10, 2.0)
    assert progress.eta_s() == 0.0
