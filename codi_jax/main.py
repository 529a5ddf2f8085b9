"""Entry point: python -m codi_jax.main --config=configs/depth.py[:variant] --workdir=DIR [--config.key=value ...]

Flags, multi-host initialisation, then train.train_and_evaluate. The run always resumes from --workdir.
`--check` parses and validates the config exactly as a run does, prints `config ok: ...` and exits (launch/ runs it
on the launching machine before it creates or starts anything); `--help` lists the variants, modes, tasks and the
most-used config fields.

The config's defaults import JAX (the objectives' and the data's defaults live beside their code), but no JAX
runtime starts before main(): TensorFlow and the trainer are imported there, and devices are first touched there,
after the config has been checked. So a mistake is one line and status 2 before any backend starts (on a pod every
host would otherwise wait on the others first), and the environment (TF_CPP_MIN_LOG_LEVEL, the CPU device count of
test clusters) is set before JAX reads it.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from codi_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Task config file, e.g. configs/depth.py:tiny", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (local or gs://): checkpoints, TensorBoard events, exports")
flags.DEFINE_bool("check", False, "Only check the config: parse and validate it as a run would, print 'config ok: "
                  "...' and exit 0 (or the one-line error, status 2). Starts no device and reads no teacher or data "
                  "folder, so it runs on a machine without the workers' paths (launch/ runs it before anything)")
flags.mark_flags_as_required(["config", "workdir"])

_HELP = ("--help", "-help", "-h", "-?", "--helpshort")


def flags_parser(argv):
    """--help answers at once, from the source (no JAX); everything else is cli.flags_parser's."""
    if any(arg in _HELP for arg in argv[1:]):
        try:
            print(cli.main_help(FLAGS), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    return cli.flags_parser(argv)


def _multihost_environment() -> dict | None:
    """Arguments for jax.distributed.initialize when this process is one of several, else None.

    Explicit settings (CODI_COORDINATOR, CODI_NUM_PROCESSES, CODI_PROCESS_ID; used by the multi-process CPU test and
    custom clusters) win; otherwise a multi-host TPU slice or a multi-task SLURM job is detected and jax's own cluster
    detection fills in the rest.
    """
    if os.environ.get("CODI_COORDINATOR"):
        return {
            "coordinator_address": os.environ["CODI_COORDINATOR"],
            "num_processes": int(os.environ["CODI_NUM_PROCESSES"]),
            "process_id": int(os.environ["CODI_PROCESS_ID"]),
        }
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    # gcloud-made TPU VMs do not export the worker list (JAX reads it from the metadata server); launch/start.sh
    # passes the slice's host count instead.
    if int(os.environ.get("CODI_TPU_HOSTS", "1")) > 1:
        return {}
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return {}
    return None


def initialize_distributed() -> None:
    import jax  # only now: see the module docstring

    kwargs = _multihost_environment()
    if kwargs is None:
        return
    if os.environ.get("CODI_LOCAL_DEVICES"):  # CPU test clusters: fake devices per process.
        jax.config.update("jax_num_cpu_devices", int(os.environ["CODI_LOCAL_DEVICES"]))
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


class _QuietLibraries(std_logging.Filter):
    """Orbax and grain log every internal step at INFO; keep their warnings, drop the chatter."""

    def filter(self, record):
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/_src/"))
        return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # --config.key=value overrides land after get_config: derive the mode-dependent fields and validate again. A
    # mistake in the config is one line and status 2, before the distributed runtime, TensorFlow or any device starts
    # (on a pod every host would otherwise wait on the others first).
    config = cli.config(FLAGS)
    # The teacher's fields (image size, tokenizer, prediction type, schedule) and what a run cannot go without;
    # --check reads no folder, since the launching machine may not see the workers' paths.
    config = cli.resolve(config, check_paths=not FLAGS.check)
    if FLAGS.check:
        print(cli.summary(config), flush=True)
        return
    if config.run_eval:  # the evaluation's refusals now, not after hours of training
        from codi_jax import evaluate  # imports JAX, starts no device

        try:
            evaluate.check_held_out(config)
            evaluate.check_readers(config)
        except evaluate.EvalConfigError as e:
            cli.fail(str(e))
    initialize_distributed()
    import jax  # only now: see the module docstring

    # TensorFlow (pulled in by clu and tfds) must never take the accelerator from JAX.
    try:
        import tensorflow as tf  # optional here: only to hide the GPU from it

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # noqa: BLE001 - TF is optional at this point.
        pass
    from codi_jax import train  # imports JAX, TensorFlow (clu) and grain: only after the checks above

    logging.info("JAX %s, process %d/%d, %d local / %d global devices (%s)", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
    from codi_jax import checkpoint

    try:
        finished = train.train_and_evaluate(config, FLAGS.workdir)
    except checkpoint.CheckpointError as e:  # the one line, then a status that tells supervisors not to retry
        logging.flush()
        print(e.message, file=sys.stderr, flush=True)
        raise SystemExit(e.code) from None
    if not finished:
        # Stopped early by a preemption signal after checkpointing: a distinct status (EX_TEMPFAIL) tells
        # supervisors that the run is not finished and should be restarted from the same workdir.
        raise SystemExit(75)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser)
