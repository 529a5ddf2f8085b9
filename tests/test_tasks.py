"""The task table (codi_jax/tasks): one row per task file, read by config, data, evaluate, export and sample, which
compare no task name themselves; importable before JAX."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from codi_jax import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources():
    for folder in ("codi_jax", "configs", "benchmarks", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if os.path.join("codi_jax", "tasks") in dirpath:
                continue  # the table itself
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def _names(node) -> set[str]:
    """Task names among the string constants of a comparator (a constant, or a tuple/list/set of them)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in tasks.TASKS}


def _task_literals(path: str) -> list[str]:
    """`<...task...> == 'sr'`, `task in ('t2i', 'depth')`, and dicts keyed by task names: the table's job."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names(o) for o in operands) and any("task" in ast.unparse(o) for o in operands):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict):
            keys = [k for k in node.keys if k is not None]
            if len(keys) >= 2 and all(_names(k) for k in keys):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: a dict keyed by task names")
    return found


def test_no_task_name_comparison_outside_the_table():
    found = [hit for path in _sources() for hit in _task_literals(path)]
    assert not found, "ask the task table (codi_jax/tasks) instead:\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('if config.task == "sr":\n    pass\nok = spec.task in ("t2i", "depth")\n'
                   'TAGS = {"depth": 1, "sr": 2}\nkind = "depth" if x else "disparity"\n')
    assert len(_task_literals(str(bad))) == 3


def test_every_task_file_is_a_row():
    files = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "codi_jax", "tasks"))
                   if f.endswith(".py") and f not in ("__init__.py", "base.py", "inputs.py"))
    assert sorted(tasks.TASKS) == files
    for name, task in tasks.TABLE.items():
        assert task.name == name and task.summary and task.tag
        if task.conditional:
            assert task.condition is not None and task.sample_condition is not None and task.sample_input, name
        assert set(task.metric_directions) >= {m for r in task.readers for m in r.metrics}, name
        assert set(task.metric_directions) >= set(task.segmenter_metrics), name


@pytest.mark.parametrize("name", [n for n in tasks.TASKS if tasks.get(n).conditional])
def test_condition_has_the_tables_channels_and_range(name):
    rng = np.random.default_rng(0)
    rec = {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "caption": "a red cube",
           "depth": rng.uniform(1, 5, (32, 32)).astype(np.float32),
           "input_image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    ex = tasks.make_example(name, rec, np.random.default_rng(1), extras=True)
    assert ex["cond"].shape == (32, 32, tasks.get(name).channels) and ex["cond"].dtype == np.float32
    assert -1.0 <= ex["cond"].min() and ex["cond"].max() <= 1.0
    lean = tasks.make_example(name, rec, np.random.default_rng(1))
    assert set(lean) == {"image", "cond", "caption"}  # training's batches carry no metric extras
    assert np.array_equal(lean["cond"], ex["cond"])
    extras = {k: v[None] for k, v in ex.items() if k not in ("image", "cond", "caption")}
    shown = tasks.get(name).show(ex["cond"][None], extras)  # the sample grid's condition column
    assert shown.shape == (1, 32, 32, 3) and shown.dtype == np.uint8


def test_sr_grid_shows_the_lowres_input_not_its_bicubic_upsampling():
    rng = np.random.default_rng(0)
    rec = {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "caption": "a red cube"}
    ex = tasks.make_example("sr", rec, np.random.default_rng(1), options=tasks.Options(sr_degradation="bicubic"),
                            extras=True)
    shown = tasks.sr.TASK.show(ex["cond"][None], {"lowres": ex["lowres"][None]})[0]
    assert np.array_equal(shown[::4, ::4], np.round(ex["lowres"] * 255).astype(np.uint8))  # each input pixel
    assert (shown[0::4, 0::4] == shown[3::4, 3::4]).all()  # repeated over its 4x4 block
    assert np.abs(shown.astype(int) - tasks.to_uint8(ex["cond"][None])[0]).mean() > 1  # not the bicubic column


def test_unknown_task_is_one_line_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"task 'depht' is not one of \('depth', 'edit'"):
        tasks.get("depht")


def test_the_table_imports_no_jax():
    code = "import sys, codi_jax.tasks, codi_jax.config; print('jax' in sys.modules, 'grain.python' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_task_defaults_reach_the_config():
    """A task's own defaults (tasks/<task>.py) apply at their scale, and only to that task."""
    from codi_jax import config as config_lib

    def build(task, arg=None):
        c = config_lib.base(task)
        config_lib.apply_variants(c, arg)
        return c

    assert build("sr", "tiny").data.sr_degradation == "bicubic"
    assert build("sr").data.sr_degradation == "realesrgan"  # Stable Diffusion scale: real-world degradations
    assert build("depth", "tiny").data.sr_degradation == "realesrgan"
