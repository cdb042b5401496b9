"""The backbones' BatchNorm on NHWC batches runs TensorFlow's fused kernel in training mode:
the same outputs and gradients as Keras' ``BatchNormalization``, in float32 and under
``mixed_bfloat16``; its moving variance is torch's (unbiased), see test_batch_norm.py."""

from __future__ import annotations

import numpy as np
import pytest


def _pair(policy: str, shape):
    import keras

    from facerec_tf.models.blocks import BatchNormalization

    rng = np.random.default_rng(0)
    layers = [
        keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, dtype=policy),
        BatchNormalization(epsilon=1e-5, momentum=0.9, dtype=policy),
    ]
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    beta = rng.normal(0, 0.3, shape[-1]).astype(np.float32)
    for layer in layers:
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return layers


def _run(layer, x, w):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    values = [y, *grads, layer.moving_mean, layer.moving_variance]
    return [np.asarray(tf.cast(v, tf.float32)) for v in values]


@pytest.mark.parametrize("policy, tol", [("float32", 1e-6), ("mixed_bfloat16", 1e-2)])
def test_training_step_matches_keras(policy, tol):
    import tensorflow as tf

    shape = (4, 5, 6, 8)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(1.0, 2.0, shape).astype(np.float32))
    w = tf.constant(rng.normal(size=shape).astype(np.float32))
    keras_bn, fused = _pair(policy, shape)
    ref, out = _run(keras_bn, x, w), _run(fused, x, w)
    names = ["output", "d/dx", "d/dgamma", "d/dbeta", "moving_mean"]
    for name, a, b in zip(names, ref, out):
        err = np.abs(a - b).max() / max(np.abs(a).max(), 1e-6)
        assert err <= tol, f"{name}: {err:.2e} relative"
    # the moving variance is torch's, unbiased: 0.9 * 1 + 0.1 * var(x) * n / (n - 1)
    seen = tf.cast(tf.cast(x, fused.compute_dtype), tf.float32).numpy().astype(np.float64)
    expected = 0.9 + 0.1 * np.var(seen.reshape(-1, 8), axis=0, ddof=1)
    np.testing.assert_allclose(out[-1], expected, rtol=1e-5)
    # and it is the fused kernel
    graph = tf.function(lambda v: fused(v, training=True)).get_concrete_function(x).graph
    assert "FusedBatchNormV3" in {op.type for op in graph.get_operations()}


def test_inference_and_config_are_keras_bn():
    import keras

    from facerec_tf.models.blocks import BatchNormalization

    keras_bn, fused = _pair("float32", (2, 3, 3, 4))
    x = np.random.default_rng(2).normal(size=(2, 3, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(keras_bn(x, training=False), fused(x, training=False))
    config = fused.get_config()
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(fused))
    assert type(clone) is BatchNormalization
    assert clone.get_config() == config
