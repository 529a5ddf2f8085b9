"""Generic PyTorch <-> Flax weight conversion and safetensors I/O (no pickle, ever).

Flax module names mirror the torch attribute names, with ModuleList indices joined by '_' (`down_blocks_0` <->
`down_blocks.0`), so one rule set converts every model: leaf `kernel` <-> `weight` (conv HWIO <-> OIHW, dense
transposed), `scale`/`embedding` <-> `weight`, `bias` <-> `bias`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Iterable, Mapping

import flax.linen as nn
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

# Torch ModuleList / Sequential attribute names: a flax segment `name_N` becomes `name.N` only for these.
LIST_CONTAINERS = {
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "transformer_blocks", "to_out",
    "net", "layers", "controlnet_down_blocks", "blocks", "mid_blocks",
}

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_SEGMENT = re.compile(r"^(.*)_(\d+)$")


class WeightsMismatchError(ValueError):
    """The checkpoint's tensors do not match the module (missing, unexpected or mis-shaped tensors, all listed)."""


def flax_path_to_torch_key(path: Iterable[str]) -> str:
    """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
    path = tuple(str(p) for p in path)
    parts = []
    for seg in path[:-1]:
        m = _SEGMENT.match(seg)
        if m and m.group(1) in LIST_CONTAINERS:
            parts += [m.group(1), m.group(2)]
        else:
            parts.append(seg)
    parts.append(_LEAF_TO_TORCH.get(path[-1], path[-1]))
    return ".".join(parts)


def _unbox(tree):
    return nn.meta.unbox(tree)


def _torch_to_flax_array(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and a.ndim == 4:
        return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and a.ndim == 2:
        return a.T
    return a


def _flax_to_torch_array(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and a.ndim == 4:
        return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and a.ndim == 2:
        return a.T
    return a


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Mapping, *, ignore: tuple = ()) -> dict:
    """Map a torch state dict onto the structure of `target` (params of ShapeDtypeStructs or arrays).

    Returns a nested dict of float32 numpy arrays. Raises WeightsMismatchError listing every missing, unexpected
    (not matching an `ignore` regex) and mis-shaped tensor.
    """
    flat_target = traverse_util.flatten_dict(_unbox(target))
    used, missing, misshaped, out = set(), [], [], {}
    for path, spec in flat_target.items():
        key = flax_path_to_torch_key(path)
        if key not in state_dict:
            missing.append(f"{key} (expected {tuple(spec.shape)} for {'/'.join(path)})")
            continue
        used.add(key)
        arr = _torch_to_flax_array(path[-1], np.asarray(state_dict[key]))
        if tuple(arr.shape) != tuple(spec.shape):
            misshaped.append(f"{key}: checkpoint {tuple(np.shape(state_dict[key]))} -> {tuple(arr.shape)} in flax "
                             f"layout, module expects {tuple(spec.shape)}")
            continue
        # np.array, not np.ascontiguousarray: the latter turns 0-d tensors (CLIP's logit_scale) into shape (1,).
        out[path] = np.array(arr, dtype=np.float32, order="C")
    patterns = [re.compile(p) for p in ignore]
    unexpected = sorted(k for k in state_dict if k not in used and not any(p.search(k) for p in patterns))
    if missing or unexpected or misshaped:
        lines = ["checkpoint does not match the module:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title} tensor(s):")
                lines += [f"    {s}" for s in items]
        raise WeightsMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Flax params -> torch-named, torch-layout float32 numpy arrays."""
    out = {}
    for path, v in traverse_util.flatten_dict(_unbox(params)).items():
        out[flax_path_to_torch_key(path)] = np.array(
            _flax_to_torch_array(path[-1], np.asarray(v, dtype=np.float32)), order="C")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# safetensors I/O. Parsed by hand so bf16/fp16 checkpoints load without torch (numpy has no bfloat16).

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _read_one_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dt = info["dtype"]
        buf = data[base + start:base + end]
        if dt == "BF16":
            arr = np.frombuffer(buf, dtype=ml_dtypes.bfloat16)
        elif dt in _ST_DTYPES:
            arr = np.frombuffer(buf, dtype=_ST_DTYPES[dt])
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported safetensors dtype {dt}")
        arr = arr.reshape(info["shape"])
        if np.issubdtype(arr.dtype, np.floating) or dt == "BF16":
            arr = arr.astype(np.float32)
        else:
            arr = arr.copy()
        out[name] = arr
    return out


def safetensors_files(folder: str) -> list[str]:
    """The safetensors file(s) read_safetensors would read in `folder` (paths), without reading them; raises when
    there are none, and refuses folders that hold only pickle-format weights."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"weights folder {folder!r} does not exist")
    files = os.listdir(folder)
    for name in _WEIGHT_FILES:
        if name in files:
            return [os.path.join(folder, name)]
    for name in _WEIGHT_FILES:
        if name + ".index.json" in files:
            with open(os.path.join(folder, name + ".index.json")) as f:
                index = json.load(f)
            return [os.path.join(folder, shard) for shard in sorted(set(index["weight_map"].values()))]
    # Variant files (e.g. diffusion_pytorch_model.fp16.safetensors) when no full-precision file is present.
    single = sorted(f for f in files if f.endswith(".safetensors"))
    if len(single) == 1:
        return [os.path.join(folder, single[0])]
    if len(single) > 1:
        raise ValueError(f"{folder!r} holds several .safetensors files and no index: {single}; keep one")
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{folder!r} has only pickle-format weights {pickles}; pickle formats are refused (they can run code). "
            "Convert them to safetensors once in a trusted environment, e.g. "
            "`model.save_pretrained(dir, safe_serialization=True)`.")
    raise FileNotFoundError(f"no safetensors weights in {folder!r} (expected one of {_WEIGHT_FILES})")


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """Read a component folder's weights (single or sharded safetensors); fp16/bf16 are upcast to float32."""
    out = {}
    for path in safetensors_files(folder):
        out.update(_read_one_safetensors(path))
    return out


def write_safetensors(folder: str, state_dict: Mapping[str, np.ndarray], filename: str) -> str:
    """Write float32 tensors to folder/filename with the metadata transformers/diffusers expect; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, path, metadata={"format": "pt"})
    return path


__all__ = ["LIST_CONTAINERS", "WeightsMismatchError", "flax_path_to_torch_key", "flax_to_torch", "read_safetensors",
           "safetensors_files", "torch_to_flax", "write_safetensors"]
