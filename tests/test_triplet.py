"""Triplet losses against NumPy references written from the definitions (plain loops)."""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.losses import (
    ANGULAR_MARGIN,
    FACENET_MARGIN,
    angular_triplet_loss,
    pairwise_distances,
    triplet_anchor_mask,
    triplet_loss,
)

DISTANCES = ["squared_euclidean", "euclidean", "angular"]
MININGS = ["batch_hard", "semi_hard", "all"]


# ----------------------------------------------------------------------------------------------
# References (float64, loops)


def ref_distances(emb, distance):
    e = np.asarray(emb, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)
    n = len(e)
    d = np.zeros((n, n))
    for i, j in itertools.product(range(n), range(n)):
        diff = e[i] - e[j]
        sq = float(diff @ diff)
        if distance == "squared_euclidean":
            d[i, j] = sq
        elif distance == "euclidean":
            d[i, j] = math.sqrt(sq)
        else:  # insightface atriplet: arccos of the cosine
            d[i, j] = math.acos(min(1.0, max(-1.0, float(e[i] @ e[j]))))
    return d


def ref_triplet(labels, emb, margin, mining, distance, ties_are_farther=False):
    """Per-anchor loss. ``ties_are_farther``: count ``d(a, n) == d(a, p)`` as farther in the
    semi-hard search (the definition says strictly farther; float32 rounding can go either
    way when a negative coincides with a positive)."""
    d = ref_distances(emb, distance)
    n = len(labels)
    out = np.zeros(n)
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [k for k in range(n) if labels[k] != labels[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            out[a] = max(0.0, max(d[a, p] for p in pos) - min(d[a, k] for k in neg) + margin)
        elif mining == "semi_hard":
            terms = []
            for p in pos:
                farther = [
                    d[a, k]
                    for k in neg
                    if d[a, k] > d[a, p] or (ties_are_farther and d[a, k] == d[a, p])
                ]
                dn = min(farther) if farther else max(d[a, k] for k in neg)
                terms.append(max(0.0, d[a, p] - dn + margin))
            out[a] = np.mean(terms)
        else:
            out[a] = np.mean([max(0.0, d[a, p] - d[a, k] + margin) for p in pos for k in neg])
    return out


def tfa_semihard_numpy(labels, emb, margin):
    """tensorflow-addons' triplet_semihard_loss (squared L2), transcribed to NumPy."""
    d = ref_distances(emb, "squared_euclidean")
    labels = np.asarray(labels)
    adjacency = labels[:, None] == labels[None, :]
    total, count = 0.0, 0
    for a, p in itertools.product(range(len(labels)), repeat=2):
        if a == p or not adjacency[a, p]:
            continue
        neg = d[a][~adjacency[a]]
        outside = neg[neg > d[a, p]]
        semi = outside.min() if outside.size else neg.max()
        total += max(margin + d[a, p] - semi, 0.0)
        count += 1
    return total / count


def pk_batch(rng, p=4, k=3, dim=8, spread=0.6):
    centres = rng.normal(size=(p, dim))
    labels = np.repeat(np.arange(p) * 7 + 3, k).astype(np.int32)  # non-contiguous ids
    emb = np.repeat(centres, k, axis=0) + spread * rng.normal(size=(p * k, dim))
    order = rng.permutation(p * k)
    return labels[order], (emb[order] * rng.uniform(0.5, 3.0, size=(p * k, 1))).astype(np.float32)


def loss_and_grad(labels, emb, **kw):
    emb = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        per_example = triplet_loss(labels, emb, **kw)
        total = tf.reduce_sum(per_example)
    return per_example.numpy(), tape.gradient(total, emb).numpy()


# ----------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("distance", DISTANCES)
def test_pairwise_distances_match_reference(distance):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 16)).astype(np.float32)
    emb[3] = -emb[1]  # antipodal: distance 4 / 2 / pi
    got = pairwise_distances(emb, distance).numpy()
    assert got.dtype == np.float32 and np.all(np.diag(got) == 0.0)
    np.testing.assert_allclose(got, ref_distances(emb, distance), rtol=0, atol=1e-5)
    top = {"squared_euclidean": 4.0, "euclidean": 2.0, "angular": math.pi}[distance]
    assert got[1, 3] == pytest.approx(top, abs=1e-5)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_triplet_matches_reference(mining, distance):
    rng = np.random.default_rng(1)
    largest = 0.0
    for trial in range(3):
        labels, emb = pk_batch(rng, p=4 + trial, k=2 + trial, spread=1.0)
        margin = 0.3 if distance != "angular" else 0.35
        got = triplet_loss(labels, emb, margin=margin, mining=mining, distance=distance).numpy()
        want = ref_triplet(labels, emb, margin, mining, distance)
        assert got.dtype == np.float32 and got.shape == (len(labels),)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        largest = max(largest, want.max())
    assert largest > 0.05  # the batches are not trivially separated


