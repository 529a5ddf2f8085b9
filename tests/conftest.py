"""Test-wide setup: 8 fake CPU devices so sharding tests run on one CPU box."""

import os

import pytest

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _make_torchvision_importable():
    """The PyPI torchvision for torch 2.13.0 (0.28.0) is a CUDA build: its C++ ops library links libtorch_cuda and
    cannot load beside the CPU torch, and its import then stops while registering fake kernels for the ops `nms` and
    `qnms`. The references we use (lpips' AlexNet/VGG, transformers, diffusers) need only torchvision's pure-Python
    parts. So, only when the library really cannot load, declare those two op schemas (no kernels: calling them
    would still fail) and torchvision imports unchanged. Done once here, before any test module imports it."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    import torch

    libs = glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "_C*.so"))
    try:
        torch.ops.load_library(libs[0])
    except (OSError, IndexError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP_ALIVE.append(lib)  # the schemas live as long as this object
    import torchvision  # noqa: F401


_KEEP_ALIVE: list = []
_make_torchvision_importable()


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """One persistent compilation cache for the subprocesses that run codi_jax.main on the tiny config: their train
    step is the same program, so it compiles once per CI run instead of once per test module and xdist worker (the
    cache writes each entry atomically, so the workers can share it)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)
