"""Embedding distillation losses against NumPy, their gradients and the frozen teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.losses.distill import (
    DISTILLATION_KINDS,
    DistillationInputError,
    embedding_distillation_loss,
)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(student, teacher, kind):
    s, t = unit(student), unit(teacher)
    if kind == "l2":
        return np.sum((s - t) ** 2, axis=1)
    return np.arccos(np.clip(np.sum(s * t, axis=1), -1.0, 1.0))


def cases(rng, b=32, d=24):
    s = rng.normal(size=(b, d))
    t = rng.normal(size=(b, d))
    t[0] = s[0] * 2.5  # same direction: loss 0
    t[1] = -s[1]  # opposite: l2 4, angle pi
    t[2] = s[2] + 0.01 * rng.normal(size=d)  # small angle
    return s.astype(np.float32), t.astype(np.float32)


@pytest.mark.parametrize("kind", DISTILLATION_KINDS)
def test_matches_numpy(kind):
    s, t = cases(np.random.default_rng(0))
    got = embedding_distillation_loss(s, t, kind).numpy()
    assert got.dtype == np.float32 and got.shape == (32,)
    np.testing.assert_allclose(got, reference(s, t, kind), rtol=1e-5, atol=1e-6)
    assert abs(got[0]) < 1e-6
    assert got[1] == pytest.approx(4.0 if kind == "l2" else math.pi, rel=1e-6)


@pytest.mark.parametrize("kind", DISTILLATION_KINDS)
def test_gradients_finite_at_identity_and_teacher_frozen(kind):
    rng = np.random.default_rng(1)
    s_np, t_np = cases(rng)
    student = tf.Variable(s_np)
    teacher = tf.Variable(np.concatenate([s_np[:4], t_np[4:]]))  # rows 0-3: s == t
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(embedding_distillation_loss(student, teacher, kind))
    g_student, g_teacher = tape.gradient(loss, [student, teacher])
    assert g_teacher is None  # the teacher gets stop_gradient
    g = g_student.numpy()
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[:4], 0.0)  # s == t: zero, not NaN


def test_angular_gradient_is_unit_on_the_sphere():
    """d theta / d s has norm 1 for unit s at any angle (also tiny ones, where arccos of a
    float32 cosine would be off by orders of magnitude)."""
    rng = np.random.default_rng(2)
    base = unit(rng.normal(size=(1, 16)))[0]
    v = rng.normal(size=16)
    ortho = unit(v - base * (v @ base))
    for theta in (1e-4, 1e-3, 0.3, 2.0, 3.1):
        s = tf.Variable((np.cos(theta) * base + np.sin(theta) * ortho)[None].astype(np.float32))
        t = tf.constant(base[None].astype(np.float32))
        with tf.GradientTape() as tape:
            loss = embedding_distillation_loss(s, t, "angular")[0]
        assert float(loss) == pytest.approx(theta, rel=2e-3)
        assert np.linalg.norm(tape.gradient(loss, s).numpy()) == pytest.approx(1.0, rel=2e-2)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
def test_zero_embeddings_and_float16(dtype):
    # a zero student row (float32; in float16 the 1e6 gradient of normalising a zero vector
    # would overflow, and our backbones' embeddings are float32 anyway) and float16 inputs
    s = tf.constant([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]], dtype)
    if dtype == tf.float16:
        s = s[1:]
    t = tf.ones(s.shape, tf.float16)
    for kind in DISTILLATION_KINDS:
        with tf.GradientTape() as tape:
            tape.watch(s)
            loss = embedding_distillation_loss(s, t, kind)
        assert loss.dtype == tf.float32 and np.all(np.isfinite(loss.numpy()))
        assert np.all(np.isfinite(tape.gradient(loss, s).numpy()))


def test_errors():
    with pytest.raises(DistillationInputError, match="valid kinds: l2, angular"):
        embedding_distillation_loss(np.ones((2, 3)), np.ones((2, 3)), kind="cosine")
    with pytest.raises(DistillationInputError, match="same"):
        embedding_distillation_loss(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(DistillationInputError, match=r"\[B, D\]"):
        embedding_distillation_loss(np.ones(3), np.ones(3))
