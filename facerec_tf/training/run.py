"""Entry point behind ``train.py``: environment set-up, strategy, task, trainer."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from facerec_tf.training.strategy import STRATEGIES

# Exit codes of train.py (documented in README "Training on several machines").
EXIT_OK = 0  # trained to the end
EXIT_BAD_INPUT = 2  # bad config, data or run folder; workers that disagree (nothing to retry)
EXIT_WORKER_LOST = 3  # a peer worker stopped answering: relaunch every worker with --resume
EXIT_PREEMPTED = 143  # SIGTERM: a checkpoint was saved at the step; relaunch with --resume

EXAMPLES = """examples:
  # the quickstart: synthetic identities, MobileFaceNet, 2 CPU cores, a few minutes
  python train.py --config quickstart --data synthetic --output runs/quickstart

  # MS1MV2 (converted with tools/convert_rec_to_tfrecord.py) on every local GPU
  python train.py --config ms1mv2_r50 --data /data/ms1mv2_tfrecord --output runs/r50 \\
      --strategy mirrored --set runtime.precision=mixed_float16

  # continue that run after a crash or pre-emption (exactly where it stopped)
  python train.py --config ms1mv2_r50 --data /data/ms1mv2_tfrecord --output runs/r50 \\
      --strategy mirrored --resume

  # a JSON/YAML config file on top of a preset ({"base": "glint360k_r100", ...}) + overrides
  python train.py --config my.json --data /data/glint --output runs/g --set optimizer.clip_norm=0

  # two workers (run on each host with its own TF_CONFIG task index), one shared --output
  TF_CONFIG='{"cluster":{"worker":["h1:2222","h2:2222"]},"task":{"type":"worker","index":0}}' \\
      python train.py --config ms1mv3_r100 --data gs://bucket/ms1mv3 --output gs://bucket/run \\
      --strategy multiworker

Watch it with: tensorboard --logdir OUTPUT/tensorboard

exit codes: 0 done; 2 bad input (one line on stderr); 3 a peer worker stopped answering
(relaunch every worker with --resume); 143 stopped by SIGTERM after saving a checkpoint at the
current step (relaunch with --resume)
"""


def build_parser() -> argparse.ArgumentParser:
    from facerec_tf.cli import add_set_option, add_verbose_option
    from facerec_tf.config import list_presets

    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train an ArcFace-style face-embedding model with tf.distribute.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help=f"a preset ({', '.join(list_presets())}) or a JSON/YAML file",
    )
    p.add_argument(
        "--data",
        required=True,
        help="'synthetic' or a folder of TFRecord shards with manifest.json (and .bin targets)",
    )
    p.add_argument("--output", required=True, help="run folder (checkpoints, tensorboard, export)")
    p.add_argument("--strategy", choices=STRATEGIES, default="default")
    p.add_argument("--tpu", default=None, help="TPU name or grpc:// address for --strategy tpu")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output"
    )
    add_set_option(p)
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps (smoke runs); the schedule is unchanged",
    )
    p.add_argument(
        "--cpu-replicas",
        type=int,
        default=0,
        help="split the CPU into N logical devices (to exercise --strategy mirrored on CPU)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_verbose_option(p)
    return p


def configure_tensorflow(cpu_replicas: int = 0, deterministic: bool = False) -> None:
    import tensorflow as tf

    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
        )
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run (``--resume`` added if missing)."""
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", "train.py", *args])


def _exit_now(code: int) -> None:
    """Exit without waiting for a cluster that lost a member (TensorFlow's shutdown could
    block on it); the run folder holds nothing unsaved at this point."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave(trainer, code: int) -> int:
    """``code``; the workers of a multi-worker run exit at once instead. They leave the
    trainer together (a final all-gather) with everything written, and TensorFlow's own
    shutdown would make whichever worker is slower log errors: the chief hosts the
    coordination service, and the service reports a worker gone first as unhealthy."""
    if trainer is not None and trainer.num_workers > 1:
        _exit_now(code)
    return code


def main(argv=None) -> int:
    from facerec_tf.config import resolve
    from facerec_tf.errors import FacerecError
    from facerec_tf.training.trainer import PreemptedError, StopRequest, WorkerLostError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # SIGTERM from now on makes every worker save and stop at the same step
    stop_request = StopRequest().install()
    trainer = None
    try:
        overrides = list(args.overrides)
        overrides.append(f"data.source={args.data}")
        config = resolve(args.config, overrides)
        if args.print_config:
            print(config.to_json())
            return 0
        configure_tensorflow(args.cpu_replicas, config.runtime.deterministic)

        from facerec_tf.training.strategy import create_strategy
        from facerec_tf.training.task import FaceRecognitionTask
        from facerec_tf.training.trainer import Trainer

        strategy = create_strategy(args.strategy, tpu=args.tpu)
        task = FaceRecognitionTask(config)
        trainer = Trainer(
            task, strategy, args.output, max_steps=args.max_steps, stop_request=stop_request
        )
        summary = trainer.train(resume=args.resume)
    except WorkerLostError as e:
        print(
            f"error: {e}; resume by relaunching every worker with: {resume_command(argv)}",
            file=sys.stderr,
        )
        _exit_now(EXIT_WORKER_LOST)
    except PreemptedError as e:
        print(f"{e}; resume with: {resume_command(argv)}", file=sys.stderr)
        return _leave(trainer, EXIT_PREEMPTED)
    except FacerecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        stop_request.uninstall()
    for name, r in summary["verification"].items():
        print(f"final [{name}] accuracy {r['accuracy']:.5f} +- {r['accuracy_std']:.5f}")
    print(f"final weights digest {summary['weights_digest']} after {summary['steps']} steps")
    return _leave(trainer, EXIT_OK)
