"""Sync BatchNorm on 2 logical CPU devices, run by tests/test_batch_norm.py in a fresh
process (logical devices must be configured before TensorFlow starts).

    python tests/batch_norm_check.py

Prints one JSON object: per case, the largest differences of the moving statistics from
torch's update on the GLOBAL batch (n = values per channel over both replicas), how far a
per-replica n would be, and the difference of the output from the global-batch
normalisation.
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

from facerec_tf.models.blocks import BatchNormalization  # noqa: E402

B = 3  # rows per replica


def case(shape, seed) -> dict:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2 * B, *shape)) * 2.0 + 0.5).astype(np.float32)
    channels = shape[-1]
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    with strategy.scope():
        layer = BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True)
        layer.build((None, *shape))
    old_var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    layer.moving_variance.assign(old_var)
    parts = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * B :][:B])
    )
    out = strategy.run(tf.function(lambda v: layer(v, training=True)), args=(parts,))
    out = np.concatenate([o.numpy() for o in strategy.experimental_local_results(out)])
    flat = x.astype(np.float64).reshape(-1, channels)
    n = flat.shape[0]
    mean, var = flat.mean(axis=0), flat.var(axis=0)
    want_mean = 0.1 * mean  # old mean 0
    want_var = 0.9 * old_var + 0.1 * var * n / (n - 1)
    local_n = n // 2
    local_var = 0.9 * old_var + 0.1 * var * local_n / (local_n - 1)
    got_mean = [v.numpy() for v in strategy.experimental_local_results(layer.moving_mean)]
    got_var = [v.numpy() for v in strategy.experimental_local_results(layer.moving_variance)]
    axes = tuple(range(x.ndim - 1))
    want_out = (x - x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + 1e-5)
    return {
        "count": n,
        "mean_diff": float(max(np.abs(g - want_mean).max() for g in got_mean)),
        "var_diff": float(max(np.abs(g / want_var - 1).max() for g in got_var)),
        "local_count_diff": float(np.abs(local_var / want_var - 1).max()),
        "output_diff": float(np.abs(out - want_out).max()),
    }


def main() -> int:
    result = {"4d": case((4, 2, 5), 0), "2d": case((5,), 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
