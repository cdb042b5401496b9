"""Torch-exact BatchNorm statistics (facerec_tf.models.blocks.BatchNormalization).

torch's BatchNorm, after a training forward with momentum 0.1::

    running_mean = 0.9 running_mean + 0.1 mean
    running_var  = 0.9 running_var  + 0.1 var * n / (n - 1)     (unbiased, n values/channel)

while the batch itself is normalised with the biased variance. Keras' BatchNormalization
stores the biased variance. The sync-BN check runs on 2 logical CPU devices in a fresh
process (tests/batch_norm_check.py).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from checks import run_check

from facerec_tf.models import blocks, create_backbone


def torch_update(x, old_mean, old_var, momentum=0.1):
    """torch's running statistics after one training forward on ``x`` (channels last)."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    mean, var = x.mean(axis=0), x.var(axis=0, ddof=1)
    return (1 - momentum) * old_mean + momentum * mean, (1 - momentum) * old_var + momentum * var


def normalised(x, gamma, beta, eps=1e-5):
    """The training-mode output: biased batch variance."""
    x64 = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    return (x64 - mean) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("shape", [(4, 5, 3, 6), (16, 6)], ids=["4d", "2d"])
def test_moving_statistics_follow_torch(shape, policy):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3.0 + 1.5).astype(np.float32)
    channels = shape[-1]
    layer = blocks.BatchNormalization(epsilon=1e-5, momentum=0.9, dtype=policy)
    layer.build(shape)
    old_mean = rng.standard_normal(channels).astype(np.float32)
    old_var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    layer.set_weights([gamma, beta, old_mean, old_var])
    out = layer(tf.constant(x), training=True)
    # what the layer saw: its compute dtype (bfloat16 under mixed precision), statistics float32
    seen = tf.cast(tf.cast(x, layer.compute_dtype), tf.float32).numpy()
    want_mean, want_var = torch_update(seen, old_mean, old_var)
    assert layer.moving_mean.dtype == "float32" and layer.moving_variance.dtype == "float32"
    np.testing.assert_allclose(layer.moving_mean.numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), want_var, rtol=1e-5)
    # Keras' biased update is 100x the tolerance away (n / (n - 1) = 1.017 here in 4-D, 1.067 2-D)
    biased = 0.9 * old_var + 0.1 * seen.reshape(-1, channels).var(axis=0)
    assert np.abs(biased / want_var - 1).max() > 1e-3
    tolerance = 1e-4 if policy == "float32" else 2e-2  # bfloat16 output
    assert out.dtype == layer.compute_dtype
    np.testing.assert_allclose(
        tf.cast(out, tf.float32).numpy(), normalised(seen, gamma, beta), atol=tolerance
    )
    # inference uses the moving statistics, as Keras does
    inference = layer(tf.constant(x), training=False)
    mean, var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    want = (seen - mean) / np.sqrt(var + 1e-5) * gamma + beta
    np.testing.assert_allclose(tf.cast(inference, tf.float32).numpy(), want, atol=tolerance)


def test_every_backbone_batch_norm_is_torch_exact():
    """One training forward of small backbones: every BN (stem, units, GDC, the iresnet
    ``features`` BN with its frozen gamma) holds torch's statistics of its own input."""
    rng = np.random.default_rng(1)
    for name, kwargs in [
        ("iresnet10", dict(input_shape=(32, 32, 3), embedding_size=16)),
        ("mobilefacenet_small", dict(input_shape=(32, 32, 3), embedding_size=16)),
    ]:
        model = create_backbone(name, **kwargs)
        bns = [
            layer
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        assert bns and all(type(layer) is blocks.BatchNormalization for layer in bns), name
        taps = keras.Model(model.inputs, [layer.input for layer in bns] + model.outputs)
        old = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in bns]
        images = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
        inputs = taps(images, training=True)[: len(bns)]
        for layer, seen, (m, v) in zip(bns, inputs, old):
            want_mean, want_var = torch_update(seen.numpy(), m, v)
            np.testing.assert_allclose(
                layer.moving_variance.numpy(), want_var, rtol=2e-4, atol=1e-6, err_msg=layer.name
            )
            np.testing.assert_allclose(
                layer.moving_mean.numpy(), want_mean, rtol=2e-4, atol=1e-5, err_msg=layer.name
            )
        if name == "iresnet10":  # arcface_torch: features.weight fixed at 1.0
            assert not model.get_layer("features").gamma.trainable


def test_backbones_and_losses_use_it_everywhere():
    from facerec_tf.losses.pfe import UncertaintyHead

    for name in ("vargfacenet", "facenet_mobilenet"):
        model = create_backbone(name)
        bns = [
            layer
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        assert bns and all(type(layer) is blocks.BatchNormalization for layer in bns), name
    head = UncertaintyHead(8)
    head.build((None, 8))
    assert (
        type(head.bn1) is blocks.BatchNormalization and type(head.bn2) is blocks.BatchNormalization
    )


def test_keras_files_saved_with_keras_batch_norm_still_load(tmp_path, monkeypatch):
    """A backbone written before the change (plain keras BatchNormalization, same names and
    weights) loads into facerec_tf BatchNormalization layers with identical weights and outputs; a plain Keras
    model keeps its Keras layers; ours round-trips."""
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    with monkeypatch.context() as m:
        m.setattr(blocks, "BatchNormalization", keras.layers.BatchNormalization)
        old = create_backbone("iresnet10", input_shape=(32, 32, 3), embedding_size=16)
    assert type(old.get_layer("features")) is keras.layers.BatchNormalization
    old(images, training=True)  # moving statistics away from their initial values
    old.save(tmp_path / "old.keras")
    loaded = keras.models.load_model(tmp_path / "old.keras", compile=False)
    assert type(loaded.get_layer("features")) is blocks.BatchNormalization
    assert not loaded.get_layer("features").gamma.trainable
    for a, b in zip(old.weights, loaded.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded(images).numpy(), old(images).numpy())

    x = keras.Input((4,))
    plain = keras.Model(x, keras.layers.BatchNormalization(name="bn")(x))
    plain.save(tmp_path / "plain.keras")
    again = keras.models.load_model(tmp_path / "plain.keras")
    assert type(again.get_layer("bn")) is keras.layers.BatchNormalization

    ours = keras.Model(x, blocks.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")(x))
    ours.save(tmp_path / "ours.keras")
    again = keras.models.load_model(tmp_path / "ours.keras")
    assert type(again.get_layer("bn")) is blocks.BatchNormalization
    assert again.get_layer("bn").get_config() == ours.get_layer("bn").get_config()


def test_renorm_is_refused():
    with pytest.raises(ValueError, match="facerec_tf BatchNormalization does not implement renorm"):
        blocks.BatchNormalization(renorm=True)


@pytest.mark.slow
def test_sync_batch_norm_uses_the_global_count():
    """synchronized=True on 2 logical CPU devices, per-replica batches of 3: the moving
    statistics are torch's of the 6-row global batch (n = 6 H W, 4-D; n = 6, 2-D)."""
    result = run_check("batch_norm_check.py")
    for case, r in result.items():
        assert r["mean_diff"] <= 1e-6 and r["var_diff"] <= 1e-6, (case, r)
        assert r["local_count_diff"] >= 1e-3, (case, r)  # a per-replica n would be caught
        assert r["output_diff"] <= 1e-4, (case, r)
