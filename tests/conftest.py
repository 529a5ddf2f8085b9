"""Test-wide setup: 8 fake CPU devices so sharding tests run on one CPU box."""

import os

import pytest

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# Once, before any test module imports transformers or diffusers (codi_jax.testing says why).
from codi_jax.testing import make_torchvision_importable  # noqa: E402 - after the environment above

make_torchvision_importable()


@pytest.fixture(scope="session", autouse=True)
def jax_cache(tmp_path_factory):
    """One persistent compilation cache for the whole session, in this process and every subprocess it starts: the
    many runs of codi_jax.main on the tiny config (gates, faults, resume, the end-to-end tests) compile the same train
    step and evaluation programs, once per CI run instead of once per test and xdist worker (the cache writes each
    entry atomically, so the workers share it). Only compiles of a second or more are kept: the small op-by-op ones
    cost less to compile than to write."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
    path.mkdir(exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)  # subprocesses inherit it
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def eval_cache_dir(tmp_path_factory):
    """The evaluation cache (codi_jax/eval_cache.py) of this test session, shared by the xdist workers like the
    compilation cache, and never the user's ~/.cache: evaluations of the same held-out set and teacher in different
    tests read their reference rows back, and nothing outlives the session."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "codi_jax_cache"
    path.mkdir(exist_ok=True)
    os.environ["CODI_JAX_CACHE"] = str(path)  # subprocesses inherit it
    return path


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    """A tiny random text-to-image pipeline (codi_jax.testing.make_random_pipeline's defaults), shared by the modules
    that only need some teacher to train from."""
    from codi_jax.testing import make_random_pipeline

    return make_random_pipeline(str(tmp_path_factory.mktemp("random_teacher")))