def test_uneven_batch_with_singletons_matches_reference():
    rng = np.random.default_rng(2)
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4], np.int32)  # 2 and 4: no positive
    emb = rng.normal(size=(len(labels), 6)).astype(np.float32)
    for mining, distance in itertools.product(MININGS, DISTANCES):
        got = triplet_loss(labels, emb, margin=0.5, mining=mining, distance=distance).numpy()
        want = ref_triplet(labels, emb, 0.5, mining, distance)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{mining} {distance}")
        assert got[5] == 0.0 and got[10] == 0.0  # anchors without positives contribute 0
    mask = triplet_anchor_mask(labels).numpy()
    assert mask.tolist() == [i not in (5, 10) for i in range(len(labels))]


def test_semi_hard_mean_equals_tfa_on_pk_batch():
    rng = np.random.default_rng(3)
    labels, emb = pk_batch(rng, p=5, k=4, spread=0.9)
    got = triplet_loss(labels, emb, margin=0.2, mining="semi_hard").numpy().mean()
    assert got == pytest.approx(tfa_semihard_numpy(labels, emb, 0.2), abs=1e-5)


def test_semi_hard_picks_the_closest_farther_negative_else_the_farthest():
    # 1-D toy on the unit circle: anchor at angle 0, positive at 0.5 rad.
    angles = np.array([0.0, 0.5, 0.7, 1.2, -0.3])  # labels: a, p, n1 (semi-hard), n2, n3 (hard)
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array([0, 0, 1, 2, 3])
    got = triplet_loss(labels, emb, margin=0.35, mining="semi_hard", distance="angular").numpy()
    assert got[0] == pytest.approx(max(0.5 - 0.7 + 0.35, 0.0), abs=1e-5)  # n1, not n3
    # anchor 1 (at 0.5): positive 0 at 0.5 rad; negatives at 0.2, 0.7, 0.8 rad -> 0.7 (n2)
    assert got[1] == pytest.approx(0.5 - 0.7 + 0.35, abs=1e-5)
    # no negative farther than the positive: fall back to the farthest negative
    angles = np.array([0.0, 1.0, 0.2, 0.4])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    got = triplet_loss([0, 0, 1, 2], emb, margin=0.35, mining="semi_hard", distance="angular")
    assert got.numpy()[0] == pytest.approx(1.0 - 0.4 + 0.35, abs=1e-5)


