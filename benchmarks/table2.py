"""The paper's Table 2, Table 3 and Figure 7 ablations in miniature, on a task's tiny config (depth by default).

    python benchmarks/table2.py --workdir=runs/table2 [--task=depth|sr|...] [--steps=1000] [--examples=1000] \
        [--eval-steps=1,2,4,8] [--split=test|validation] [--teacher=builtin:scenes32] [--methods=finetune,codi,...] \
        [--train-only] [--results=table2]

One shared text-to-image teacher (default: the pretrained pipeline shipped in the package, as the embedded default
uses), then, each in <workdir>/<method>:
  finetune   conditional fine-tuning of the adapted model (ControlNet form, UNet trained) -> DDIM 4/50, DPM-Solver++ 4
  finetune_frozen / cm_frozen   the same with the UNet frozen (ControlNet proper: Table 3's "ControlNet only"), and
             CM-II (frozen) distilled from it
  cm         CM-II: consistency distillation of the fine-tuned model (frozen teacher, DDIM PF-ODE, x-space, EMA target)
  gd         GD-II: guided/progressive distillation of the fine-tuned model into 4 steps
  pe_codi    PE-CoDi: frozen UNet, conditional encoder + zero convs trained with the CoDi objective
  codi       full CoDi (mu mixing, x-space consistency + latent signal loss, the teacher's PF-ODE, one t per
             example: the defaults since 4 Dec 2026, measured on two seeds)
  codi_no_signal / codi_online_pfode / codi_per_batch_t / codi_eps_space   the Figure 7 ablations: no signal
             loss; the online PF-ODE (eq. 14) and one t per batch, the paper's choices where the default departs
             from them; eps space (eq. 15, with eq. 14's PF-ODE and one t per batch: the paper's whole form)
  codi_online_batch_t   x space with the paper's online PF-ODE and one t per batch (the default until 4 Dec 2026)
  codi_target_ema / cm_per_batch_t / gd_full_ode   the defaults' ablations: a fast target EMA (0.95) beside the
             exported one, CM-II with one t per batch instead of its paper's t per example, GD-II's first round
             distilling 8 teacher DDIM steps per student step (nearly the full ODE) instead of 2
and one evaluation of all of them (FID/KID with FID's noise floor, depth controllability with intervals, PSNR/SSIM,
the reference rows) written as <workdir>/eval/report.{json,md} plus benchmarks/results/table2.json and .md. Every run
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHODS = {
    "finetune": {"mode": "finetune"},
    "finetune_frozen": {"mode": "finetune", "model.freeze_unet": True},
    "cm": {"mode": "cm", "init_from": "@finetune"},
    "cm_frozen": {"mode": "cm_frozen", "init_from": "@finetune_frozen"},
    "gd": {"mode": "gd", "init_from": "@finetune"},
    "pe_codi": {"mode": "pe_codi"},
    "codi": {"mode": "codi"},
    "codi_no_signal": {"mode": "codi", "objective.signal_loss": "none"},
    "codi_online_pfode": {"mode": "codi", "objective.pf_ode": "online"},
    "codi_per_batch_t": {"mode": "codi", "objective.timestep_sampling": "batch"},
    "codi_eps_space": {"mode": "codi", "objective.consistency_space": "eps"},
    "codi_online_batch_t": {"mode": "codi", "objective.pf_ode": "online", "objective.timestep_sampling": "batch"},
    "codi_target_ema": {"mode": "codi", "target_ema_decay": 0.95},
    "cm_per_batch_t": {"mode": "cm", "init_from": "@finetune", "objective.timestep_sampling": "batch"},
    "gd_full_ode": {"mode": "gd", "init_from": "@finetune", "objective.gd_teacher_substeps": 8},
}


def method_config(base_arg: str, name: str, workdir: str, steps: int, teacher: str = "builtin:scenes32",
                  task: str = "depth"):
    """configs/<task>.py:<base_arg> for one method: no stages, no evaluation, `steps` steps from `teacher`; cm and gd
    start from the finetune run in the same workdir ('@finetune': a codi_jax workdir, not its export)."""
    from codi_jax.testing import tiny_config

    assert base_arg == "tiny", "the miniature Table 2 runs the tiny config"
    overrides = {k: os.path.join(workdir, v[1:]) if k == "init_from" else v for k, v in METHODS[name].items()}
    return tiny_config(task, teacher, total_steps=steps, **overrides)


# The paper's Tables 2 and 3 (real-world x4 SR, FID): the fine-tuned teacher (LDM) at 4 and 250 steps, and each
# 4-step method, by the name of ours that corresponds. Its CoDi is eps space (noise consistency, eq. 15) with the
# distilling model's own PF-ODE (eq. 14): here codi_eps_space; our default (x space, the teacher's PF-ODE) drops both,
# and Table 3's "- noise-consistency" (x space, online PF-ODE) is codi_online_pfode.
PAPER_FID = {"sr": {  # by task: the paper measured its distillation gaps on SR
    "teacher@4": 29.266, "teacher@250": 19.200,
    "methods": {"codi_eps_space": ("CoDi", 19.637), "codi_online_pfode": ("- noise-consistency", 25.728),
                "gd": ("GD-II", 23.675), "pe_codi": ("PE-CoDi", 25.214), "cm": ("CM-II", 27.810),
                "cm_frozen": ("CM-II (frozen)", 28.088), "finetune dpm++": ("ControlNet + DPM-Solver++", 20.205)}}}


def gap_closed(report: dict, metric: str = "fid", steps: str = "4") -> dict:
    """(metric teacher@4 - method@4) / (metric teacher@4 - teacher@many) for every method row at `steps`: the share of
    the fine-tuned teacher's few-step gap that a method closes (1: as good as the teacher at its many steps; negative:
    worse than the teacher at 4). The teacher is the finetune run sampled with DDIM; None for every method where the
    teacher is no better at many steps than at few (no gap to close)."""
    teacher = report.get("finetune ddim", {})
    many = max((s for s in teacher if s.isdigit()), key=int, default=None)
    if steps not in teacher or many is None or many == steps:
        return {}
    few, full = teacher[steps][metric], teacher[many][metric]
    out = {"teacher_steps": [int(steps), int(many)], "teacher": [few, full]}
    for name, rows in report.items():
        if name in ("meta", "finetune ddim") or steps not in rows or metric not in rows[steps]:
            continue
        # Without a gap (the teacher no better at many steps than at few) the share is undefined, not negative.
        out[name] = (few - rows[steps][metric]) / (few - full) if few > full else None
    return out


def _gap_markdown(meta: dict) -> str:
    gap, paper = meta.get("gap_closed_fid", {}), meta.get("paper_gap_closed_fid", {})
    if not gap:
        return ""
    few, many = gap["teacher_steps"]
    if gap["teacher"][0] <= gap["teacher"][1]:
        return (f"\nNo gap-closed ratio: the fine-tuned teacher's FID at {few} DDIM steps ({gap['teacher'][0]:.4g}) is "
                f"no worse than at {many} ({gap['teacher'][1]:.4g}), so there is no gap to close.\n")
    lines = ["", f"Share of the fine-tuned teacher's FID gap from {few} to {many} DDIM steps that each method closes at "
             f"{few} steps, (FID teacher@{few} - method@{few}) / (FID teacher@{few} - teacher@{many}); teacher FID "
             f"{gap['teacher'][0]:.4g} at {few} steps, {gap['teacher'][1]:.4g} at {many}:", "",
             "| method | gap closed | paper (SR, Tables 2-3) |", "|---|---|---|"]
    for name, value in gap.items():
        if name in ("teacher_steps", "teacher"):
            continue
        lines.append(f"| {name} | {'n/a' if value is None else f'{value:.2f}'} | {paper.get(name, '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--task", default="depth", help="the task (configs/<task>.py:tiny)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each method")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="held-out split scored: validation to choose settings, test for reported numbers")
    parser.add_argument("--teacher", default="builtin:scenes32", help="text-to-image pipeline folder (diffusers layout)")
    parser.add_argument("--examples", type=int, default=1000, help="held-out examples for the evaluation")
    parser.add_argument("--methods", default=",".join(METHODS), help="subset, comma-separated")
    parser.add_argument("--eval-steps", default="1,2,4,8", help="sampling steps to evaluate (finetune adds DDIM 50)")
    parser.add_argument("--train-only", action="store_true", help="train (or resume) the methods, evaluate nothing")
    parser.add_argument("--results", default="table2",
                        help="benchmarks/results/<results>.{json,md}: a subset run must not overwrite the full table")
    args = parser.parse_args(argv)

    from absl import logging

    import provenance

    from codi_jax import evaluate, export, train

    logging.set_verbosity(logging.INFO)
    workdir = os.path.abspath(args.workdir)
    timings = {}
    names = [n for n in args.methods.split(",") if n]
    unknown = set(names) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
    for name in names:  # finetune comes first: cm and gd start from it.
        method_dir = os.path.join(workdir, name)
        ran = not export.is_finished(os.path.join(method_dir, "export"))  # time only what trains in this call
        t0 = time.time()
        if not train.run_stage(method_config("tiny", name, workdir, args.steps, args.teacher, args.task), method_dir,
                               name):
            return 75  # stopped by SIGTERM after a checkpoint: rerun to resume
        if ran:
            timings[name] = time.time() - t0
    if args.train_only:
        return 0

    eval_cfg = method_config("tiny", "codi", workdir, args.steps, args.teacher, args.task)
    eval_cfg.eval.num_examples = args.examples
    eval_cfg.eval.split = args.split
    eval_cfg.eval.steps = tuple(int(x) for x in args.eval_steps.split(","))
    report = evaluate.run(eval_cfg, workdir, only=tuple(names))
    report["meta"]["train_seconds"] = timings
    report["meta"]["gap_closed_fid"] = gap_closed(report)
    if args.task in PAPER_FID:  # the paper's, from its Tables 2 and 3, as gap_closed computes it
        paper = PAPER_FID[args.task]
        few, full = paper["teacher@4"], paper["teacher@250"]
        report["meta"]["paper_gap_closed_fid"] = {k: f"{(few - fid) / (few - full):.2f} ({label})"
                                                  for k, (label, fid) in paper["methods"].items()}
    report["meta"]["machine"] = f"{os.cpu_count()} CPU cores"
    report["meta"].update(provenance.commit())
    report["meta"]["command"] = " ".join(["python benchmarks/table2.py"] + (argv or sys.argv[1:]))
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", f"{args.results}.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(REPO, "benchmarks", "results", f"{args.results}.md"), "w") as f:
        f.write(evaluate.markdown(report) + _gap_markdown(report["meta"]))
    print(json.dumps({k: v for k, v in report.items() if k != "meta"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
