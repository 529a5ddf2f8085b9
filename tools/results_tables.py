"""The tables in README.md and docs/*.md that quote benchmarks/results/*.json, generated from those JSONs.

A quoted table sits between two markers, and everything between them is this script's output:

    <!-- results: sr_val_defaults -->
    | ... the table ...
    <!-- end results -->

    python tools/results_tables.py            # rewrites every marked table from its JSON
    python tools/results_tables.py --check    # exit 1 and name each table that differs from its JSON

tests/test_results_tables.py runs the check, so a number typed into a marked table by hand, or a JSON re-measured
without regenerating the tables, fails CI. A table's name is a key of TABLES below: what it reads and how it prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
DOCS = ("README.md", "docs")
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end results -->)", re.S)


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def fmt(value, digits: int) -> str:
    """`digits` significant digits for values under 1, else `digits` - (integer digits) decimals (at least 1), so
    98.23 -> 98.2, 25.2147 -> 25.21, 0.05268 -> 0.0527 at digits=3 or 4 as the column asks."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    value = float(value)
    if abs(value) >= 1:
        decimals = max(digits - len(str(int(abs(value)))), 1)
        return f"{value:.{decimals}f}"
    return f"{value:#.{digits}g}" if value else "0"


def cell(row: dict, metric: str, digits: int, ci: bool) -> str:
    if metric not in row:
        return ""
    text = fmt(row[metric], digits)
    interval = row.get(f"{metric}_ci")
    if ci and interval:
        text += f" [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"
    return text


