"""Center loss (Wen et al. ECCV 2016) against a NumPy reference written from the paper.

The MirroredStrategy check runs in a fresh process (tests/center_loss_check.py) on 2
logical CPU devices.
"""

from __future__ import annotations

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.losses import CenterLoss

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "center_loss_check.py"


def ref_loss(x, y, centers):
    return np.array([0.5 * np.sum((x[i] - centers[y[i]]) ** 2) for i in range(len(y))])


def ref_update(x, y, centers, alpha):
    """Eq. 4: delta_c_j = sum_{y_i = j} (c_j - x_i) / (1 + n_j); c_j -= alpha * delta_c_j."""
    new = np.array(centers, np.float64)
    for j in range(len(centers)):
        members = [i for i in range(len(y)) if y[i] == j]
        delta = sum((centers[j] - x[i] for i in members), np.zeros(centers.shape[1]))
        new[j] = centers[j] - alpha * delta / (1 + len(members))
    return new


def make_layer(num_classes, dim, alpha=0.5, seed=0):
    layer = CenterLoss(num_classes, alpha=alpha)
    layer.build((None, dim))
    init = np.random.default_rng(seed).normal(size=(num_classes, dim)).astype(np.float32)
    layer.centers.assign(init)
    return layer, init


def test_loss_and_update_match_the_paper():
    rng = np.random.default_rng(1)
    layer, centers = make_layer(7, 5, alpha=0.3)
    for _ in range(3):  # several steps: each uses the centres the previous one left
        x = rng.normal(size=(10, 5)).astype(np.float32)
        y = rng.integers(0, 6, size=10).astype(np.int32)  # class 6 never appears
        y[:3] = 2  # a class seen three times: the 1 / (1 + n_j) factor matters
        got = layer(x, y, training=True).numpy()
        assert got.dtype == np.float32 and got.shape == (10,)
        np.testing.assert_allclose(got, ref_loss(x, y, centers), rtol=1e-6, atol=1e-5)
        centers = ref_update(x, y, centers, 0.3)
        np.testing.assert_allclose(layer.centers.numpy(), centers, rtol=0, atol=1e-5)
    assert np.array_equal(layer.centers.numpy()[6], make_layer(7, 5, alpha=0.3)[1][6])


def test_inference_does_not_move_the_centres():
    layer, init = make_layer(4, 3)
    x, y = np.ones((2, 3), np.float32), np.array([1, 1], np.int32)
    for training in (None, False):
        np.testing.assert_allclose(layer(x, y, training=training), ref_loss(x, y, init))
        np.testing.assert_array_equal(layer.centers.numpy(), init)


def test_fresh_layer_starts_from_zero_centres_and_converges_to_the_mean():
    layer = CenterLoss(3, alpha=1.0)
    x, y = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), np.zeros(2, np.int32)
    np.testing.assert_allclose(layer(x, y, training=True), [2.5, 12.5])
    # alpha = 1: c <- c - (2c - x0 - x1) / 3 = (x0 + x1) / 3 from zero
    np.testing.assert_allclose(layer.centers.numpy()[0], [4.0 / 3.0, 2.0])
    for _ in range(60):
        layer(x, y, training=True)
    np.testing.assert_allclose(layer.centers.numpy()[0], [2.0, 3.0], atol=1e-5)  # the mean
    assert not layer.trainable_weights and len(layer.non_trainable_weights) == 1


def test_gradients_reach_the_features_not_the_centres():
    layer, init = make_layer(4, 3)
    x = tf.constant(np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32))
    y = tf.constant([0, 1, 1, 3, 0])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, y, training=True))
    np.testing.assert_allclose(
        tape.gradient(loss, x).numpy(), x.numpy() - init[y.numpy()], atol=1e-6
    )
    assert tape.gradient(loss, layer.centers.value) is None


