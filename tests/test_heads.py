"""The combined-margin head against a NumPy reference written from the formula."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.heads import (
    MARGIN_PRESETS,
    ClassCenters,
    MarginHead,
    SoftmaxHead,
    combined_margin,
    create_head,
    list_heads,
)


def reference_logits(cos, labels, s, m1, m2, m3, easy_margin=False, threshold=0.0):
    """logit_y = s (cos(m1 theta + m2) - m3), others s cos, insightface fallbacks (float64)."""
    cos = np.asarray(cos, np.float64)
    out = cos.copy()
    if threshold > 0:
        out[out > threshold] = 0.0
    for i, y in enumerate(labels):
        if y < 0:
            continue
        c = cos[i, y]
        theta = math.acos(min(1.0, max(-1.0, c)))
        if m1 == 1.0:
            if easy_margin:
                t = math.cos(theta + m2) if c > 0 else c
            elif theta + m2 < math.pi:
                t = math.cos(theta + m2)
            else:  # insightface: cos - sin(pi - m2) * m2 once theta + m2 passes pi
                t = c - math.sin(math.pi - m2) * m2
        else:  # SphereFace psi = (-1)^k cos(m1 theta + m2) - 2k
            a = m1 * theta + m2
            k = math.floor(a / math.pi)
            t = (-1) ** k * math.cos(a) - 2 * k
            if easy_margin and c <= 0:
                t = c
        out[i, y] = t - m3
    return s * out


EDGE_COS = [1.0, -1.0, 0.0, 0.999999, -0.999999, math.cos(math.pi - 0.5) - 1e-3, 0.5]


def make_cases(rng, batch=24, classes=11):
    cos = rng.uniform(-1, 1, size=(batch, classes)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    for i, c in enumerate(EDGE_COS):
        cos[i, labels[i]] = c  # edge values on the target column
        cos[i, (labels[i] + 1) % classes] = -c  # and on a non-target column
    cos[len(EDGE_COS), labels[len(EDGE_COS)]] = -0.95  # theta + m2 > pi for ArcFace
    labels[-1] = -1  # a row whose target is not among these classes
    return cos, labels


MARGINS = [
    dict(m1=1.0, m2=0.5, m3=0.0),
    dict(m1=1.0, m2=0.5, m3=0.0, easy_margin=True),
    dict(m1=1.0, m2=0.0, m3=0.35),
    dict(m1=1.35, m2=0.0, m3=0.0),
    dict(m1=4.0, m2=0.0, m3=0.0),
    dict(m1=1.0, m2=0.3, m3=0.2),
    dict(m1=0.9, m2=0.4, m3=0.15),
    dict(m1=1.0, m2=0.5, m3=0.0, threshold=0.3),
]


@pytest.mark.parametrize("margin", MARGINS, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_margin_matches_numpy_reference(margin):
    rng = np.random.default_rng(0)
    cos, labels = make_cases(rng)
    m = dict(margin)
    threshold = m.pop("threshold", 0.0)
    got = combined_margin(
        cos, labels, scale=64.0, interclass_filtering_threshold=threshold, **m
    ).numpy()
    want = reference_logits(cos, labels, 64.0, threshold=threshold, **m)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got / 64.0, want / 64.0, rtol=0, atol=1e-5)
    # rows with label -1 are untouched (apart from filtering)
    np.testing.assert_allclose(got[-1], want[-1], atol=1e-4)


def test_arcface_fallback_is_insightface_linear_term():
    c = -0.95  # theta = 2.82 rad, theta + 0.5 > pi
    got = combined_margin([[c, 0.1]], [0], scale=1.0, m1=1.0, m2=0.5, m3=0.0).numpy()[0, 0]
    assert got == pytest.approx(c - math.sin(0.5) * 0.5, abs=1e-6)
    # without the fallback cos(theta + m) would *increase* the logit here
    assert got < math.cos(math.acos(c) + 0.5)


@pytest.mark.parametrize("margin", MARGINS[:7], ids=str)
def test_margin_gradients_finite_at_edges(margin):
    m = {k: v for k, v in margin.items() if k != "threshold"}
    cos = tf.constant([[c, -c, 0.2] for c in EDGE_COS], tf.float32)
    labels = tf.zeros([len(EDGE_COS)], tf.int32)
    with tf.GradientTape() as tape:
        tape.watch(cos)
        loss = tf.reduce_sum(combined_margin(cos, labels, **m))
    grad = tape.gradient(loss, cos).numpy()
    assert np.all(np.isfinite(grad)), grad
    # gradient of a non-target logit is exactly the scale
    np.testing.assert_allclose(grad[:, 2], 64.0)


def test_head_gradients_finite_when_embedding_equals_centre():
    head = MarginHead(4, m2=0.5)
    emb = tf.random.normal([4, 8], seed=1)
    head.build(emb.shape)
    head.centers.kernel.assign(emb.numpy() * 3.0)  # cos = 1 exactly on the diagonal
    labels = tf.range(4)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        logits = head(emb, labels)
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    g_emb, g_w = tape.gradient(loss, [emb, head.centers.kernel])
    assert np.all(np.isfinite(g_emb.numpy())) and np.all(np.isfinite(g_w.numpy()))
    # float32 cannot resolve theta below ~3.5e-4 rad next to cos = 1 (1 - 2**-24 is the
    # largest float below 1), hence the tolerance; the point here is finiteness.
    np.testing.assert_allclose(logits.numpy().diagonal(), 64 * math.cos(0.5), rtol=5e-4)


def test_head_equals_formula_on_real_cosines():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(6, 16)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0], np.int32)
    head = create_head("cosface", 5)
    head.build(emb.shape)
    w = head.centers.kernel.numpy()
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=1, keepdims=True)
    ).T
    want = reference_logits(cos, labels, 64.0, 1.0, 0.0, 0.35)
    np.testing.assert_allclose(head(emb, labels).numpy(), want, atol=2e-4)
    np.testing.assert_allclose(head(emb).numpy(), 64.0 * cos, atol=2e-4)  # inference: no margin


def test_labels_must_be_in_range():
    with pytest.raises(tf.errors.InvalidArgumentError):
        combined_margin(tf.zeros([2, 3]), tf.constant([0, 3]))


def test_presets():
    assert (
        MARGIN_PRESETS["arcface"].m1,
        MARGIN_PRESETS["arcface"].m2,
        MARGIN_PRESETS["arcface"].m3,
    ) == (1, 0.5, 0)
    assert MARGIN_PRESETS["cosface"].m3 == 0.35
    assert MARGIN_PRESETS["sphereface"].m1 > 1
    assert (MARGIN_PRESETS["combined"].m2, MARGIN_PRESETS["combined"].m3) == (0.3, 0.2)
    assert all(p.scale == 64.0 for p in MARGIN_PRESETS.values())
    with pytest.raises(ValueError, match="valid names: arcface"):
        create_head("arcfce", 10)


@pytest.mark.parametrize("name", list_heads())
def test_every_head_round_trips(name, tmp_path):
    emb_in = keras.Input((16,), name="embedding")
    lab_in = keras.Input((), dtype="int32", name="label")
    head = create_head(name, 7)
    model = keras.Model([emb_in, lab_in], head(emb_in, lab_in))
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(5, 16)).astype(np.float32), np.array([0, 1, 2, 3, 6], np.int32)]
    want = model.predict(x, verbose=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), want)
    clone = type(head).from_config(head.get_config())
    assert clone.get_config() == head.get_config()


def test_softmax_head_variants():
    emb = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    plain = SoftmaxHead(4)
    assert plain(emb).shape == (3, 4) and len(plain.weights) == 2  # kernel + bias
    normed = SoftmaxHead(4, normalize=True, scale=10.0)
    out = normed(emb).numpy()
    assert np.all(np.abs(out) <= 10.0 + 1e-4) and len(normed.weights) == 1


def test_class_centers_layout():
    centers = ClassCenters(10)
    cos = centers(tf.ones([2, 4])).numpy()
    assert centers.kernel.shape == (10, 4)  # one row per class: row blocks are shards
    assert cos.shape == (2, 10) and np.all(np.abs(cos) <= 1 + 1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        ClassCenters(0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_step_keeps_logits_float32(policy):
    from facerec_tf.models import create_backbone

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        backbone = create_backbone("mobilefacenet", embedding_size=32)
        head = create_head("arcface", 5)
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        if policy == "mixed_float16":
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        images = tf.random.uniform([4, 112, 112, 3], 0, 255, seed=2)
        labels = tf.constant([0, 1, 2, 3], tf.int32)
        with tf.GradientTape() as tape:
            emb = backbone(images, training=True)
            logits = head(emb, labels)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            )
            scaled = optimizer.scale_loss(loss)
        variables = backbone.trainable_variables + head.trainable_variables
        grads = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(grads, variables))
        assert emb.dtype == tf.float32 and logits.dtype == tf.float32 and loss.dtype == tf.float32
        assert np.isfinite(loss.numpy())
        assert (
            backbone.layers[2].compute_dtype == policy.split("_")[1]
        )  # the convs run in low precision
    finally:
        keras.config.set_dtype_policy(previous)


# ---- head.margin_gradient ---------------------------------------------------------------------

GRADIENT_MARGINS = [
    dict(m2=0.5, m3=0.0),  # ArcFace: the modes differ
    dict(m2=0.5, m3=0.0, threshold=0.2),  # with inter-class filtering
    dict(m2=0.0, m3=0.35),  # CosFace: the modes are identical
    dict(m2=0.0, m3=0.0),  # NormFace
]


def margin_step_gradients(emb, centers, labels, **kwargs):
    """Loss and gradients (embeddings, centres) of one MarginHead step, float32."""
    head = MarginHead(centers.shape[0], **kwargs)
    head.build(emb.shape)
    head.centers.kernel.assign(centers)
    x = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = head(x, tf.constant(labels))
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        )
    g_x, g_w = tape.gradient(loss, [x, head.centers.kernel])
    return float(loss), g_x.numpy(), g_w.numpy()


@pytest.mark.parametrize("margin", GRADIENT_MARGINS, ids=lambda m: str(sorted(m.items())))
@pytest.mark.parametrize("mode", ["exact", "arcface_torch"])
def test_margin_gradient_modes_match_numpy_reference(mode, margin):
    from margin_reference import margin_loss_and_grads

    rng = np.random.default_rng(7)
    batch, classes, dim = 12, 9, 16
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    emb = rng.standard_normal((batch, dim)).astype(np.float32)
    # pull some embeddings towards their centre: cosines from about -0.2 to 0.95
    pull = np.linspace(-0.5, 3.0, batch)[:, None].astype(np.float32)
    emb = emb + pull * centers[labels]
    m = dict(margin)
    threshold = m.pop("threshold", 0.0)
    loss, g_x, g_w = margin_step_gradients(
        emb, centers, labels, interclass_filtering_threshold=threshold, margin_gradient=mode, **m
    )
    ref = margin_loss_and_grads(emb, centers, labels, threshold=threshold, mode=mode, **m)
    other = "exact" if mode == "arcface_torch" else "arcface_torch"
    ref_other = margin_loss_and_grads(emb, centers, labels, threshold=threshold, mode=other, **m)
    assert loss == pytest.approx(ref[0], rel=1e-5)
    for got, want, want_other in zip((g_x, g_w), ref[1:], ref_other[1:]):
        tol = 1e-4 * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        differs = np.abs(want - want_other).max()
        if m["m2"] > 0:  # ArcFace: step-1 gradients differ by several percent
            assert differs > 0.02 * np.abs(want).max(), differs
        else:  # CosFace, NormFace: the same gradient in both modes
            assert differs < 1e-12


def test_arcface_torch_value_has_no_fallback():
    """arcface_torch applies cos(theta + m2) to every target, also past theta + m2 = pi,
    and passes the gradient of s * cos (exactly s) to the target cosine."""
    c = np.array([[-0.95, 0.1], [0.3, 0.2]], np.float32)  # row 0: theta + 0.5 > pi
    cos = tf.constant(c)
    with tf.GradientTape() as tape:
        tape.watch(cos)
        logits = combined_margin(cos, [0, 1], scale=64.0, m2=0.5, margin_gradient="arcface_torch")
        total = tf.reduce_sum(logits)
    grad = tape.gradient(total, cos).numpy()
    want = 64.0 * np.cos(np.arccos(c.astype(np.float64)) + 0.5)
    np.testing.assert_allclose(logits.numpy()[[0, 1], [0, 1]], want[[0, 1], [0, 1]], rtol=1e-6)
    np.testing.assert_allclose(logits.numpy()[[0, 1], [1, 0]], 64.0 * c[[0, 1], [1, 0]])
    np.testing.assert_array_equal(grad, np.full_like(c, 64.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(margin_gradient="torch"), "margin_gradient must be one of exact, arcface_torch"),
        (dict(m1=1.35, m2=0.0, margin_gradient="arcface_torch"), "needs m1 == 1, got m1=1.35"),
        (dict(m2=0.3, m3=0.2, margin_gradient="arcface_torch"), "drops m2 when m3 > 0"),
        (dict(easy_margin=True, margin_gradient="arcface_torch"), "has no easy_margin"),
    ],
)
def test_margin_gradient_rejects_undefined_margins(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MarginHead(5, **kwargs)
    with pytest.raises(ValueError, match=message):
        combined_margin(tf.zeros([1, 3]), [0], **kwargs)


def test_margin_gradient_is_serialised():
    head = create_head("arcface", 5, margin_gradient="arcface_torch")
    config = head.get_config()
    assert config["margin_gradient"] == "arcface_torch"
    assert MarginHead.from_config(config).spec.margin_gradient == "arcface_torch"
    assert create_head("cosface", 5).get_config()["margin_gradient"] == "exact"
    # heads without arcface_torch's trick: "exact" is what they do, "arcface_torch" an error
    for name in ("softmax", "magface", "curricularface", "adaface", "sphereface_annealed"):
        assert "margin_gradient" not in create_head(name, 5, margin_gradient="exact").get_config()
        with pytest.raises(ValueError, match=f"not defined for head '{name}'"):
            create_head(name, 5, margin_gradient="arcface_torch")


def test_head_modules_import_one_way():
    """No module of facerec_tf/heads imports one that imports it back (adaptive and margin
    share facerec_tf/heads/angular.py), and none imports the package itself."""
    import ast
    import pathlib

    folder = pathlib.Path(__file__).resolve().parents[1] / "facerec_tf" / "heads"
    imports = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        imports[path.stem] = names
    for a, names in imports.items():
        assert "facerec_tf.heads" not in names, a
        for b in imports:
            if b != a and f"facerec_tf.heads.{b}" in names:
                assert f"facerec_tf.heads.{a}" not in imports[b], (a, b)
    assert "facerec_tf.heads.angular" in imports["adaptive"] & imports["margin"]
