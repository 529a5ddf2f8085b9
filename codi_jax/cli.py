"""Command-line mistakes in one line: a missing config file, an unknown variant, a misspelt --config.key, a bad value.

ml_collections reports these as tracebacks, some only when the config is first read (after JAX has started), with
the "did you mean" hint inside an escaped repr. Both entry points (codi_jax.main, codi_jax.evaluate) go through
`flags_parser` (for app.run) and `config`, which print `error: ...` and exit with status 2 before any work.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys

from absl import flags

from codi_jax import config as config_lib

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
        fail(_flag_error(e, spec))


def _flag_error(error: Exception, spec: str | None) -> str:
    """absl's 'flag --name=value: message'; for --config, config_flags puts the config module's own traceback in the
    message, whose last line (less the exception's type) is what went wrong."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) == 1:
        return lines[0].removeprefix("flag ")
    message = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
    name = re.match(r"flag (--[\w.]+)", lines[0])
    if name and name.group(1) == "--config" and spec:
        return f"--config={spec}: {message}"
    return f"{name.group(1)}: {message}" if name else message


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
                hint = (f"; did you mean {'.'.join(walked + near)!r}?" if near
                        else f" (fields: {', '.join(sorted(fields))})")
                return f"--config.{key}={value}: {where} has no field {part!r}{hint}"
            node, walked = node[part], walked + [part]
    return None


def config(flag_values=None, argv=None):
    """The finalized config of --config, or one line (status 2) naming what is wrong with it."""
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
