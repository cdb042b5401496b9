"""CenterLoss under MirroredStrategy on 2 logical CPU devices, run by tests/test_center_loss.py
in a fresh process (logical devices must be configured before TensorFlow starts).

    python tests/center_loss_check.py

Runs 3 training steps of the layer on a global batch of 8 split 4 / 4 over the replicas
(classes shared between the replicas, a class on one replica only, a class absent) and the
same 3 steps on one device with the whole batch. Prints one JSON object.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
DEVICES = [d.name for d in tf.config.list_logical_devices("CPU")]

from facerec_tf.losses import CenterLoss  # noqa: E402

C, D, N, ALPHA = 6, 5, 8, 0.5


def main():
    rng = np.random.default_rng(0)
    init = rng.normal(size=(C, D)).astype(np.float32)
    xs = [rng.normal(size=(N, D)).astype(np.float32) for _ in range(3)]
    # class 0 on both replicas (twice on replica 0), class 4 only on replica 1, 5 absent
    ys = [
        np.array([0, 0, 1, 2, 0, 3, 4, 1], np.int32),
        np.array([1, 1, 1, 1, 2, 2, 2, 2], np.int32),
        np.array([3, 0, 2, 3, 3, 0, 4, 4], np.int32),
    ]

    single = CenterLoss(C, alpha=ALPHA)
    single.build((None, D))
    single.centers.assign(init)
    ref_losses = []
    for x, y in zip(xs, ys):
        ref_losses.append(single(x, y, training=True).numpy())
    ref_centers = single.centers.numpy()

    strategy = tf.distribute.MirroredStrategy(DEVICES[:2])
    with strategy.scope():
        layer = CenterLoss(C, alpha=ALPHA)
        layer.build((None, D))
        layer.centers.assign(init)

    @tf.function
    def step(x, y):
        return strategy.run(lambda a, b: layer(a, b, training=True), args=(x, y))

    def split(array):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * (N // 2) :][: N // 2])
        )

    dist_losses = []
    for x, y in zip(xs, ys):
        out = step(split(x), split(y))
        dist_losses.append(
            np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
        )
    copies = [v.numpy() for v in layer.centers.value.values]
    local_only = np.array(init)  # what a wrong, per-replica update would give on replica 0
    for x, y in zip(xs, ys):
        xl, yl = x[: N // 2], y[: N // 2]
        for j in range(C):
            m = yl == j
            local_only[j] -= ALPHA * (m.sum() * local_only[j] - xl[m].sum(0)) / (1 + m.sum())
    result = {
        "num_replicas": strategy.num_replicas_in_sync,
        "aggregation": str(layer.centers.value.aggregation),
        "centers_diff": float(max(np.abs(c - ref_centers).max() for c in copies)),
        "copies_equal": bool(all(np.array_equal(c, copies[0]) for c in copies)),
        "loss_diff": float(max(np.abs(a - b).max() for a, b in zip(dist_losses, ref_losses))),
        "absent_class_unchanged": bool(np.array_equal(copies[0][5], init[5])),
        "local_update_would_differ": float(np.abs(local_only - ref_centers).max()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