def test_mixed_precision_inputs_compute_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = CenterLoss(4)
        out = layer(tf.constant([[0.5, 1.0]], tf.float16), tf.constant([2]), training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.float32 and layer.centers.dtype == "float32"
    np.testing.assert_allclose(out.numpy(), [0.625])
    np.testing.assert_allclose(layer.centers.numpy()[2], [0.125, 0.25])  # 0.5 * x / 2


def test_updates_inside_tf_function():
    layer, centers = make_layer(5, 4, alpha=0.5, seed=3)
    rng = np.random.default_rng(3)
    step = tf.function(lambda x, y: layer(x, y, training=True))
    for _ in range(3):
        x = rng.normal(size=(6, 4)).astype(np.float32)
        y = rng.integers(0, 5, size=6).astype(np.int32)
        np.testing.assert_allclose(step(x, y).numpy(), ref_loss(x, y, centers), atol=1e-5)
        centers = ref_update(x, y, centers, 0.5)
    np.testing.assert_allclose(layer.centers.numpy(), centers, atol=1e-5)


def test_serialization_and_saved_model_round_trip(tmp_path):
    emb_in = keras.Input((6,), name="embedding")
    lab_in = keras.Input((), dtype="int32", name="label")
    layer = CenterLoss(9, alpha=0.25, name="center_loss")
    model = keras.Model([emb_in, lab_in], layer(emb_in, lab_in))
    rng = np.random.default_rng(4)
    layer.centers.assign(rng.normal(size=(9, 6)).astype(np.float32))
    x = [rng.normal(size=(3, 6)).astype(np.float32), np.array([0, 8, 4], np.int32)]
    want = model.predict(x, verbose=0)
    path = tmp_path / "center.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), want)
    restored = loaded.get_layer("center_loss")
    assert isinstance(restored, CenterLoss) and restored.alpha == 0.25
    np.testing.assert_array_equal(restored.centers.numpy(), layer.centers.numpy())
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert clone.get_config() == layer.get_config()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        CenterLoss(0)
    with pytest.raises(ValueError, match=r"alpha .* must be in \(0, 1\]"):
        CenterLoss(3, alpha=0.0)
    with pytest.raises(ValueError, match=r"alpha"):
        CenterLoss(3, alpha=1.5)
    layer, _ = make_layer(3, 2)
    with pytest.raises(tf.errors.InvalidArgumentError):
        layer(np.zeros((1, 2), np.float32), np.array([3], np.int32), training=True)


def test_short_training_run_decreases_the_center_term():
    """Softmax + lambda * center loss (the paper's joint supervision) on clustered vectors."""
    rng = np.random.default_rng(5)
    classes, per_class, dim = 6, 6, 12
    means = rng.normal(size=(classes, dim))
    x = (np.repeat(means, per_class, axis=0) + 0.7 * rng.normal(size=(36, dim))).astype(np.float32)
    y = np.repeat(np.arange(classes), per_class).astype(np.int32)
    keras.utils.set_random_seed(0)
    embed = keras.Sequential(
        [keras.Input((dim,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)]
    )
    classify = keras.layers.Dense(classes)
    classify.build((None, 4))
    center = CenterLoss(classes, alpha=0.5)
    center.build((None, 4))
    variables = embed.trainable_variables + classify.trainable_variables
    opt = keras.optimizers.Adam(1e-2)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            # Fixed-norm features (radius 3): the softmax cannot shrink the center term by
            # shrinking the features, nor inflate it by growing them.
            features = 3.0 * tf.math.l2_normalize(embed(x), axis=1)
            softmax = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    y, classify(features), from_logits=True
                )
            )
            center_term = tf.reduce_mean(center(features, y, training=True))
            loss = softmax + 0.1 * center_term
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return softmax, center_term

    history = np.array([[float(v) for v in step()] for _ in range(40)])
    assert np.all(np.isfinite(history))
    assert history[-5:, 0].mean() < 0.5 * history[0, 0]  # softmax
    # The centres start at 0, so the first term is 0.5 * 3^2; after a few steps they track
    # the class means, and the term keeps falling as the features cluster around them.
    assert history[0, 1] == pytest.approx(4.5, abs=1e-4)
    assert history[-5:, 1].mean() < 0.5 * history[4, 1], history[:, 1]
    assert np.all(np.diff(history[4:, 1]) < 1e-3), history[:, 1]  # (nearly) monotone


@pytest.mark.slow
def test_mirrored_strategy_update_equals_single_device_update():
    from checks import run_check

    result = run_check("center_loss_check.py")
    assert result["num_replicas"] == 2
    assert "ONLY_FIRST_REPLICA" in result["aggregation"]
    assert result["copies_equal"] and result["absent_class_unchanged"], result
    assert result["centers_diff"] <= 1e-6 and result["loss_diff"] <= 1e-6, result
    # the check is sensitive: a per-replica (not all-reduced) update lands far away
    assert result["local_update_would_differ"] > 0.1, result
