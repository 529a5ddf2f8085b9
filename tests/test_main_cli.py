"""python -m codi_jax.main as a user types it: --help (variants, modes, tasks, fields; no JAX) and --check (the config
validated as a run would, before anything starts), each in a subprocess that reports what it imported."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from codi_jax import cli
from codi_jax import config as config_lib
from codi_jax import modes

ROOT = Path(__file__).resolve().parents[1]

# Runs codi_jax.main with the given argv, then reports on stderr, as JSON after a marker: the exit status, which heavy
# modules were imported, and whether any JAX backend (a device) was initialised.
PROBE = """
import json, runpy, sys
sys.argv = ["codi_jax.main", *json.loads(sys.argv[1])]
rc = 0
try:
    runpy.run_module("codi_jax.main", run_name="__main__")
except SystemExit as e:
    rc = 0 if e.code is None else e.code
backends = False
if "jax" in sys.modules:
    from jax._src import xla_bridge
    backends = xla_bridge.backends_are_initialized()
heavy = [m for m in ("flax", "grain", "jax", "tensorflow", "codi_jax.recipes", "codi_jax.train") if m in sys.modules]
print("PROBE" + json.dumps({"rc": rc, "heavy": heavy, "backends": backends}), file=sys.stderr)
"""


def run_main(*argv):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(argv))], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    marker = [line for line in proc.stderr.splitlines() if line.startswith("PROBE")]
    assert marker, proc.stderr
    report = json.loads(marker[-1][len("PROBE"):])
    stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("PROBE"))
    return report, proc.stdout, stderr


def depth_config(arg=None):
    spec = importlib.util.spec_from_file_location("depth_config_for_test", ROOT / "configs" / "depth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def help_run():
    return run_main("--help")


def test_help_answers_without_jax(help_run):
    report, out, err = help_run
    assert report["rc"] == 0, err
    assert report["heavy"] == [] and not report["backends"]  # nothing that takes seconds to import
    assert out.startswith("usage: python -m codi_jax.main --config=")
    for flag in ("--config", "--workdir", "--check", "--helpfull"):
        assert re.search(rf"^  {flag}\b", out, re.M), flag


def test_help_lists_every_variant_apply_variants_accepts(help_run):
    _, out, _ = help_run
    section = out.split("variants (")[1].split("\n\n")[0]
    listed = re.findall(r"^  (\S+)", section, re.M)
    # The names apply_variants itself gives when it refuses one: the help must list exactly those.
    with pytest.raises(ValueError) as refused:
        config_lib.apply_variants(config_lib.base("depth"), "no-such-variant")
    known = re.search(r"\(known: ([^)]*)\)", str(refused.value)).group(1).split(", ")
    assert [name.split("=")[0] + ("=" if "=" in name else "") for name in listed] == known
    # Each listed variant is accepted as the help writes it (placeholders filled in).
    for name in listed:
        c = config_lib.base("depth")
        config_lib.apply_variants(c, name.replace("NAME", "finetune").replace("=N", "=8"))
    assert "Embedded default" in section  # the tiny variant's own docstring


def test_help_lists_modes_and_tasks(help_run):
    _, out, _ = help_run
    for name, spec in modes.TABLE.items():
        assert re.search(rf"^  {name} +{re.escape(spec.summary[:40])}", out, re.M), name
    tasks = re.search(r"^tasks .*: (.*)$", out, re.M).group(1).split(", ")
    assert tasks == list(config_lib.TASKS)


def test_help_field_defaults_are_the_configs(help_run):
    """The defaults --help shows are read from the source; they must be exactly what configs/depth.py gives."""
    _, out, _ = help_run
    c = depth_config()
    for field in cli.HELP_FIELDS:
        node = c
        for part in field.split("."):
            node = node[part]
        assert f"  {field} = {node!r}" in out, (field, node)
    assert "data.image_size = 0" in out and "teacher = ''" in out  # the teacher's to fill, at SD scale


def test_check_refuses_a_config_without_teacher_in_one_line():
    report, out, err = run_main("--check", "--config=configs/depth.py", "--workdir=/nonexistent/run",
                                "--config.data.dataset=folder", "--config.data.data_dir=/nonexistent/images")
    assert report["rc"] == 2 and out == ""
    assert err.strip().startswith("error: config.teacher:") and "--config.teacher=" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "codi_jax.train" not in report["heavy"] and not report["backends"]


def test_check_refuses_a_bad_mode_in_one_line():
    report, out, err = run_main("--check", "--config=configs/depth.py", "--workdir=w", "--config.mode=codii")
    assert report["rc"] == 2 and err.strip().startswith("error: config.mode: 'codii'"), err
    assert len(err.strip().splitlines()) == 1


def test_check_passes_paths_that_exist_only_on_the_workers():
    # A teacher folder and data on the workers (or in GCS): the launching machine has neither.
    report, out, err = run_main("--check", "--config=configs/depth.py", "--workdir=gs://bucket/run",
                                "--config.teacher=/nonexistent/stable-diffusion-v1-5", "--config.data.dataset=folder",
                                "--config.data.data_dir=gs://bucket/depth-images", "--config.batch_size=64")
    assert report["rc"] == 0, err
    (line,) = out.strip().splitlines()
    assert line.startswith("config ok: task depth, mode codi, teacher /nonexistent/stable-diffusion-v1-5, "
                           "dataset folder gs://bucket/depth-images, image size from the teacher"), line
    assert "batch 64" in line
    assert "codi_jax.train" not in report["heavy"] and not report["backends"]  # no trainer, no device


def test_a_run_reads_the_teacher_before_any_device():
    # Without --check the same config is resolved against the teacher folder, which must exist: one line, status 2,
    # before the trainer is imported or a device starts.
    report, out, err = run_main("--config=configs/depth.py", "--workdir=/nonexistent/run",
                                "--config.teacher=/nonexistent/stable-diffusion-v1-5", "--config.data.dataset=folder",
                                "--config.data.data_dir=/nonexistent/images")
    assert report["rc"] == 2, err
    assert err.strip().startswith("error: config.teacher: '/nonexistent/stable-diffusion-v1-5'"), err
    assert "codi_jax.train" not in report["heavy"] and not report["backends"]


def test_an_evaluation_that_cannot_run_is_refused_before_training(tmp_path):
    # run_eval with a held-out set too small for eval.num_examples: the refusal comes before any training (it used to
    # come after it), in one line with status 2, and the workdir is not created.
    workdir = tmp_path / "run"
    report, out, err = run_main("--config=configs/depth.py:tiny", f"--workdir={workdir}",
                                "--config.eval.num_examples=1500")
    assert report["rc"] == 2, err
    assert err.strip().startswith("error: eval.num_examples=1500 with eval.noise_floor=True needs 3000 held-out "
                                  "records, and the test split (eval.split) has 2000"), err
    assert "codi_jax.train" not in report["heavy"] and not report["backends"] and not workdir.exists()
