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


def flag_value(argv, name: str) -> str | None:
    """The value of --name=value or --name value in argv, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg[len(name) + 3:]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_arg(argv) -> str | None:
    return flag_value(argv, "config")


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
        problem = override_problem(base, key, value)
        if problem:
            return problem
    return None


def override_problem(config, key: str, value: str, root: str = "the config") -> str | None:
    """Which part of --config.key=value names no field of `config`, with the nearest field at that level; None if
    the key exists."""
    node, walked = config, []
    for part in key.split("."):
        fields = list(node.keys()) if hasattr(node, "keys") else None
        if fields is None:
            return (f"--config.{key}={value}: config.{'.'.join(walked)} is a "
                    f"{type(node).__name__}, it has no field {part!r}")
        if part not in fields:
            near = difflib.get_close_matches(part, fields, n=1)
            where = f"config.{'.'.join(walked)}" if walked else root
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


def resolve(c, *, check_paths: bool = True):
    """config.resolve (the teacher's fields, what a run cannot go without) as one line and status 2 on a mistake.
    check_paths=False (main --check, the launch scripts) reads no folder: a launch machine may not see the workers'
    teacher or data paths."""
    try:
        return config_lib.resolve(c, check_paths=check_paths)
    except ValueError as e:
        fail(str(e))


def summary(c) -> str:
    """One line for `main --check`: what the run would train, on what, from what."""
    data = c.data
    if data.dataset == "folder":
        dataset = f"folder {data.data_dir}"
    elif data.dataset == "tfds":
        dataset = f"tfds {data.tfds_name}" + (f" in {data.data_dir}" if data.data_dir else "")
    else:
        dataset = data.dataset or "none"
    teacher_defines = "from the teacher" if c.teacher else "unset"
    parts = [f"task {c.task}", f"mode {c.mode}", f"teacher {c.teacher or 'none'}"]
    if c.init_from:
        parts.append(f"init_from {c.init_from}")
    parts += [f"dataset {dataset}",
              f"image size {data.image_size or teacher_defines}",
              f"tokenizer {data.tokenizer or teacher_defines}",
              f"prediction type {c.model.prediction_type or teacher_defines}",
              f"batch {c.batch_size}" + (f" ({c.optimizer.grad_accum_steps} micro-batches)"
                                         if c.optimizer.grad_accum_steps > 1 else ""),
              f"{c.total_steps} steps", f"{c.dtype}" + (", remat" if c.remat else "")]
    return "config ok: " + ", ".join(parts)


# --- python -m codi_jax.main --help ------------------------------------------------------------------------------
# Read from the source that defines each thing (config.apply_variants, config.base, data.default_config, the
# objectives' field table, the mode table), so the help cannot drift from the code. The defaults are parsed, not
# imported: the modules that build them import JAX, and --help must answer at once.

_PACKAGE = os.path.dirname(os.path.abspath(__file__))

# The fields a user sets most, in the order shown; their defaults and descriptions come from the source.
HELP_FIELDS = (
    "teacher", "init_from", "mode", "batch_size", "total_steps", "seed",
    "data.dataset", "data.data_dir", "data.tfds_name", "data.image_size", "data.tokenizer", "data.max_length",
    "model.prediction_type", "dtype", "remat", "optimizer.learning_rate", "optimizer.grad_accum_steps", "mesh.fsdp",
    "objective.pf_ode", "objective.consistency_space", "objective.distill_steps", "ema_decay",
    "checkpoint_every", "log_every", "sample_every", "run_eval",
    "eval.split", "eval.num_examples", "eval.batch_size", "eval.steps", "eval.guidance_scale",
)


def _parse(relpath: str):
    import ast

    path = os.path.join(_PACKAGE, relpath)
    with open(path) as f:
        text = f.read()
    return ast.parse(text), text.splitlines()


def _function(tree, name: str):
    import ast

    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _constants(relpath: str) -> dict:
    """Module-level NAME = literal assignments of a package file."""
    import ast

    tree, _ = _parse(relpath)
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def _namespace(tree, relpath: str, **extra) -> dict:
    """Names an expression of `relpath` may use: its own constants and those of the package modules it imports."""
    import ast
    import types

    ns = dict(_constants(relpath), **extra)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("codi_jax"):
            for alias in node.names:
                sub = os.path.join(*node.module.split(".")[1:], f"{alias.name}.py")
                if os.path.isfile(os.path.join(_PACKAGE, sub)):
                    ns[alias.asname or alias.name] = types.SimpleNamespace(**_constants(sub))
                elif f"{node.module}.{alias.name}" in _JAX_FREE:  # imported for real: it starts no JAX
                    import importlib

                    ns[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
    return ns


# Packages that config.py's defaults read and that import no JAX (tests/test_tasks.py checks the task table's).
_JAX_FREE = ("codi_jax.tasks",)


def _comment(line: str) -> str:
    """The trailing comment of a source line ('' if none); a '#' inside a string does not count."""
    import io
    import tokenize

    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        pass
    return ""


def _assignments(func, lines, ns) -> dict:
    """field -> (value, trailing comment, comment block above) of every top-level `c.a.b = ...` in a config-building
    function; later ones win. A value that cannot be worked out from the source alone is shown as its source text."""
    import ast

    out = {}

    def value_of(node):
        try:
            return ast.literal_eval(node)
        except ValueError:
            pass
        try:
            return eval(compile(ast.Expression(node), "<config source>", "eval"), {"__builtins__": {}}, dict(ns))
        except Exception:  # noqa: BLE001 - then the source text says what the default is
            return _Source(ast.get_source_segment("\n".join(lines), node))

    for stmt in func.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
            continue
        path, node = [], stmt.targets[0]
        while isinstance(node, ast.Attribute):
            path.insert(0, node.attr)
            node = node.value
        if not (isinstance(node, ast.Name) and node.id == "c" and path):
            continue
        # The comment block above the statement, or above the run of uncommented assignments of the same group that
        # it ends (one comment often explains a few lines).
        above, group = [], f"c.{path[0]}" if len(path) > 1 else None
        for line in reversed(lines[:stmt.lineno - 1]):
            text = line.strip()
            if text.startswith("#"):
                above.insert(0, text.lstrip("#").strip())
            elif above or not (group and text.startswith(group + ".") and not _comment(text)):
                break
        v = stmt.value
        if (isinstance(v, ast.Call) and getattr(v.func, "attr", getattr(v.func, "id", "")) == "ConfigDict"
                and v.args and isinstance(v.args[0], ast.Dict)):
            for k, sub in zip(v.args[0].keys, v.args[0].values):
                if isinstance(k, ast.Constant):
                    out[".".join(path + [k.value])] = (value_of(sub), "", " ".join(above))
            continue
        out[".".join(path)] = (value_of(v), _comment(lines[stmt.lineno - 1]), " ".join(above))
    return out


class _Source(str):
    """A default shown as the source text that computes it."""

    def __repr__(self):
        return str(self)


def field_defaults(task: str = "depth") -> dict:
    """field -> (default, description) of config.base(task) as its source writes it, the data and objective groups
    included; what `--help` lists."""
    import ast

    tree, lines = _parse("config.py")
    out = {}
    data_tree, data_lines = _parse(os.path.join("data", "pipeline.py"))
    data = _assignments(_function(data_tree, "default_config"), data_lines,
                        _namespace(data_tree, os.path.join("data", "pipeline.py")))
    out.update({f"data.{k}": (value, trailing or above) for k, (value, trailing, above) in data.items()})
    obj_tree, _ = _parse(os.path.join("diffusion", "objectives.py"))
    table = next(n for n in obj_tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_FIELDS")
    for name, default, doc in ast.literal_eval(table.value):
        out[f"objective.{name}"] = (default, doc)
    for field, (value, trailing, above) in _assignments(_function(tree, "base"), lines,
                                                        _namespace(tree, "config.py", task=task)).items():
        # Said on the line itself, else by the group that defines the field and the comment above the line.
        defined = out.get(field, (None, ""))[1]
        out[field] = (value, trailing or "; ".join(filter(None, (defined, above))) or _FIELD_NOTES.get(field, ""))
    return out


# For the listed fields whose source says nothing about them.
_FIELD_NOTES = {
    "mode": "what is trained: one of the modes above",
    "total_steps": "optimizer steps of the run",
    "seed": "parameter initialisation, data order and noise",
    "remat": "recompute each block's activations in the backward pass (less memory, ~1/3 more compute)",
    "optimizer.learning_rate": "AdamW learning rate (optimizer.schedule: constant or cosine after warmup)",
    "ema_decay": "decay of the exported EMA of the weights",
    "checkpoint_every": "steps between checkpoints in the workdir (the run resumes from the latest)",
    "log_every": "steps between logged metrics",
    "eval.num_examples": "held-out examples each evaluated row is scored on",
    "eval.batch_size": "evaluation batch",
    "eval.steps": "sampling steps of the evaluated rows",
}


def variants() -> list[tuple[str, str]]:
    """(variant, what it does) for every variant config.apply_variants accepts, read from its source."""
    import ast
    import inspect

    func = ast.parse(inspect.getsource(config_lib.apply_variants)).body[0]
    out = []

    def effect(body) -> str:
        stmt = body[0]
        if isinstance(stmt, ast.Pass):
            return "the default (changes nothing)"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name):
            doc = inspect.getdoc(getattr(config_lib, stmt.value.func.id)) or stmt.value.func.id
            return " ".join(doc.split())
        if isinstance(stmt, ast.Assign):
            return f"sets {ast.unparse(stmt.targets[0]).removeprefix('c.')} = {ast.unparse(stmt.value)}"
        return ast.unparse(stmt)

    def walk(node, var):
        for n in ast.walk(node):
            if not isinstance(n, ast.If):
                continue
            t = n.test
            if (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == var
                    and isinstance(t.ops[0], ast.Eq) and isinstance(t.comparators[0], ast.Constant)):
                name = t.comparators[0].value
                if var == "token":
                    out.append((name, effect(n.body)))
                else:
                    what = effect(n.body)
                    placeholder = "N" if "int(value)" in what else "NAME"
                    out.append((f"{name}={placeholder}", what.replace("value", placeholder)))

    loop = next(n for n in ast.walk(func) if isinstance(n, ast.For))
    walk(loop, "token")
    walk(loop, "key")
    return out


def _wrap(name: str, text: str, width: int = 24) -> list[str]:
    import textwrap

    return textwrap.wrap(text, 118, initial_indent=f"  {name:<{width - 2}} ", subsequent_indent=" " * (width + 1),
                         break_on_hyphens=False) or [f"  {name}"]


def main_help(flag_values=None) -> str:
    """`python -m codi_jax.main --help`: usage, flags, config files, variants, modes, tasks, the most-used fields."""
    import glob

    from codi_jax import modes

    flag_values = flag_values or flags.FLAGS
    lines = ["usage: python -m codi_jax.main --config=configs/TASK.py[:VARIANT,...] --workdir=DIR "
             "[--config.FIELD=VALUE ...] [--check]", "",
             "Trains (or resumes from --workdir) the run the config describes, then exports it (and evaluates it "
             "with config.run_eval).", "", "flags:"]
    for name in ("config", "workdir", "check"):
        if name in flag_values:
            lines += _wrap(f"--{name}", flag_values[name].help)
    lines += _wrap("--config.FIELD=VALUE", "override any config field (the config is locked: a misspelt field "
                                           "fails, naming the nearest one)")
    lines += [*_wrap("--helpfull", "every flag, absl's included"), ""]
    configs = sorted(glob.glob(os.path.join(os.path.dirname(_PACKAGE), "configs", "*.py")))
    if configs:
        lines.append("config files (configs/):")
        for path in configs:
            with open(path) as f:
                first = (f.read().split('"""')[1:2] or [""])[0].strip().splitlines()
            lines += _wrap(os.path.basename(path), first[0] if first else "")
        lines.append("")
    lines.append("variants (after the colon, comma-separated: configs/depth.py:tiny,pe):")
    for name, what in variants():
        lines += _wrap(name, what)
    lines += ["", "modes (--config.mode=NAME or the variant mode=NAME):"]
    for name, spec in modes.TABLE.items():
        lines += _wrap(name, spec.summary)
    lines += ["", f"tasks (config.task, one config file each): {', '.join(config_lib.TASKS)}", "",
              "most-used fields (--config.FIELD=VALUE), with the default of configs/depth.py (no variant); '' and 0 "
              "mark what a run takes from the teacher folder or must be given:"]
    defaults = field_defaults()
    for field in HELP_FIELDS:
        if field in defaults:
            value, doc = defaults[field]
            lines += _wrap(f"{field} = {value!r}", doc, width=34)
    lines += ["", "Every field, with its value: python -c \"import sys; sys.path.insert(0, 'configs'); "
                  "import depth; print(depth.get_config())\""]
    return "\n".join(lines)
