"""``tf.distribute`` strategies by name: default, mirrored, multiworker, tpu."""

from __future__ import annotations

import json
import os

from facerec_tf.errors import FacerecError

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


class StrategyError(FacerecError, RuntimeError):
    """The requested strategy cannot be built here (no TPU, no TF_CONFIG...)."""


def create_strategy(name: str, tpu: str | None = None):
    """Build a strategy.

    * ``default``: one device.
    * ``mirrored``: every local GPU, or every (logical) CPU device when there is no GPU.
    * ``multiworker``: ``MultiWorkerMirroredStrategy`` from the ``TF_CONFIG`` environment
      variable (required); only the chief writes checkpoints and summaries.
    * ``tpu``: ``TPUStrategy`` for the TPU at ``tpu`` (a name, ``grpc://`` address or ``local``);
      fails fast with :class:`StrategyError` when none is reachable.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        raw = os.environ.get("TF_CONFIG")
        if not raw:
            raise StrategyError(
                "--strategy multiworker needs the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}})'
            )
        try:
            json.loads(raw)
        except json.JSONDecodeError as e:
            raise StrategyError(f"TF_CONFIG is not valid JSON: {e}") from e
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            where = tpu or "(auto-detected)"
            raise StrategyError(
                f"no TPU reachable at {where}: {e}. Pass --tpu NAME_OR_ADDRESS on a Cloud TPU "
                "VM, or use --strategy mirrored/default."
            ) from e
        return tf.distribute.TPUStrategy(resolver)
    raise StrategyError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")


def is_chief(strategy) -> bool:
    """True on the worker that writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    spec = resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in spec


def task_of(strategy) -> tuple[str, int] | None:
    """This process's ``(task type, task id)`` in the cluster, or ``None`` without one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return None
    if resolver.task_type is None:
        return None
    return resolver.task_type, int(resolver.task_id or 0)


def num_workers(strategy) -> int:
    """How many processes train together under MultiWorkerMirroredStrategy (chief and
    workers); 1 for every other strategy (a TPU pod has one client process)."""
    import tensorflow as tf

    resolver = getattr(strategy, "cluster_resolver", None)
    multi = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if not multi or resolver is None or not getattr(resolver, "cluster_spec", None):
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, sum(len(spec.get(job, [])) for job in ("chief", "worker")))
