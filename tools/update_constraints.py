#!/usr/bin/env python3
"""Re-resolve constraints.txt (the tested, fully pinned package set) to the newest versions the ranges allow.

constraints.txt pins every package, transitive ones included, at the exact version the test suite passed with;
installs use it with `pip install -c constraints.txt -r requirements-test.txt` (see docs/install.md). This script:

  1. creates a fresh temporary venv with --python;
  2. installs requirements-test.txt, then the --no-deps packages exactly as .ci/run does (read from .ci/run), WITHOUT
     constraints.txt, so pip resolves the newest versions that requirements*.txt allow (pip's own configuration,
     e.g. a global `constraint =` in pip.conf, still applies);
  3. records the venv's package set (`pip list --format=json --exclude-editable`, i.e. `pip freeze --all` as
     name/version pairs; pip itself and codi_jax are left out; local version labels such as +cpu are dropped,
     `torch==2.13.0` matches 2.13.0+cpu under PEP 440);
  4. runs the test suite in it from the repository root (`python -m pytest -n 2 -q`, the README's test command;
     --pytest-args to run something else, e.g. a quick subset);
  5. prints a diff summary (package: old -> new) and rewrites constraints.txt ONLY if the suite passed (and not with
     --dry-run). Otherwise constraints.txt is left as it was and the failing step is named.

    python tools/update_constraints.py                                   # full suite, rewrite on success
    python tools/update_constraints.py --dry-run --pytest-args "tests/test_config.py -q"
    python tools/update_constraints.py --check                           # fast consistency check, no installs

--check only verifies, offline, that constraints.txt agrees with the ranges: every requirement of requirements.txt,
requirements-test.txt (and the files they include with -r) and of .ci/run's --no-deps install is pinned with `==` and
the pin satisfies the range; every .ci/run pip install of project requirements passes `-c constraints.txt`; and no pin
conflicts with a constraint file in pip's own configuration (`pip config list`).

Exit codes:
  0  success: the suite passed (constraints.txt rewritten, already up to date, or --dry-run), or --check found nothing
  1  the test suite failed in the fresh venv: constraints.txt untouched
  2  usage error: bad arguments, or a file the script needs is missing or unreadable
  3  an environment step failed (venv creation, pip install, listing the packages): constraints.txt untouched
  4  --check found inconsistencies (listed on stderr)

Standard library only (packaging is used when importable, else pip's vendored copy, else a simple parser).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = "constraints.txt"
REQUIREMENT_FILES = ("requirements.txt", "requirements-test.txt")
CI_SCRIPT = ".ci/run"
DEFAULT_PYTEST_ARGS = "-n 2 -q"
# Never pinned: pip is upgraded on its own by .ci/run; codi_jax is this project.
EXCLUDED = {"pip", "codi-jax"}

EXIT_OK, EXIT_TESTS_FAILED, EXIT_USAGE, EXIT_ENV_FAILED, EXIT_CHECK_FAILED = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------------------------------
# Requirement and version handling: packaging if present, else pip's vendored packaging, else a small fallback.
try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
        from pip._vendor.packaging.version import InvalidVersion, Version
    except ImportError:
        Requirement = None


def canonical(name: str) -> str:
    """PEP 503 normalised name: 'Tensorflow_CPU' -> 'tensorflow-cpu'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def strip_local(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0' (a pin without a local label matches every local build of that version)."""
    return version.split("+", 1)[0]


class _SimpleReq:
    """Fallback for `packaging.requirements.Requirement`: name, extras and comparison specifiers, no markers."""

    _OPS = ("~=", "===", "==", "!=", "<=", ">=", "<", ">")

    def __init__(self, text: str):
        text = text.split(";", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$", text)
        if not m:
            raise ValueError(f"cannot parse requirement {text!r}")
        self.name, self.marker = m.group(1), None
        self.specs = []
        for part in filter(None, (p.strip() for p in m.group(3).split(","))):
            op = next((o for o in self._OPS if part.startswith(o)), None)
            if op is None:
                raise ValueError(f"cannot parse specifier {part!r} in {text!r}")
            self.specs.append((op, part[len(op):].strip()))
        self.specifier = self

    def __str__(self):
        return ",".join(op + v for op, v in self.specs)

    def __iter__(self):
        return iter(self.specs)

    @staticmethod
    def _key(v: str):
        v = strip_local(v)
        return tuple(int(x) for x in re.findall(r"\d+", v.split("rc")[0].split("a")[0].split("b")[0])[:6])

    def contains(self, version: str, prereleases=True) -> bool:
        k = self._key(version)
        for op, want in self.specs:
            w = self._key(want.rstrip(".*"))
            n = max(len(k), len(w))
            kk, ww = k + (0,) * (n - len(k)), w + (0,) * (n - len(w))
            if want.endswith(".*"):
                ok = k[: len(w)] == w if op == "==" else k[: len(w)] != w
            else:
                ok = {"==": kk == ww, "===": version == want, "!=": kk != ww, "<=": kk <= ww, ">=": kk >= ww,
                      "<": kk < ww, ">": kk > ww,
                      "~=": kk >= ww and k[: len(w) - 1] == w[: len(w) - 1]}[op]
            if not ok:
                return False
        return True


def parse_requirement(text: str):
    """A requirement object with .name, .specifier (with .contains) and .marker."""
    if Requirement is None:
        return _SimpleReq(text)
    try:
        return Requirement(text)
    except InvalidRequirement as e:
        raise ValueError(str(e)) from None


def marker_applies(req) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": ""})


def satisfies(version: str, req) -> bool:
    if Requirement is None:
        return req.specifier.contains(version)
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


# --------------------------------------------------------------------------------------------------------------
# Reading the project's files.
def read_requirement_file(path: Path, seen=None) -> list[tuple[str, str]]:
    """[(requirement text, 'file:line')] of a requirements file, following -r includes; options are skipped."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    out = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ", "-r", "--requirement=")):
            target = re.sub(r"^(-r|--requirement)[\s=]*", "", line)
            out += read_requirement_file(path.parent / target, seen)
        elif line.startswith("-"):
            continue  # -c, -f, --index-url, ...: not requirements
        else:
            out.append((line, f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{lineno}"))
    return out


def ci_pip_installs(ci_text: str) -> list[list[str]]:
    """The argument lists (after `install`) of every `pip install` command in a shell script."""
    text = re.sub(r"\\\n", " ", ci_text)
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        for command in re.split(r"&&|\|\||;", line):
            try:
                words = shlex.split(command)
            except ValueError:
                continue
            for i in range(len(words) - 1):
                if words[i] in ("pip", "pip3") or words[i].endswith("/pip"):
                    if words[i + 1] == "install":
                        out.append(words[i + 2:])
                        break
    return out


_OPTIONS_WITH_VALUE = {"-c", "--constraint", "-r", "--requirement", "-f", "--find-links", "-i", "--index-url",
                       "--extra-index-url", "-e", "--editable", "-t", "--target", "--prefix", "--root"}


def install_targets(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(requirement words, {option: [values]}) of one pip install argument list."""
    reqs, opts, i = [], {}, 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            if "=" in a and a.split("=", 1)[0] in _OPTIONS_WITH_VALUE:
                key, value = a.split("=", 1)
                opts.setdefault(key, []).append(value)
            elif a in _OPTIONS_WITH_VALUE and i + 1 < len(args):
                opts.setdefault(a, []).append(args[i + 1])
                i += 1
            else:
                opts.setdefault(a, []).append("")
        else:
            reqs.append(a)
        i += 1
    return reqs, opts


def project_installs(ci_text: str) -> list[tuple[list[str], dict[str, list[str]]]]:
    """The .ci/run pip installs of project requirements: all but the one that only upgrades pip."""
    out = []
    for args in ci_pip_installs(ci_text):
        reqs, opts = install_targets(args)
        if not opts.get("-r") and not opts.get("--requirement") and [canonical(r) for r in reqs] == ["pip"]:
            continue
        out.append((reqs, opts))
    return out


def no_deps_requirements(ci_text: str) -> list[str]:
    """The requirements .ci/run installs with --no-deps."""
    return [r for reqs, opts in project_installs(ci_text) if "--no-deps" in opts for r in reqs]


def read_pins(path: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """({canonical name: (display name, version)}, problems) of a constraints file."""
    pins, problems = {}, []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)$", line)
        if not m:
            problems.append(f"{path.name}:{lineno}: not an exact `name==version` pin: {raw.strip()!r}")
            continue
        key = canonical(m.group(1))
        if key in pins:
            problems.append(f"{path.name}:{lineno}: {m.group(1)} pinned twice")
        pins[key] = (m.group(1), m.group(2))
    return pins, problems


# --------------------------------------------------------------------------------------------------------------
# --check
def pip_config_constraint_files(python: str) -> list[Path]:
    """Constraint files named in pip's configuration (pip.conf files and PIP_CONSTRAINT), as `pip config list` sees."""
    try:
        res = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    except (OSError, subprocess.TimeoutExpired):
        return []
    files = []
    for line in res.stdout.splitlines():
        m = re.match(r"^[^=]*\.constraints?='(.*)'$", line.strip())
        if m:
            files += [Path(p) for p in m.group(1).split() if "://" not in p or p.startswith("file://")]
    files = [Path(str(p).removeprefix("file://")) for p in files]
    ours = (ROOT / CONSTRAINTS).resolve()
    return [p for p in dict.fromkeys(files) if p.exists() and p.resolve() != ours]


def check(root: Path = ROOT, constraints: Path | None = None, pip_python: str | None = sys.executable) -> list[str]:
    """Problems found (empty when constraints.txt is consistent). pip_python=None skips pip's configured constraints."""
    constraints = constraints or root / CONSTRAINTS
    if not constraints.exists():
        return [f"{constraints} does not exist"]
    pins, problems = read_pins(constraints)

    wanted = []
    for name in REQUIREMENT_FILES:
        wanted += read_requirement_file(root / name)
    ci_text = (root / CI_SCRIPT).read_text()
    wanted += [(r, f"{CI_SCRIPT} --no-deps") for r in no_deps_requirements(ci_text)]
    for text, where in wanted:
        try:
            req = parse_requirement(text)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if not marker_applies(req):
            continue
        pin = pins.get(canonical(req.name))
        if pin is None:
            problems.append(f"{where}: {req.name} is not pinned in {constraints.name}")
        elif not satisfies(pin[1], req):
            problems.append(f"{where}: {req.name}=={pin[1]} does not satisfy {text!r}")

    for reqs, opts in project_installs(ci_text):
        if "constraints.txt" not in [Path(c).name for c in opts.get("-c", []) + opts.get("--constraint", [])]:
            problems.append(f"{CI_SCRIPT}: `pip install {' '.join(reqs or opts.get('-r', []))}` "
                            f"does not pass -c {CONSTRAINTS}")

    if pip_python:
        for path in pip_config_constraint_files(pip_python):
            for text, where in read_requirement_file(path):
                try:
                    req = parse_requirement(text)
                except ValueError:
                    continue
                pin = pins.get(canonical(req.name))
                if pin and marker_applies(req) and not satisfies(pin[1], req):
                    problems.append(f"{constraints.name}: {req.name}=={pin[1]} conflicts with pip's configured "
                                    f"constraint {text!r} ({where})")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Update
def render(pins: dict[str, tuple[str, str]], python_desc: str, today: str) -> str:
    lines = [
        "# Every package of the test install, transitive ones included, pinned at the exact version the full test",
        "# suite passed with. Use it beside the ranges of requirements*.txt (docs/install.md):",
        "#   pip install -c constraints.txt -r requirements-test.txt     (tests; .ci/run does this)",
        "#   pip install -c constraints.txt -r requirements.txt          (runtime only)",
        f"# Resolved on {python_desc}, {today}.",
        "# Regenerate (fresh venv, newest versions the ranges allow, the full suite; rewritten only if it passes):",
        "#   python tools/update_constraints.py",
        "# Local version labels are dropped: torch==2.13.0 also matches the CPU build 2.13.0+cpu (PEP 440).",
        "# Not pinned: pip (upgraded on its own), libtpu (TPU VMs only; jax[tpu]==<jax pin> selects it).",
    ]
    lines += [f"{name}=={strip_local(version)}" for _, (name, version) in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def diff_summary(old: dict[str, tuple[str, str]], new: dict[str, tuple[str, str]]) -> tuple[str, int]:
    rows, changed = [], 0
    for key in sorted(set(old) | set(new)):
        o = strip_local(old[key][1]) if key in old else None
        n = strip_local(new[key][1]) if key in new else None
        if o != n:
            changed += 1
            name = (new.get(key) or old.get(key))[0]
            rows.append(f"  {name}: {o or '(not pinned)'} -> {n or '(gone)'}")
    head = (f"{changed} of {len(set(old) | set(new))} packages differ from {CONSTRAINTS}"
            if changed else f"no package differs from {CONSTRAINTS} ({len(new)} pinned)")
    return "\n".join([head] + rows), changed


def venv_packages(python: str, env) -> dict[str, tuple[str, str]]:
    res = subprocess.run([python, "-m", "pip", "list", "--format=json", "--exclude-editable"], env=env,
                         capture_output=True, text=True, check=True)
    return {canonical(p["name"]): (p["name"], p["version"]) for p in json.loads(res.stdout)
            if canonical(p["name"]) not in EXCLUDED}


def python_description(python: str) -> str:
    code = "import platform,sys;print(f'Python {sys.version_info[0]}.{sys.version_info[1]} ({platform.system()} " \
           "{platform.machine()}, {platform.python_version()})')"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


class StepFailed(Exception):
    pass


def run_step(name: str, cmd: list[str], **kw) -> None:
    print(f"==> {name}: {' '.join(shlex.quote(str(c)) for c in cmd)}", flush=True)
    start = time.monotonic()
    res = subprocess.run([str(c) for c in cmd], **kw)
    print(f"    {name}: exit {res.returncode} after {time.monotonic() - start:.0f} s", flush=True)
    if res.returncode != 0:
        raise StepFailed(name)


def update(args) -> int:
    constraints = ROOT / CONSTRAINTS
    try:
        old, problems = read_pins(constraints) if constraints.exists() else ({}, [])
        no_deps = no_deps_requirements((ROOT / CI_SCRIPT).read_text())
        for name in REQUIREMENT_FILES:
            (ROOT / name).read_text()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)

    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    for var in ("PIP_CONSTRAINT", "PIP_CONSTRAINTS"):
        # Our own file must not steer the resolution; other constraint files (pip.conf, the machine's) still apply.
        kept = [p for p in env.get(var, "").split() if Path(p).resolve() != constraints.resolve()]
        env.pop(var, None)
        if kept:
            env[var] = " ".join(kept)
    for var in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH"):
        env.pop(var, None)

    workdir = Path(tempfile.mkdtemp(prefix="update-constraints-"))
    venv = workdir / "venv"
    vpy = venv / "bin" / "python"
    venv_env = dict(env, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    pip = [vpy, "-m", "pip", "install", "-q"]
    new, step = None, "create venv"
    start = time.monotonic()
    try:
        run_step(step, [args.python, "-m", "venv", venv], env=env)
        step = "upgrade pip"
        run_step(step, pip + ["--upgrade", "pip"], env=venv_env, cwd=ROOT)
        step = "install requirements-test.txt"
        run_step(step, pip + ["-r", "requirements-test.txt"], env=venv_env, cwd=ROOT)
        if no_deps:
            step = "install --no-deps " + " ".join(no_deps)
            run_step(step, pip + ["--no-deps"] + no_deps, env=venv_env, cwd=ROOT)
        print(f"    installed in {time.monotonic() - start:.0f} s", flush=True)
        step = "list packages"
        new = venv_packages(str(vpy), venv_env)
        python_desc = python_description(str(vpy))
        step = "test suite"
        run_step(step, [vpy, "-m", "pytest"] + shlex.split(args.pytest_args), env=venv_env, cwd=ROOT)
        step = None
    except StepFailed:
        pass
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"    {step}: {e}", flush=True)
    finally:
        if args.keep_venv:
            print(f"venv kept: {venv}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if new is not None:
        summary, changed = diff_summary(old, new)
        print(summary)
    if step is not None:
        print(f"FAILED at step: {step}. {CONSTRAINTS} left untouched.")
        return EXIT_TESTS_FAILED if step == "test suite" else EXIT_ENV_FAILED
    if args.dry_run:
        print(f"suite passed; --dry-run: {CONSTRAINTS} not written.")
    elif changed == 0 and constraints.exists():
        print(f"suite passed; {CONSTRAINTS} already up to date (not rewritten).")
    else:
        constraints.write_text(render(new, python_desc, datetime.date.today().isoformat()))
        print(f"suite passed; {CONSTRAINTS} rewritten ({len(new)} pins). Review with: git diff {CONSTRAINTS}")
    return EXIT_OK


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 ok, 1 suite failed, 2 usage, 3 install step failed, "
                                            "4 --check found problems.")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the fresh venv (default: this one, %(default)s)")
    parser.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS,
                        help="arguments for `python -m pytest` in the venv (default: %(default)r)")
    parser.add_argument("--keep-venv", action="store_true", help="keep the temporary venv and print its path")
    parser.add_argument("--dry-run", action="store_true", help="resolve, test and show the diff; never write")
    parser.add_argument("--check", action="store_true",
                        help="only check constraints.txt against requirements*.txt and .ci/run (no installs)")
    args = parser.parse_args(argv)
    if args.check:
        try:
            problems = check()
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            return EXIT_CHECK_FAILED
        print(f"{CONSTRAINTS} is consistent with {', '.join(REQUIREMENT_FILES)} and {CI_SCRIPT}")
        return EXIT_OK
    return update(args)


if __name__ == "__main__":
    sys.exit(main())