def report_table(json_name: str, rows: list[tuple[str, str, str]], columns: list[tuple[str, str, int, bool]],
                 first: str) -> str:
    """A markdown table of an evaluation report (codi_jax.evaluate's JSON): rows (label, report key, steps or '-')
    by columns (header, metric, digits, with interval)."""
    report = load(json_name)
    lines = ["| " + " | ".join([first] + [c[0] for c in columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for label, key, steps in rows:
        row = report[key][steps]
        lines.append("| " + " | ".join([label] + [cell(row, m, d, ci) for _, m, d, ci in columns]) + " |")
    return "\n".join(lines) + "\n"


SR_COLUMNS = [("FID", "fid", 3, False), ("KID", "kid", 3, True), ("PSNR (Y)", "psnr_y", 4, True),
              ("SSIM (Y)", "ssim_y", 3, False), ("LR RMSE", "lr_rmse", 3, True),
              ("caption colours", "caption_colour_recall", 3, True)]
SR_REFERENCES = [("reference: bicubic (the input upsampled)", "bicubic (the input upsampled)", "-"),
                 ("reference: the text-only teacher, DDIM 50", "teacher (text only)", "50"),
                 ("reference: ground truth through the VAE", "ground truth via VAE", "-")]


def sr_val_defaults() -> str:
    return report_table("table2_sr_val_defaults.json", [
        ("default: x space, teacher's PF-ODE, t per example", "codi", "4"),
        ("the paper's online PF-ODE (eq. 14)", "codi_online_pfode", "4"),
        ("one t per batch", "codi_per_batch_t", "4"),
        ("eps space (eq. 15 with eq. 14: the paper's whole form)", "codi_eps_space", "4"),
        *SR_REFERENCES], SR_COLUMNS, "CoDi at 4 steps")


def sr_inputs() -> str:
    data = load("sr_inputs.json")
    lines = ["| the condition at 32 px | PSNR (Y) | SSIM (Y) | caption colours found |", "|---|---|---|---|"]
    for label, row in data["rows"].items():
        label = label.replace("realesrgan", "Real-ESRGAN")
        lines.append(f"| {label} | {cell(row, 'psnr_y', 4, True)} | {cell(row, 'ssim_y', 3, False)} | "
                     f"{cell(row, 'caption_colour_recall', 3, True)} |")
    return "\n".join(lines) + "\n"


REFERENCE_ROWS = ("ground truth", "ground truth via VAE", "bicubic (the input upsampled)", "teacher (text only)")


def _same_held_out(name: str, other: dict, panel: dict) -> None:
    """A further invocation of the SR panel's evaluation compares with it only if its reference rows are the panel's
    to the digit (read back from the evaluation cache): the same held-out set, teacher and readers."""
    for key in REFERENCE_ROWS:
        assert other[key] == panel[key], f"{name}'s {key!r} row differs from table2_sr.json's: not the same held-out set"


def _table2():
    """benchmarks/table2.py as a module: its gap_closed and the paper's figures."""
    spec = importlib.util.spec_from_file_location("table2", os.path.join(REPO, "benchmarks", "table2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sr_table2(columns=tuple(SR_COLUMNS[:5])) -> str:
    """The miniature Table 2/3 SR panel: every method at 4 steps and its share of the fine-tuned teacher's FID gap
    (benchmarks/table2.py's gap_closed) beside the paper's. The frozen-UNet methods were scored by a second invocation
    on the same held-out set (its reference rows read back from the evaluation cache), table2_sr_frozen.json, and
    join the table when it exists."""
    table2 = _table2()
    report = load("table2_sr.json")
    if os.path.exists(os.path.join(RESULTS, "table2_sr_frozen.json")):
        frozen = load("table2_sr_frozen.json")
        _same_held_out("table2_sr_frozen.json", frozen, report)
        report = {**report, **{k: v for k, v in frozen.items() if k not in report}}
    gap = table2.gap_closed(report)
    paper_fid = table2.PAPER_FID["sr"]
    few, full = paper_fid["teacher@4"], paper_fid["teacher@250"]
    # The paper's FID of the row's counterpart, and its gap closed (its teacher: the LDM at 4 and 250 DDIM steps).
    paper = {k: f"{label}: {fid:.2f} ({(few - fid) / (few - full):.2f})" for k, (label, fid) in
             paper_fid["methods"].items()}
    paper["finetune ddim 50"] = f"LDM, 250 steps: {full:.2f}"
    paper["finetune ddim 4"] = f"LDM, 4 steps: {few:.2f}"
    rows = [("fine-tuned teacher (ControlNet), DDIM 50", "finetune ddim", "50", "finetune ddim 50"),
            ("fine-tuned teacher, DDIM 4", "finetune ddim", "4", "finetune ddim 4"),
            ("fine-tuned teacher, DPM-Solver++ 4", "finetune dpm++", "4", "finetune dpm++"),
            ("CoDi, ours (x space, the teacher's PF-ODE)", "codi", "4", "codi"),
            ("CoDi, the paper's form (eps space, online PF-ODE)", "codi_eps_space", "4", "codi_eps_space"),
            ("- noise consistency (x space, online PF-ODE)", "codi_online_pfode", "4", "codi_online_pfode"),
            ("GD-II", "gd", "4", "gd"), ("PE-CoDi", "pe_codi", "4", "pe_codi"), ("CM-II", "cm", "4", "cm"),
            ("CM-II (frozen)", "cm_frozen", "4", "cm_frozen"),
            ("ControlNet only (frozen UNet), DDIM 4", "finetune_frozen ddim", "4", "finetune_frozen ddim")]
    lines = ["| at 4 steps unless named | " + " | ".join(c[0] for c in columns) + " | gap closed | the paper's FID "
             "(gap closed) |",
             "|" + "---|" * (len(columns) + 3)]
    for label, key, steps, gap_key in rows:
        if key not in report:
            continue
        row = report[key][steps]
        closed = fmt(gap.get(gap_key), 2) if gap_key in gap else ""
        lines.append("| " + " | ".join([label] + [cell(row, m, d, ci) for _, m, d, ci in columns]
                                       + [closed, paper.get(gap_key, "")]) + " |")
    for label, key, steps in [("reference: bicubic (the input upsampled)", "bicubic (the input upsampled)", "-"),
                              ("reference: the text-only teacher, DDIM 50", "teacher (text only)", "50"),
                              ("reference: ground truth through the VAE", "ground truth via VAE", "-"),
                              ("reference: ground truth (FID: the noise floor)", "ground truth", "-")]:
        row = report[key][steps]
        lines.append("| " + " | ".join([label] + [cell(row, m, d, ci) for _, m, d, ci in columns] + ["", ""]) + " |")
    return "\n".join(lines) + "\n"




def sr_codi_steps() -> str:
    """CoDi at 1 and 2 steps: a second invocation of the SR panel's evaluation, its reference rows read back from the
    cache (asserted identical, so the rows compare with table2_sr.json's)."""
    steps, panel = load("table2_sr_codi_steps.json"), load("table2_sr.json")
    _same_held_out("table2_sr_codi_steps.json", steps, panel)
    return report_table("table2_sr_codi_steps.json", [("CoDi, 1 step", "codi", "1"), ("CoDi, 2 steps", "codi", "2")],
                        SR_COLUMNS, "same model and held-out set")


TABLES = {
    "sr_table2": sr_table2,
    "sr_gap": lambda: sr_table2(columns=(SR_COLUMNS[0], SR_COLUMNS[1], SR_COLUMNS[2])),
    "sr_codi_steps": sr_codi_steps,
    "sr_val_defaults": sr_val_defaults,
    "sr_inputs": sr_inputs,
}


def documents() -> list[str]:
    out = []
    for entry in DOCS:
        path = os.path.join(REPO, entry)
        if os.path.isdir(path):
            out += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".md"))
        elif os.path.isfile(path):
            out.append(path)
    return out


def render(text: str, path: str = "") -> tuple[str, list[str]]:
    """text with every marked table regenerated, and the names of those that changed."""
    changed = []

    def one(m):
        name = m["name"]
        if name not in TABLES:
            raise SystemExit(f"{path}: no table {name!r} in tools/results_tables.py (known: {sorted(TABLES)})")
        body = TABLES[name]()
        if body != m["body"]:
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its JSON")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        with open(path) as f:
            text = f.read()
        new, changed = render(text, path)
        stale += [f"{os.path.relpath(path, REPO)}: {name}" for name in changed]
        if changed and not args.check:
            with open(path, "w") as f:
                f.write(new)
    if args.check and stale:
        print("tables that differ from their JSON (python tools/results_tables.py rewrites them):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(("regenerated: " + ", ".join(stale)) if stale else "every marked table matches its JSON")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
