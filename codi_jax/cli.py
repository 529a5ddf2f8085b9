"""Command-line mistakes in one line: a missing config file, an unknown variant, a misspelt --config.key, a bad value.

ml_collections reports these as tracebacks, some only when the config is first read (after JAX has started), with
the "did you mean" hint inside an escaped repr. Both entry points (codi_jax.main, codi_jax.evaluate) go through
`flags_parser` (for app.run) and `config`, which print `error: ...` and exit with status 2 before any work.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import flags

USAGE_ERROR = 2


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def _config_arg(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv) -> list[tuple[str, str]]:
    out = []
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
            out.append((key, value))
    return out


def flags_parser(argv):
    """app.run's flags_parser: the config file must exist, and absl's flag errors become one line."""
    spec = _config_arg(argv)
    if spec:
        path = spec.split(":", 1)[0]
        if not os.path.isfile(path):
            fail(f"--config={spec}: no such config file {path!r} (the configs are in configs/, e.g. "
                 "configs/depth.py:tiny)")
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # An override that does not fit the config (config_flags applies them while parsing).
        fail(_explain_override(argv) or " ".join(str(e).split()))
    except flags.Error as e:
        # config_flags wraps the config module's own error in a traceback; its last line is the message.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = lines[-1] if lines else str(e)
        flag = lines[0].split(":", 1)[0] if lines and lines[0].startswith("flag ") else ""
        fail(f"{flag.removeprefix('flag ')}: {message}" if flag and message != lines[0] else message)


def _base_config(spec: str):
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("codi_jax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _explain_override(argv) -> str | None:
    """Which --config.key=value does not fit the config, and the nearest existing key at that level."""
    spec = _config_arg(argv)
    if not spec:
        return None
    try:
        base = _base_config(spec)
    except Exception:  # noqa: BLE001 - then the override is not the problem; the caller reports the original error
        return None
    for key, value in _overrides(argv):
        node, walked = base, []
        for part in key.split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else None
            if fields is None:
                return (f"--config.{key}={value}: config.{'.'.join(walked)} is a "
                        f"{type(node).__name__}, it has no field {part!r}")
            if part not in fields:
                near = difflib.get_close_matches(part, fields, n=1)
                where = f"config.{'.'.join(walked)}" if walked else "the config"
                hint = f"; did you mean {'.'.join(walked + near)!r}?" if near else f" (fields: {', '.join(sorted(fields))})"
                return f"--config.{key}={value}: {where} has no field {part!r}{hint}"
            node, walked = node[part], walked + [part]
    return None


def config(flag_values=None, argv=None):
    """The finalized config of --config, or one line (status 2) naming what is wrong with it."""
    from codi_jax import config as config_lib

    flag_values = flag_values or flags.FLAGS
    argv = list(sys.argv if argv is None else argv)
    try:
        raw = flag_values.config
    except Exception as e:  # noqa: BLE001 - ml_collections raises KeyError/AttributeError/IOError/TypeError here
        fail(_explain_override(argv) or " ".join(str(e).split()))
    try:
        return config_lib.finalize(raw)
    except ValueError as e:
        fail(str(e))
