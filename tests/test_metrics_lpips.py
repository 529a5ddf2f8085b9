"""LPIPS: our Flax network against the `lpips` package itself (lpips==0.1.4), random backbone + the package's real
linear heads, exported to safetensors exactly as the codi_jax.metrics.lpips docstring tells users to."""

import numpy as np
import pytest
import torch

from codi_jax.metrics import MetricUnavailable
from codi_jax.metrics import lpips as lpips_metric

# lpips passes torchvision the old `pretrained=False` argument; torchvision warns that it means weights=None.
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")

def _import_lpips():
    """The real lpips package; tests/conftest.py makes torchvision (which lpips imports) importable first."""
    import lpips
    return lpips


def _smooth_images(rng, n, h, w):
    coarse = rng.uniform(0, 1, (n, h // 8 + 1, w // 8 + 1, 3))
    up = coarse.repeat(8, 1).repeat(8, 2)[:, :h, :w]
    return np.clip(0.7 * up + 0.3 * rng.uniform(0, 1, (n, h, w, 3)), 0, 1).astype(np.float32)


def _export(reference, path):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if not k.startswith("lins.")}
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module", params=["alex", "vgg"])
def pair(request, tmp_path_factory):
    lpips = _import_lpips()
    torch.manual_seed(0)
    reference = lpips.LPIPS(net=request.param, pretrained=True, pnet_rand=True, verbose=False).eval()
    path = _export(reference, tmp_path_factory.mktemp("lpips") / f"lpips_{request.param}.safetensors")
    return request.param, reference, path


def _reference_distance(reference, x0, x1):
    with torch.no_grad():
        t0 = torch.from_numpy(x0.transpose(0, 3, 1, 2).copy())
        t1 = torch.from_numpy(x1.transpose(0, 3, 1, 2).copy())
        return reference(t0, t1, normalize=True).reshape(-1).double().numpy()  # normalize: [0, 1] -> [-1, 1]


def test_distance_matches_lpips_package(pair):
    net, reference, path = pair
    model = lpips_metric.load_lpips(path, net=net)
    rng = np.random.default_rng(0)
    x0 = _smooth_images(rng, 5, 64, 64)
    x1 = np.clip(x0 + rng.normal(0, 0.15, x0.shape), 0, 1).astype(np.float32)
    x1[-1] = _smooth_images(rng, 1, 64, 64)[0]  # one unrelated pair: a large distance
    ours = lpips_metric.lpips_distance(model, x0, x1, batch_size=4)  # 5 pairs: padded last batch
    ref = _reference_distance(reference, x0, x1)
    print(f"\nLPIPS {net}: ours {np.round(ours, 5)}, max abs diff {np.abs(ours - ref).max():.2e}")
    assert ours.shape == (5,) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert np.all(ref > 1e-3) and ref[-1] > ref[:-1].max()

    same = lpips_metric.lpips_distance(model, x0[:4], x0[:4], batch_size=4)
    np.testing.assert_allclose(same, 0.0, atol=1e-7)
    # uint8 input is read as value / 255.
    as_uint8 = np.round(x0[:4] * 255).astype(np.uint8)
    np.testing.assert_allclose(lpips_metric.lpips_distance(model, as_uint8, x1[:4], batch_size=4),
                               _reference_distance(reference, as_uint8 / np.float32(255), x1[:4]), atol=1e-4)


def test_lins_alias_keys_are_accepted(pair):
    net, reference, path = pair
    from safetensors.numpy import load_file
    tensors = load_file(str(path))
    renamed = {(f"lins.{k[3]}{k[4:]}" if k.startswith("lin") else k): v for k, v in tensors.items()}
    assert any(k.startswith("lins.") for k in renamed)
    a = lpips_metric.params_from_state_dict(tensors, net)["params"]
    b = lpips_metric.params_from_state_dict(renamed, net)["params"]
    for i in range(5):
        np.testing.assert_array_equal(a[f"lin{i}"], b[f"lin{i}"])


def test_missing_and_wrong_weights(pair, tmp_path):
    net, _, path = pair
    with pytest.raises(MetricUnavailable, match="no weights given"):
        lpips_metric.load_lpips(None, net=net)
    with pytest.raises(MetricUnavailable, match="does not exist"):
        lpips_metric.load_lpips(tmp_path / "absent.safetensors", net=net)
    other = "vgg" if net == "alex" else "alex"
    with pytest.raises(ValueError, match=f"net='{other}'"):
        lpips_metric.load_lpips(path, net=other)
    with pytest.raises(ValueError, match="net must be one of"):
        lpips_metric.load_lpips(path, net="squeeze")

    from safetensors.numpy import load_file
    tensors = load_file(str(path))
    tensors["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="unexpected keys"):
        lpips_metric.params_from_state_dict(tensors, net)
    tensors = load_file(str(path))
    tensors["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match="scaling_layer.shift"):
        lpips_metric.params_from_state_dict(tensors, net)


def test_bad_images_raise(pair):
    net, _, path = pair
    model = lpips_metric.load_lpips(path, net=net)
    x = np.zeros((2, 64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="equal shapes"):
        lpips_metric.lpips_distance(model, x, x[:1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lpips_metric.lpips_distance(model, x - 1.0, x)
