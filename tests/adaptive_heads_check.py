"""Adaptive heads under MirroredStrategy on 2 logical CPU devices, run by
tests/test_adaptive_heads.py in a fresh process (logical devices must be configured before
TensorFlow starts, and MirroredStrategies of different sizes clash in one process).

    python tests/adaptive_heads_check.py

Two training calls of every adaptive head, each on a global batch of 8 split over the two
replicas, against the same two calls without a strategy on the whole batch. Prints one JSON
object: per head, the state on each replica, the single-device state, and the largest
differences of state, logits and auxiliary losses.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
DEVICES = [d.name for d in tf.config.list_logical_devices("CPU")]

from facerec_tf.heads import create_head  # noqa: E402

N, D, C, W = 8, 8, 6, 2  # global batch, embedding size, classes, replicas
HEADS = ("magface", "curricularface", "adaface", "sphereface_annealed")
STATE = {
    "magface": (),
    "curricularface": ("t",),
    "adaface": ("batch_mean", "batch_std"),
    "sphereface_annealed": ("iteration",),
}


def data():
    rng = np.random.default_rng(7)
    kernel = rng.standard_normal((C, D)).astype(np.float32)
    batches = []
    for _ in range(2):
        direction = rng.standard_normal((N, D))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        norms = rng.uniform(3.0, 130.0, size=(N, 1))  # below l_a, inside, above u_a
        x = (direction * norms).astype(np.float32)
        y = rng.integers(0, C, N).astype(np.int32)
        y[3] = -1  # one row without a local target (replica 0)
        batches.append((x, y))
    return kernel, batches


def state_of(head, name):
    return [float(np.asarray(getattr(head, v).numpy())) for v in STATE[name]]


def single_device(name, kernel, batches):
    head = create_head(name, C)
    head.build((None, D))
    head.centers.kernel.assign(kernel)
    step = tf.function(lambda x, y: head(x, y, training=True))
    logits = [step(x, y).numpy() for x, y in batches]
    aux = head.auxiliary_losses(batches[-1][0], batches[-1][1]) if name == "magface" else {}
    return head, logits, {k: v.numpy() for k, v in aux.items()}


def per_replica(strategy, array):
    b = array.shape[0] // W
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * b :][:b])
    )


def mirrored(strategy, name, kernel, batches):
    with strategy.scope():
        head = create_head(name, C)
        head.build((None, D))
    head.centers.kernel.assign(kernel)

    @tf.function
    def step(x, y):
        out = head(x, y, training=True)
        aux = head.auxiliary_losses(x, y) if name == "magface" else {}
        return out, aux

    logits, aux = [], {}
    for x, y in batches:
        out, aux_values = strategy.run(
            step, args=(per_replica(strategy, x), per_replica(strategy, y))
        )
        logits.append(np.concatenate(strategy.experimental_local_results(out), axis=0))
        aux = {
            k: np.concatenate(strategy.experimental_local_results(v), axis=0)
            for k, v in aux_values.items()
        }
    replicas = [
        [
            float(np.asarray(v))
            for v in strategy.experimental_local_results(getattr(head, var).value)
        ]
        for var in STATE[name]
    ]  # [variable][replica]
    return head, logits, aux, replicas


def main() -> int:
    kernel, batches = data()
    strategy = tf.distribute.MirroredStrategy(DEVICES[:W])
    result = {}
    for name in HEADS:
        ref_head, ref_logits, ref_aux = single_device(name, kernel, batches)
        _, logits, aux, replicas = mirrored(strategy, name, kernel, batches)
        ref_state = state_of(ref_head, name)
        result[name] = {
            "state_ref": ref_state,
            "state_replicas": replicas,
            "state_diff": max(
                (abs(v - r) for vals, r in zip(replicas, ref_state) for v in vals), default=0.0
            ),
            "replicas_equal": all(len(set(vals)) == 1 for vals in replicas),
            "logits_diff": max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits)),
            "aux_diff": max(
                (float(np.abs(aux[k] - ref_aux[k]).max()) for k in ref_aux), default=0.0
            ),
            "aux_keys": sorted(aux),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
