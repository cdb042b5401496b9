"""PFE: the mutual likelihood score against NumPy references written from the paper, the loss,
the uncertainty head, the evaluator, and a real (small) check that degraded faces get larger
variances."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.evaluation.quality import (
    QualityInputError,
    evaluate_pfe,
    feature_norms,
    pfe_uncertainty,
    score_verification_metrics,
    summarize_quality,
)
from facerec_tf.evaluation.verification import evaluate_embeddings
from facerec_tf.losses.pfe import (
    PFEInputError,
    UncertaintyHead,
    build_pfe_model,
    feature_extractor,
    fuse_gaussians,
    genuine_counts,
    harmonic_mean_variance,
    mls_loss,
    mutual_likelihood_score,
    pairwise_mls,
    pfe_pair_scores,
)

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# References (float64, literal formulas)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_mls(mu1, logvar1, mu2, logvar2):
    """Paper Eq. 3: -1/2 sum[(mu1 - mu2)^2 / (s1 + s2) + log(s1 + s2)] - D/2 log 2 pi."""
    mu1, mu2 = unit(mu1), unit(mu2)
    s = np.exp(np.asarray(logvar1, np.float64)) + np.exp(np.asarray(logvar2, np.float64))
    d = mu1.shape[-1]
    return -0.5 * np.sum((mu1 - mu2) ** 2 / s + np.log(s), axis=-1) - d / 2 * LOG_2PI


def official_negative_mls(mu1, logvar1, mu2, logvar2):
    """seasonSH/Probabilistic-Face-Embeddings utils/tflib.py negative_MLS (mean=False)."""
    s = np.exp(np.asarray(logvar1, np.float64)) + np.exp(np.asarray(logvar2, np.float64))
    return np.sum((unit(mu1) - unit(mu2)) ** 2 / (1e-10 + s) + np.log(s), axis=-1)


def reference_loss(labels, mu, logvar):
    out = np.zeros(len(labels))
    for i in range(len(labels)):
        vals = [
            -reference_mls(mu[i], logvar[i], mu[j], logvar[j])
            for j in range(len(labels))
            if j != i and labels[j] == labels[i]
        ]
        out[i] = np.mean(vals) if vals else 0.0
    return out


def random_gaussians(rng, n, d, lo=-8.0, hi=2.0):
    return (
        rng.normal(size=(n, d)).astype(np.float32),
        rng.uniform(lo, hi, size=(n, d)).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------
# MLS


def test_mls_matches_paper_equation():
    rng = np.random.default_rng(0)
    mu1, lv1 = random_gaussians(rng, 40, 32)
    mu2, lv2 = random_gaussians(rng, 40, 32)
    mu2[:5] = mu1[:5] * 3.0  # same direction, other norm: identical after normalisation
    lv2[:5] = lv1[:5]
    want = reference_mls(mu1, lv1, mu2, lv2)
    got = mutual_likelihood_score(mu1, lv1, mu2, lv2).numpy()
    assert got.dtype == np.float32 and got.shape == (40,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    bare = mutual_likelihood_score(mu1, lv1, mu2, lv2, include_constant=False).numpy()
    np.testing.assert_allclose(bare, want + 32 / 2 * LOG_2PI, rtol=1e-5)
    # the official code's score is -2 * MLS without the constant (up to its 1e-10)
    np.testing.assert_allclose(
        -2 * (want + 32 / 2 * LOG_2PI), official_negative_mls(mu1, lv1, mu2, lv2), rtol=1e-5
    )
    # NumPy evaluator version: same formula in float64 (eps=0: the bare equation)
    np.testing.assert_allclose(pfe_pair_scores(mu1, lv1, mu2, lv2, eps=0), want, rtol=1e-12)
    np.testing.assert_allclose(pfe_pair_scores(mu1, lv1, mu2, lv2), want, rtol=1e-5)


def test_pairwise_mls_matrix():
    rng = np.random.default_rng(1)
    mu, lv = random_gaussians(rng, 9, 16)
    got = pairwise_mls(mu, lv).numpy()
    want = np.array(
        [[reference_mls(mu[i], lv[i], mu[j], lv[j]) for j in range(9)] for i in range(9)]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, got.T, rtol=1e-6)


def test_mls_loss_per_anchor_means():
    rng = np.random.default_rng(2)
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 0, 5, 1], np.int32)  # 3 and 5: no genuine pair
    mu, lv = random_gaussians(rng, len(labels), 24)
    got = mls_loss(labels, mu, lv).numpy()
    assert got.dtype == np.float32 and got.shape == (len(labels),)
    np.testing.assert_allclose(got, reference_loss(labels, mu, lv), rtol=1e-5)
    assert got[6] == 0.0 and got[8] == 0.0
    np.testing.assert_array_equal(genuine_counts(labels).numpy(), [2, 2, 1, 2, 2, 2, 0, 2, 0, 1])


def test_mls_loss_on_pk_batch_is_half_the_official_loss():
    """P x K batch: mean of the per-anchor losses = official mean over genuine pairs / 2 +
    D/2 log 2 pi (the docstring's conversion)."""
    rng = np.random.default_rng(3)
    p, k, d = 4, 3, 8
    labels = np.repeat(np.arange(p), k)
    mu, lv = random_gaussians(rng, p * k, d)
    mask = (labels[:, None] == labels[None]) & ~np.eye(p * k, dtype=bool)
    official = official_negative_mls(mu[:, None], lv[:, None], mu[None], lv[None])[mask].mean()
    ours = float(tf.reduce_mean(mls_loss(labels, mu, lv)))
    assert ours == pytest.approx(official / 2 + d / 2 * LOG_2PI, rel=1e-5)


@pytest.mark.parametrize("logvar", [0.0, -30.0, -100.0, 40.0, 200.0, "mixed"])
def test_mls_loss_gradients_finite(logvar):
    rng = np.random.default_rng(4)
    labels = tf.constant([0, 0, 1, 1, 1, 2])
    mu = tf.constant(rng.normal(size=(6, 16)), tf.float32)
    mu = tf.concat([mu[:1], mu[:1], mu[2:]], 0)  # rows 0 and 1 identical embeddings
    if logvar == "mixed":
        lv = tf.constant(rng.choice([-100.0, -7.0, 0.0, 200.0], size=(6, 16)), tf.float32)
    else:
        lv = tf.fill([6, 16], float(logvar))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([mu, lv])
        loss = mls_loss(labels, mu, lv)
        score = tf.reduce_sum(mutual_likelihood_score(mu, lv, tf.reverse(mu, [0]), lv))
    assert np.all(np.isfinite(loss.numpy()))
    g_lv = tape.gradient(loss, lv)
    assert np.all(np.isfinite(g_lv.numpy()))
    assert tape.gradient(loss, mu) is None  # mu: stop_gradient, only the head trains
    g_score = tape.gradient(score, [mu, lv])
    assert all(np.all(np.isfinite(g.numpy())) for g in g_score)


def test_mls_gradient_matches_finite_differences():
    rng = np.random.default_rng(5)
    labels = np.array([0, 0, 1, 1])
    mu = rng.normal(size=(4, 6))
    lv = tf.Variable(rng.uniform(-3, 1, size=(4, 6)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(mls_loss(labels, mu, lv))
    grad = tape.gradient(loss, lv).numpy()
    base = lv.numpy().astype(np.float64)
    eps = 1e-4
    bump = base.copy()
    bump[1, 2] += eps
    num = (reference_loss(labels, mu, bump).sum() - reference_loss(labels, mu, base).sum()) / eps
    assert grad[1, 2] == pytest.approx(num, rel=1e-3)


def test_mls_shape_errors():
    with pytest.raises(PFEInputError, match="same shape"):
        mutual_likelihood_score(np.ones((2, 4)), np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(PFEInputError, match=r"expected \[B, D\]"):
        mls_loss([0, 0], np.ones((2, 4, 1)), np.ones((2, 4, 1)))
    with pytest.raises(PFEInputError, match="labels"):
        mls_loss([0, 0, 1], np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(PFEInputError, match="four"):
        pfe_pair_scores(np.ones((2, 4)), np.ones((2, 4)), np.ones((3, 4)), np.ones((3, 4)))


def test_fusion_and_harmonic_mean():
    mu = np.array([[1.0, 0.0], [0.0, 2.0]])
    lv = np.log([[1.0, 1.0], [4.0, 4.0]])
    np.testing.assert_allclose(harmonic_mean_variance(np.log([[1.0, 4.0]])), [1.6])
    fused_mu, fused_lv = fuse_gaussians([mu[:1], mu[1:]], [lv[:1], lv[1:]])
    # precisions 1 and 1/4: mu = (1 * [1, 0] + 0.25 * [0, 1]) / 1.25, renormalised
    np.testing.assert_allclose(fused_mu, unit([[1.0, 0.25]]))
    np.testing.assert_allclose(np.exp(fused_lv), [[0.8, 0.8]])


# ----------------------------------------------------------------------------------------------
# The head


def test_head_output_and_initial_variance():
    head = UncertaintyHead(8, hidden_units=12)
    x = np.random.default_rng(0).normal(size=(5, 3, 2, 4)).astype(np.float32)  # flattened
    out = head(x, training=False).numpy()
    assert out.shape == (5, 8) and out.dtype == np.float32
    # gamma starts at 1e-4: every sigma^2 is exp(-7) + 1e-6 up to ~1e-3
    np.testing.assert_allclose(out, math.log(math.exp(-7) + 1e-6), atol=2e-3)
    assert head.fc1.kernel.shape == (24, 12) and head.fc2.kernel.shape == (12, 8)
    assert not head.fc1.use_bias and not head.bn2.center and not head.bn2.scale
    assert sorted(w.name for w in head.trainable_weights) == [
        "beta",
        "beta",
        "gamma",
        "gamma",
        "kernel",
        "kernel",
    ]
    with pytest.raises(PFEInputError, match="static inner"):
        UncertaintyHead(8).build((None, None))


def test_head_floor_and_large_outputs_are_finite():
    head = UncertaintyHead(4, min_variance=1e-6)
    head.build((None, 4))
    head.gamma.assign(1e4)  # extreme log-variances both ways
    x = np.array([[5.0, -5.0, 0.0, 1.0], [-5.0, 5.0, 1.0, 0.0]], np.float32)
    out = head(x, training=True).numpy()
    assert np.all(np.isfinite(out)) and out.min() >= math.log(1e-6) - 1e-5 and out.max() > 1e3


def test_head_serialization_round_trip(tmp_path):
    inp = keras.Input((10,))
    head = UncertaintyHead(6, hidden_units=7, gamma_init=0.5, bn_momentum=0.9, name="uncertainty")
    model = keras.Model(inp, head(inp))
    x = np.random.default_rng(1).normal(size=(16, 10)).astype(np.float32)
    model(x, training=True)  # move the BN statistics away from their initial values
    want = model.predict(x, verbose=0)
    path = tmp_path / "pfe_head.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), want)
    clone = UncertaintyHead.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    assert clone.get_config()["hidden_units"] == 7 and clone.bn_momentum == 0.9


def test_head_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = UncertaintyHead(4)
        out = head(tf.ones([3, 5], tf.float16), training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.float32


def _first_row_per_class():
    from facerec_tf.models.registry import BACKBONES

    seen = {}
    for name, (cls, _) in BACKBONES.items():
        seen.setdefault(cls, name)
    return list(seen.values())


@pytest.mark.parametrize("name", _first_row_per_class())
def test_feature_extractor_on_every_backbone_class(name):
    """Every backbone class of the registry (depth variants share the head code): features =
    the input of the embedding dense layer, embedding = the backbone's output."""
    from facerec_tf.models.registry import create_backbone

    try:
        backbone = create_backbone(name, input_shape=(32, 32, 3), embedding_size=16)
    except ValueError:  # a stem that needs its native input size
        backbone = create_backbone(name, embedding_size=16)
    extractor = feature_extractor(backbone)
    size = tuple(backbone.inputs[0].shape[1:])
    x = np.random.default_rng(0).uniform(0, 255, size=(2, *size)).astype(np.float32)
    features, embedding = extractor(x, training=False)
    np.testing.assert_allclose(embedding, backbone(x, training=False), rtol=1e-5, atol=1e-5)
    dense = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Dense)][-1]
    assert features.shape == (2, dense.kernel.shape[0])
    assert dense.kernel.shape[1] == 16  # the embedding projection, not an SE/attention dense
    _, same = feature_extractor(backbone, source="embedding")(x, training=False)
    np.testing.assert_allclose(same, embedding, rtol=1e-5, atol=1e-5)


def test_feature_extractor_errors_and_pfe_model():
    inp = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inp)
    with pytest.raises(PFEInputError, match="no Dense layer"):
        feature_extractor(keras.Model(inp, conv))
    flat = keras.layers.Flatten(name="flat")(conv)
    emb = keras.layers.Dense(5, name="fc")(flat)
    model = keras.Model(inp, emb)
    with pytest.raises(PFEInputError, match="no layer named"):
        feature_extractor(model, feature_layer="nope")
    with pytest.raises(PFEInputError, match="source"):
        feature_extractor(model, source="logits")
    pfe = build_pfe_model(model, UncertaintyHead(5))
    x = np.zeros((3, 8, 8, 3), np.float32)
    mu, logvar = pfe(x, training=False)
    assert mu.shape == (3, 5) and logvar.shape == (3, 5)


# ----------------------------------------------------------------------------------------------
# Evaluator


def _pairs(rng, n_pairs, d=16, noise=0.6):
    """Interleaved pairs: even pairs genuine (shared centre), odd impostors."""
    issame = np.arange(n_pairs) % 2 == 0
    a = rng.normal(size=(n_pairs, d))
    b = np.where(issame[:, None], a, rng.normal(size=(n_pairs, d)))
    emb = np.empty((2 * n_pairs, d))
    emb[0::2] = a + noise * rng.normal(size=a.shape)
    emb[1::2] = b + noise * rng.normal(size=b.shape)
    return emb, issame


def test_evaluate_pfe_with_constant_variance_ranks_like_cosine():
    """With one sigma^2 for every image MLS is an affine function of the squared distance:
    the ROC figures must equal the cosine evaluator's, the accuracy agree to its grid."""
    rng = np.random.default_rng(6)
    emb, issame = _pairs(rng, 400)
    logvar = np.full_like(emb, -3.0)
    got = evaluate_pfe("toy", emb, logvar, issame)
    ref = evaluate_embeddings("toy", emb, None, issame)
    assert got.auc == pytest.approx(ref.auc, abs=1e-12)
    assert got.eer == pytest.approx(ref.eer, abs=1e-12)
    assert got.tar_at_far == pytest.approx(ref.tar_at_far, abs=1e-12)
    assert got.accuracy == pytest.approx(ref.accuracy, abs=0.01)
    assert got.num_pairs == 400 and got.flip is False
    assert got.xnorm == pytest.approx(np.mean(np.linalg.norm(emb, axis=1)))
    # MLS threshold: "same" when MLS > best_threshold
    scores = pfe_pair_scores(emb[0::2], logvar[0::2], emb[1::2], logvar[1::2])
    assert scores.min() < got.best_threshold < scores.max()
    flipped = evaluate_pfe("toy", emb, logvar, issame, emb, logvar)
    assert flipped.flip is True and flipped.auc == pytest.approx(ref.auc, abs=1e-12)


def test_score_metrics_separable_and_errors():
    scores = np.r_[np.linspace(5, 6, 50), np.linspace(-6, -5, 50)]
    issame = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    order = np.random.default_rng(8).permutation(100)
    m = score_verification_metrics(scores[order], issame[order])
    np.testing.assert_array_equal(m["accuracy"], 1.0)
    # halfway between the train folds' worst genuine and best impostor scores
    np.testing.assert_allclose(m["best_thresholds"], 0.0, atol=0.05)
    assert m["val"] == 1.0 and m["far"] == 0.0
    with pytest.raises(QualityInputError, match="not finite"):
        score_verification_metrics(np.r_[np.nan, scores[1:]], issame)
    with pytest.raises(QualityInputError, match="2 images per pair"):
        evaluate_pfe("x", np.ones((6, 3)), np.ones((6, 3)), np.ones(4, bool))


def test_feature_norm_quality():
    emb = np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    np.testing.assert_allclose(feature_norms(emb), [5.0, 1.0, 10.0])
    s = summarize_quality("lfw", feature_norms(emb))
    assert (s.count, s.mean, s.median, s.min, s.max) == (3, pytest.approx(16 / 3), 5.0, 1.0, 10.0)
    assert "lfw" in s.line() and s.to_dict()["count"] == 3
    assert math.isnan(summarize_quality("empty", []).mean)
    np.testing.assert_allclose(pfe_uncertainty(np.log([[2.0, 2.0]])), [2.0])
    with pytest.raises(QualityInputError):
        feature_norms(np.ones(3))


# ----------------------------------------------------------------------------------------------
# The required quality check: degraded faces must get larger variances


def _blur(images, sigma):
    """Gaussian blur (reflect padding), per-image sigma."""
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (len(images),))
    out = np.empty_like(images)
    for s in np.unique(sigma):
        sel = sigma == s
        r = math.ceil(3 * s)
        k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * s * s))
        k /= k.sum()
        kernel = np.tile(np.outer(k, k).astype(np.float32)[:, :, None, None], (1, 1, 3, 1))
        padded = np.pad(images[sel], ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
        out[sel] = tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID").numpy()
    return out


def _occlude(images, rng):
    """A black box of 40-60% of the height and 50-90% of the width, anywhere."""
    out = images.copy()
    _, h, w, _ = out.shape
    for img in out:
        bh = rng.integers(int(0.4 * h), int(0.6 * h) + 1)
        bw = rng.integers(int(0.5 * w), int(0.9 * w) + 1)
        y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        img[y : y + bh, x : x + bw] = 0.0
    return out


@pytest.mark.slow
def test_degraded_faces_get_larger_variance():
    """End to end on synthetic faces (32 x 32), ~15-25 s on 2 cores.

    1. A tiny conv backbone (3 strided convs, dense 64, BN "features") is *trained* for 80
       steps with an ArcFace head on 64 identities x 8 clean samples. (A fixed random net was
       not used: with it, and with BN statistics left at their initial values, the embedding
       barely separates identities and the test would measure noise.)
    2. Frozen, it embeds clean images, blurred copies (sigma 2-3.5 px) and occluded copies.
    3. The UncertaintyHead (features = the input of the dense layer) is trained with
       ``mls_loss`` for 150 steps on P x K batches: per identity 4 clean images plus the
       blurred copy of one and the occluded copy of another.
    4. On 32 *held-out* identities, the mean harmonic-mean sigma^2 of blurred (sigma 2.5) and
       occluded images must exceed that of the clean originals, image by image too.

    Observed while writing it: when a batch holds several occluded images of one identity,
    MLS pushes their variance *down*: the backbone maps every heavily occluded face near one
    point, so occluded genuine pairs are close (MLS only sees genuine pairs). Hence one
    degraded copy of each kind per identity and batch, and boxes of varied size and place.
    """
    from facerec_tf.data.synthetic import (
        HELD_OUT_IDENTITY_OFFSET,
        SyntheticConfig,
        render_faces,
    )
    from facerec_tf.heads import MarginHead

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size, num_ids, per_id = 32, 64, 8
    config = SyntheticConfig(occlusion=0.0)  # occlusion is the degradation under test

    def render(ids, keys, seed):
        images = render_faces(ids, keys, seed=seed, image_size=(size, size), config=config)
        return images.numpy().astype(np.float32)

    labels = np.repeat(np.arange(num_ids), per_id).astype(np.int32)
    clean = render(labels, np.tile(np.arange(per_id), num_ids), seed=0)

    # 1. backbone
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 128, offset=-127.5 / 128)(inp)
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.8)(x))
    x = keras.layers.Dense(64, name="fc")(keras.layers.Flatten()(x))
    backbone = keras.Model(inp, keras.layers.BatchNormalization(momentum=0.8, name="features")(x))
    margin = MarginHead(num_ids, scale=32.0, m2=0.3)
    opt = keras.optimizers.Adam(3e-3)

    @tf.function
    def backbone_step(images, y):
        with tf.GradientTape() as tape:
            logits = margin(backbone(images, training=True), y)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            )
        variables = backbone.trainable_variables + margin.trainable_variables
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    for _ in range(80):
        idx = rng.choice(len(clean), 64, replace=False)
        loss = backbone_step(clean[idx], labels[idx])
    assert float(loss) < 1.0

    # 2. frozen features of clean, blurred and occluded copies
    backbone.trainable = False
    extractor = feature_extractor(backbone)
    n = len(clean)
    images = np.concatenate([clean, _blur(clean, rng.uniform(2.0, 3.5, n)), _occlude(clean, rng)])
    features, embeddings = (t.numpy() for t in extractor(images, training=False))
    all_labels = np.tile(labels, 3)

    # 3. the head
    head = UncertaintyHead(64, bn_momentum=0.9)  # few steps: faster BN statistics
    head_opt = keras.optimizers.Adam(1e-2)

    @tf.function
    def head_step(f, e, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(mls_loss(y, e, head(f, training=True)))
        grads = tape.gradient(loss, head.trainable_variables)
        head_opt.apply_gradients(zip(grads, head.trainable_variables))
        return loss

    for _ in range(150):
        batch = []
        for c in rng.choice(num_ids, 16, replace=False):
            pick = c * per_id + rng.choice(per_id, 4, replace=False)
            batch += [*pick, n + pick[0], 2 * n + pick[1]]
        batch = np.array(batch)
        head_step(features[batch], embeddings[batch], all_labels[batch])

    # 4. held-out identities
    ids = np.repeat(np.arange(32), 4) + HELD_OUT_IDENTITY_OFFSET
    held = render(ids, np.tile(np.arange(4), 32) + 100, seed=100)
    sets = {
        "clean": held,
        "blur": _blur(held, 2.5),
        "occluded": _occlude(held, np.random.default_rng(1)),
    }
    variance, unit_emb = {}, {}
    for name, imgs in sets.items():
        f, e = extractor(imgs, training=False)
        variance[name] = harmonic_mean_variance(head(f, training=False).numpy())
        unit_emb[name] = unit(e.numpy())

    # the backbone generalises (a real embedding, not noise) ...
    same = (ids[:, None] == ids[None]) & ~np.eye(len(ids), dtype=bool)
    cos = unit_emb["clean"] @ unit_emb["clean"].T
    assert cos[same].mean() > cos[~same].mean() + 0.2
    # ... and the degradations make the embedding less reliable (what PFE should detect)
    for name in ("blur", "occluded"):
        c = unit_emb[name] @ unit_emb["clean"].T
        assert c[same].mean() < cos[same].mean()
    clean_var = variance["clean"].mean()
    for name in ("blur", "occluded"):
        ratio = variance[name].mean() / clean_var
        paired = np.mean(variance[name] > variance["clean"])
        assert ratio > 1.2, (name, ratio, {k: v.mean() for k, v in variance.items()})
        assert paired > 0.8, (name, paired)