def test_batch_hard_hand_computed():
    angles = np.array([0.0, 0.3, 0.9, 0.5, 2.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = [0, 0, 0, 1, 1]
    got = triplet_loss(labels, emb, mining="batch_hard", distance="angular").numpy()
    # anchor 0: hardest positive 0.9, hardest negative 0.5 -> 0.9 - 0.5 + 0.35
    assert got[0] == pytest.approx(0.75, abs=1e-5)
    sq = triplet_loss(labels, emb, mining="batch_hard").numpy()  # squared chord, margin 0.2
    chord2 = lambda t: 2.0 - 2.0 * math.cos(t)  # noqa: E731
    assert sq[0] == pytest.approx(chord2(0.9) - chord2(0.5) + 0.2, abs=1e-5)


def test_default_margins_and_angular_alias():
    rng = np.random.default_rng(4)
    labels, emb = pk_batch(rng)
    assert (FACENET_MARGIN, ANGULAR_MARGIN) == (0.2, 0.35)
    np.testing.assert_allclose(
        triplet_loss(labels, emb).numpy(),
        ref_triplet(labels, emb, 0.2, "batch_hard", "squared_euclidean"),
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        angular_triplet_loss(labels, emb).numpy(),
        triplet_loss(labels, emb, margin=0.35, distance="angular").numpy(),
    )
    np.testing.assert_array_equal(
        triplet_loss(labels, emb, distance="angular").numpy(),
        angular_triplet_loss(labels, emb).numpy(),
    )


def test_scale_invariant_and_float16_input():
    rng = np.random.default_rng(5)
    labels, emb = pk_batch(rng)
    base = triplet_loss(labels, emb, mining="semi_hard").numpy()
    np.testing.assert_allclose(triplet_loss(labels, 7.0 * emb, mining="semi_hard"), base, atol=1e-5)
    half = triplet_loss(labels, tf.constant(emb, tf.float16), mining="semi_hard")
    assert half.dtype == tf.float32
    np.testing.assert_allclose(half.numpy(), base, atol=3e-3)


# ----------------------------------------------------------------------------------------------
# Edge cases and gradients


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_identical_embeddings_give_exact_values_and_finite_gradients(mining, distance):
    labels = np.repeat([0, 1, 2], 3).astype(np.int32)
    emb = np.random.default_rng(6).normal(size=(9, 8)).astype(np.float32)
    emb[1] = emb[0]  # a positive pair coincides
    emb[4] = 2.5 * emb[3]  # a positive pair with the same direction, different norms
    emb[6] = emb[2]  # a negative pair coincides: d(a, 2) == d(a, 6) for every anchor a
    d = pairwise_distances(emb, distance).numpy()
    assert d[0, 1] == 0.0 and d[2, 6] == 0.0 and d[3, 4] < 1e-3
    per_example, grad = loss_and_grad(labels, emb, mining=mining, distance=distance)
    assert np.all(np.isfinite(grad)), grad
    margin = 0.35 if distance == "angular" else 0.2
    strict = ref_triplet(labels, emb, margin, mining, distance)
    tied = ref_triplet(labels, emb, margin, mining, distance, ties_are_farther=True)
    # float32 rounding decides the semi-hard ties (anchors 0 and 1 with positive 2 and
    # negative 6); every other value must be the reference's. d(3, 4) is ~3e-4 instead of 0
    # (Gram-matrix cancellation, see the module doc), hence the looser tolerance there.
    atol = np.where(
        np.isin(np.arange(9), [3, 4, 5]) & (distance != "squared_euclidean"), 1e-3, 1e-5
    )
    ok = (np.abs(per_example - strict) <= atol) | (np.abs(per_example - tied) <= atol)
    assert ok.all(), (per_example, strict, tied)
    if mining != "semi_hard":
        np.testing.assert_array_equal(strict, tied)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_all_embeddings_identical(mining, distance):
    emb = np.tile(np.array([[0.3, -1.2, 0.5, 2.0]], np.float32), (6, 1))
    labels = [0, 0, 1, 1, 2, 2]
    per_example, grad = loss_and_grad(labels, emb, margin=0.25, mining=mining, distance=distance)
    # every distance is 0, so every triplet costs exactly the margin
    np.testing.assert_allclose(per_example, 0.25, atol=1e-6)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("mining", MININGS)
def test_single_identity_batch_is_zero(mining):
    emb = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)
    for distance in DISTANCES:
        per_example, grad = loss_and_grad([3] * 5, emb, mining=mining, distance=distance)
        assert np.all(per_example == 0.0) and np.all(grad == 0.0)
    assert not triplet_anchor_mask([3] * 5).numpy().any()


def test_antipodal_and_zero_embeddings_have_finite_gradients():
    emb = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    for mining, distance in itertools.product(MININGS, DISTANCES):
        per_example, grad = loss_and_grad([0, 0, 1, 1], emb, mining=mining, distance=distance)
        assert np.all(np.isfinite(per_example)) and np.all(np.isfinite(grad)), (mining, distance)


def test_batch_hard_gradient_matches_finite_differences():
    rng = np.random.default_rng(8)
    labels, emb = pk_batch(rng, p=3, k=3)
    emb = emb.astype(np.float64)
    _, grad = loss_and_grad(
        labels, emb.astype(np.float32), mining="batch_hard", distance="euclidean"
    )
    eps = 1e-4
    i, j = 2, 5
    for row, col in [(i, 0), (j, 3), (0, 7)]:
        up, down = emb.copy(), emb.copy()
        up[row, col] += eps
        down[row, col] -= eps
        fd = (
            ref_triplet(labels, up, 0.2, "batch_hard", "euclidean").sum()
            - ref_triplet(labels, down, 0.2, "batch_hard", "euclidean").sum()
        ) / (2 * eps)
        assert grad[row, col] == pytest.approx(fd, abs=2e-3)


def test_xla_agrees_with_eager():
    # semi-hard is the one with sorts and binary searches; static shapes compile with XLA.
    rng = np.random.default_rng(9)
    labels, emb = pk_batch(rng)
    eager = triplet_loss(labels, emb, mining="semi_hard", distance="angular").numpy()
    fn = tf.function(
        lambda y, x: triplet_loss(y, x, mining="semi_hard", distance="angular"), jit_compile=True
    )
    np.testing.assert_allclose(fn(labels, emb).numpy(), eager, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mining must be one of"):
        triplet_loss([0, 0], np.ones((2, 2), np.float32), mining="hardest")
    with pytest.raises(ValueError, match="distance must be one of"):
        triplet_loss([0, 0], np.ones((2, 2), np.float32), distance="cosine")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        triplet_loss([0, 0], np.ones((2, 2), np.float32), margin=-0.1)


# ----------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize(
    "mining, distance", [("batch_hard", "squared_euclidean"), ("semi_hard", "angular")]
)
def test_short_training_run_decreases_the_loss(mining, distance):
    rng = np.random.default_rng(10)
    classes, per_class, dim = 8, 4, 16
    centres = rng.normal(size=(classes, dim))
    x = (np.repeat(centres, per_class, axis=0) + 0.8 * rng.normal(size=(32, dim))).astype(
        np.float32
    )
    y = np.repeat(np.arange(classes), per_class).astype(np.int32)
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input((dim,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(8)]
    )
    opt = keras.optimizers.Adam(1e-2)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(triplet_loss(y, net(x), mining=mining, distance=distance))
        grads = tape.gradient(loss, net.trainable_variables)
        opt.apply_gradients(zip(grads, net.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(40)]
    assert all(np.isfinite(losses))
    assert losses[0] > 0.05
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses
