"""One conditional model sampled at several classifier-free guidance scales, on the evaluation's held-out scenes.

    python benchmarks/guidance_sweep.py --model=runs/depth-tiny [--guidance=1,2,3,5] [--steps=1,2,4] \
        [--examples=1000] [--config=depth] [--split=validation] [--results=guidance_sweep]

Every (scale, steps) row is scored as codi_jax.evaluate scores a method (FID/KID, the depth error, caption following,
PSNR/SSIM, bootstrap intervals), on the same held-out examples and initial noise as the evaluation of
configs/<config>.py:tiny on that split (evaluate.held_out), so a row at the model's own guidance equals that
evaluation's row to the digit. The sweep exists to choose a setting, so it runs on the validation split by default;
--split=test only re-measures a setting already chosen (the test split is for the numbers that are reported). Writes
benchmarks/results/<results>.{json,md}, rewritten after each scale (a stopped sweep keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a finished run's workdir or its export/ folder")
    parser.add_argument("--guidance", default="1,2,3,5", help="comma-separated guidance scales")
    parser.add_argument("--steps", default="1,2,4", help="comma-separated sampling steps")
    parser.add_argument("--examples", type=int, default=1000, help="held-out examples")
    parser.add_argument("--config", default="depth", help="configs/<config>.py:tiny gives the data and metrics")
    parser.add_argument("--split", default="validation", choices=("validation", "test"),
                        help="held-out split: validation chooses settings, test only reports them")
    parser.add_argument("--results", default="guidance_sweep", help="benchmarks/results/<results>.{json,md}")
    args = parser.parse_args(argv)
    try:
        scales = [float(s) for s in args.guidance.split(",")]
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error("--guidance and --steps are comma-separated numbers, e.g. --guidance=1,3 --steps=1,4")
    # 0 would mean "the model's own" to the evaluation, and its row would be labelled w=0.
    if min(scales) <= 0 or min(steps) < 1:
        parser.error(f"guidance scales must be > 0 and steps >= 1, got {scales} and {steps}")

    from absl import logging

    from codi_jax import evaluate
    from codi_jax.sample import Pipeline
    from codi_jax.testing import tiny_config

    logging.set_verbosity(logging.INFO)
    try:  # a bad path fails here, before any data or metric network is loaded
        pipe = Pipeline(args.model)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    config = tiny_config(args.config, **{"eval.split": args.split})
    batches, real, cond, captions = evaluate.held_out(config, args.examples)
    scorer = evaluate.Scorer(config, real, captions, cond, evaluate.batch_extras(batches))
    report = {"meta": {"command": " ".join(["python benchmarks/guidance_sweep.py"] + (argv or sys.argv[1:])),
                       "model": os.path.relpath(os.path.abspath(args.model), REPO), "num_examples": len(real),
                       "split": args.split,
                       "seed": int(config.eval.seed), "machine": f"{os.cpu_count()} CPU cores",
                       "unavailable": scorer.unavailable,
                       "notes": "rows: the model at guidance w; its own guidance is "
                                f"{pipe.default_guidance():g}."}}
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    sampler, t0 = pipe.default_sampler()[0], time.time()
    for w in scales:
        config.eval.guidance_scale = w
        evaluate.sample_rows(pipe, f"w={w:g}", [("", sampler, s) for s in steps], batches, config, scorer, report,
                              {})
        report["meta"]["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(REPO, "benchmarks", "results", f"{args.results}.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(REPO, "benchmarks", "results", f"{args.results}.md"), "w") as f:
            f.write(evaluate.markdown(report))
    print(evaluate.markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
