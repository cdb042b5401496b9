"""Adaptive-margin heads (MagFace, CurricularFace, AdaFace, annealed SphereFace) against NumPy
references written from the papers' equations (float64), their EMA state, serialization,
MirroredStrategy parity (tests/adaptive_heads_check.py in a fresh process) and a short
training run."""

from __future__ import annotations

import math
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.heads import (
    AdaFaceHead,
    AnnealedSphereFaceHead,
    CurricularFaceHead,
    MagFaceHead,
    create_head,
    list_heads,
)
from facerec_tf.heads.adaptive import (
    adaface_logits,
    annealed_lambda,
    annealed_sphereface_logits,
    curricular_logits,
    magface_logits,
    magface_regularizer,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
ADAPTIVE = ("magface", "curricularface", "adaface", "sphereface_annealed")
STATE = {
    "magface": (),
    "curricularface": ("t",),
    "adaface": ("batch_mean", "batch_std"),
    "sphereface_annealed": ("iteration",),
}

# ---------------------------------------------------------------------------------------
# NumPy references (float64), written from the equations


def arc_target(c, m, easy_margin=False):
    """cos(theta + m); past theta + m = pi insightface's c - m sin(m) (easy: margin iff c > 0)."""
    theta = math.acos(min(1.0, max(-1.0, c)))
    if easy_margin:
        return math.cos(theta + m) if c > 0 else c
    return math.cos(theta + m) if theta + m < math.pi else c - math.sin(math.pi - m) * m


def ref_magface(cos, norms, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, easy=False):
    out = np.clip(np.asarray(cos, np.float64), -1, 1)
    a = np.clip(np.asarray(norms, np.float64), l_a, u_a)
    m = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)
    for i, y in enumerate(labels):
        if y >= 0:
            out[i, y] = arc_target(out[i, y], m[i], easy)
    return s * out, 1.0 / a + a / u_a**2


def ref_curricular(cos, labels, t_prev, s=64.0, m=0.5, alpha=0.01, update=True):
    c = np.clip(np.asarray(cos, np.float64), -1, 1)
    rows = [i for i, y in enumerate(labels) if y >= 0]
    target = np.array([c[i, labels[i]] for i in rows])
    t = alpha * target.mean() + (1 - alpha) * t_prev if update else t_prev
    out = c.copy()
    for i in rows:
        y = labels[i]
        threshold = math.cos(math.acos(c[i, y]) + m)
        for j in range(c.shape[1]):
            if j != y and c[i, j] > threshold:
                out[i, j] = c[i, j] * (t + c[i, j])
        out[i, y] = arc_target(c[i, y], m)
    return s * out, t


def ref_adaface(
    cos, norms, labels, mean_prev, std_prev, s=64.0, m=0.4, h=0.333, t_alpha=0.01, eps=1e-3,
    update=True,
):  # fmt: skip
    c = np.clip(np.asarray(cos, np.float64), -1 + eps, 1 - eps)
    n = np.clip(np.asarray(norms, np.float64), 0.001, 100)
    mean, std = mean_prev, std_prev
    if update:
        mean = t_alpha * n.mean() + (1 - t_alpha) * mean_prev
        std = t_alpha * n.std(ddof=1) + (1 - t_alpha) * std_prev
    r = np.clip((n - mean) / (std + eps) * h, -1, 1)
    out = c.copy()
    for i, y in enumerate(labels):
        if y >= 0:
            theta = np.clip(math.acos(c[i, y]) - m * r[i], eps, math.pi - eps)
            out[i, y] = math.cos(theta) - (m + m * r[i])
    return s * out, mean, std


def ref_lambda(i, beta=1000.0, beta_min=5.0, gamma=0.12, power=1.0, beta_freeze=0):
    """insightface train_softmax.py's _batch_callback, for the batch after i batches."""
    if i <= beta_freeze:
        return beta
    return max(beta_min, beta * math.pow(1 + gamma * (i - beta_freeze), -power))


def ref_sphere(cos, labels, lam, s=64.0, m1=4.0):
    out = np.asarray(cos, np.float64).copy()
    for i, y in enumerate(labels):
        if y >= 0:
            c = out[i, y]
            theta = math.acos(min(1.0, max(-1.0, c)))
            k = math.floor(m1 * theta / math.pi)
            psi = (-1) ** k * math.cos(m1 * theta) - 2 * k
            out[i, y] = (lam * c + psi) / (1 + lam)
    return s * out


# ---------------------------------------------------------------------------------------
# Inputs

EDGE_COS = [1.0, -1.0, 0.0, 0.9999, -0.9999, -0.95, -0.7, 0.5]
EDGE_NORMS = [0.0, 5.0, 10.0, 60.0, 110.0, 150.0, 1e-3, 250.0]


def cos_cases(seed=0, batch=24, classes=9):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-1, 1, size=(batch, classes)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    norms = rng.uniform(0.0, 150.0, size=batch).astype(np.float32)
    for i, (c, n) in enumerate(zip(EDGE_COS, EDGE_NORMS)):
        cos[i, labels[i]] = c
        cos[i, (labels[i] + 1) % classes] = -c
        norms[i] = n
    labels[-1] = -1
    return cos, norms, labels


def embedding_cases(seed=1, batch=10, dim=12, classes=7):
    """Raw embeddings with norms below l_a, inside and above u_a, and a fixed kernel; the
    float64 cosines the layer should see."""
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((classes, dim)).astype(np.float32)
    direction = rng.standard_normal((batch, dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    norms = np.array([0.5, 5, 9.9, 10, 30, 60, 109, 110, 140, 300])[:batch]
    x = (direction * norms[:, None]).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    labels[2] = -1
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    wn = kernel.astype(np.float64) / np.linalg.norm(kernel.astype(np.float64), axis=1)[:, None]
    norms64 = np.linalg.norm(x.astype(np.float64), axis=1)
    return x, labels, kernel, xn @ wn.T, norms64


def build(name, kernel, **kwargs):
    head = create_head(name, kernel.shape[0], **kwargs)
    head.build((None, kernel.shape[1]))
    head.centers.kernel.assign(kernel)
    return head


def close(got, want, scale=64.0, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------
# Formulas on cosines, edges included


@pytest.mark.parametrize("easy", [False, True])
def test_magface_formula(easy):
    cos, norms, labels = cos_cases()
    got = magface_logits(cos, norms, labels, easy_margin=easy).numpy()
    want, g = ref_magface(cos, norms, labels, easy=easy)
    assert got.dtype == np.float32
    close(got, want)
    np.testing.assert_allclose(magface_regularizer(norms).numpy(), g, rtol=1e-6)
    # theta + m(a) > pi: the insightface linear fallback with the per-example margin
    c, a = -0.95, 150.0  # m(a) = u_m = 0.8
    (logit,) = magface_logits([[c, 0.0]], [a], [0], scale=1.0).numpy()[:, 0]
    assert logit == pytest.approx(c - math.sin(0.8) * 0.8, abs=1e-6)


def test_curricularface_formula():
    cos, _, labels = cos_cases(seed=2)
    t = 0.37
    got = curricular_logits(cos, labels, t).numpy()
    want, _ = ref_curricular(cos, labels, t, update=False)
    close(got, want)
    # a hard negative is rescaled, an easy one is not
    hard = curricular_logits([[0.2, 0.5, -0.3]], [0], 0.4, scale=1.0).numpy()[0]
    assert hard[1] == pytest.approx(0.5 * (0.4 + 0.5)) and hard[2] == pytest.approx(-0.3)


def test_adaface_formula():
    cos, norms, labels = cos_cases(seed=3)
    mean, std = 40.0, 30.0
    got = adaface_logits(cos, norms, labels, mean, std).numpy()
    want, _, _ = ref_adaface(cos, norms, labels, mean, std, update=False)
    close(got, want)
    # the margin scaler saturates at +-1: g_angular = -+m, g_additive = m +- m
    (lo, hi) = adaface_logits([[0.5], [0.5]], [0.0, 1e4], [0, 0], 40.0, 1.0, 1.0).numpy()[:, 0]
    assert lo == pytest.approx(math.cos(math.acos(0.5) + 0.4), abs=1e-6)
    assert hi == pytest.approx(math.cos(math.acos(0.5) - 0.4) - 0.8, abs=1e-6)


def test_sphereface_formula_and_schedule():
    cos, _, labels = cos_cases(seed=4)
    for lam in (1000.0, 5.0, 0.0):
        got = annealed_sphereface_logits(cos, labels, lam).numpy()
        close(got, ref_sphere(cos, labels, lam))
    for kw in ({}, dict(beta_freeze=5000, gamma=0.06), dict(power=2.5, beta_min=0.5)):
        for i in (0, 1, 2, 10, 1000, 5000, 5001, 6000, 10**6):
            assert annealed_lambda(i, **kw).numpy() == pytest.approx(ref_lambda(i, **kw), rel=1e-6)
    assert ref_lambda(1) == pytest.approx(1000 / 1.12) and ref_lambda(10**6) == 5.0


def test_formula_gradients_finite_at_edges():
    cos, norms, labels = cos_cases()
    cos, norms = tf.constant(cos), tf.constant(norms)
    fns = {
        "magface": lambda c, n: magface_logits(c, n, labels),
        "magface_easy": lambda c, n: magface_logits(c, n, labels, easy_margin=True),
        "curricularface": lambda c, n: curricular_logits(c, labels, 0.3),
        "adaface": lambda c, n: adaface_logits(c, n, labels, 20.0, 100.0),
        "sphereface": lambda c, n: annealed_sphereface_logits(c, labels, 5.0),
    }
    for name, fn in fns.items():
        with tf.GradientTape() as tape:
            tape.watch([cos, norms])
            loss = tf.reduce_sum(fn(cos, norms)) + tf.reduce_sum(magface_regularizer(norms))
        for g in tape.gradient(loss, [cos, norms]):
            assert np.all(np.isfinite(g.numpy())), name


# ---------------------------------------------------------------------------------------
# Layers: formula on real embeddings, state, inference


def test_magface_layer_and_auxiliary_loss():
    x, labels, kernel, cos, norms = embedding_cases()
    head = build("magface", kernel)
    want, g = ref_magface(cos, norms, labels)
    close(head(x, labels, training=True), want)
    aux = head.auxiliary_losses(x, labels)
    assert list(aux) == ["magface_g"] and aux["magface_g"].shape == (len(x),)
    np.testing.assert_allclose(aux["magface_g"].numpy(), 35.0 * g, rtol=1e-5)
    assert head.min_lambda_g == pytest.approx(64 * 0.0035 * 110**2 * 10**2 / (110**2 - 10**2))
    assert head.lambda_g > head.min_lambda_g
    assert not head.non_trainable_weights


def test_curricularface_t_update_over_two_steps():
    x, labels, kernel, cos, _ = embedding_cases()
    head = build("curricularface", kernel)
    assert head.t.numpy() == 0.0
    t = 0.0
    for step in range(2):
        xs, cs = x * (step + 1), cos  # scaling the embeddings keeps the cosines
        want, t = ref_curricular(cs, labels, t)
        close(head(xs, labels, training=True), want)
        assert head.t.numpy() == pytest.approx(t, abs=1e-7)
    valid = labels >= 0
    mean = cos[np.arange(len(labels))[valid], labels[valid]].mean()
    assert t == pytest.approx(0.01 * mean + 0.99 * 0.01 * mean)
    # evaluation with labels: the stored t, no update
    want, _ = ref_curricular(cos, labels, t, update=False)
    close(head(x, labels, training=False), want)
    close(head(x, labels), want)
    assert head.t.numpy() == pytest.approx(t, abs=1e-7)


def test_adaface_ema_over_two_steps():
    x, labels, kernel, cos, norms = embedding_cases()
    head = build("adaface", kernel)
    assert (head.batch_mean.numpy(), head.batch_std.numpy()) == (20.0, 100.0)
    mean, std = 20.0, 100.0
    for step, factor in enumerate((1.0, 0.5)):
        want, mean, std = ref_adaface(cos, norms * factor, labels, mean, std)
        close(head(x * factor, labels, training=True), want)
        assert head.batch_mean.numpy() == pytest.approx(mean, rel=1e-6), step
        assert head.batch_std.numpy() == pytest.approx(std, rel=1e-6), step
    n = np.clip(norms * 0.5, 0.001, 100)
    first = np.clip(norms, 0.001, 100)
    assert mean == pytest.approx(0.01 * n.mean() + 0.99 * (0.01 * first.mean() + 0.99 * 20))
    want, _, _ = ref_adaface(cos, norms, labels, mean, std, update=False)
    close(head(x, labels, training=False), want)
    assert head.batch_mean.numpy() == pytest.approx(mean, rel=1e-6)


def test_sphereface_annealed_iteration_counter():
    x, labels, kernel, cos, _ = embedding_cases()
    head = build("sphereface_annealed", kernel, beta=100.0, gamma=0.5, beta_freeze=1)
    kw = dict(beta=100.0, gamma=0.5, beta_freeze=1)
    for i in range(4):
        assert head.iteration.numpy() == i
        assert head.current_lambda().numpy() == pytest.approx(ref_lambda(i, **kw), rel=1e-6)
        close(head(x, labels, training=True), ref_sphere(cos, labels, ref_lambda(i, **kw)))
    close(head(x, labels), ref_sphere(cos, labels, ref_lambda(4, **kw)))
    assert head.iteration.numpy() == 4  # no advance outside training


@pytest.mark.parametrize("name", ADAPTIVE)
def test_inference_is_scaled_cosine_and_leaves_state(name):
    x, _, kernel, cos, _ = embedding_cases()
    head = build(name, kernel, scale=30.0)
    before = [getattr(head, v).numpy() for v in STATE[name]]
    close(head(x), 30.0 * cos, scale=30.0)
    close(head(x, training=True), 30.0 * cos, scale=30.0)
    assert [getattr(head, v).numpy() for v in STATE[name]] == before


@pytest.mark.parametrize("name", ADAPTIVE)
def test_layer_gradients_finite_at_edges(name):
    rng = np.random.default_rng(5)
    kernel = rng.standard_normal((4, 8)).astype(np.float32)
    unit = kernel / np.linalg.norm(kernel, axis=1, keepdims=True)
    # cos = +1 and -1 on the target, zero embedding, norms below l_a and above u_a
    x = np.stack([unit[0] * 50, -unit[1] * 50, np.zeros(8), unit[3] * 3, unit[2] * 500])
    x = tf.constant(x.astype(np.float32))
    labels = tf.constant([0, 1, 2, 3, 2])
    head = build(name, kernel)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = head(x, labels, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        for extra in getattr(head, "auxiliary_losses", lambda *_: {})(x, labels).values():
            loss = loss + extra
        loss = tf.reduce_mean(loss)
    g_x, g_w = tape.gradient(loss, [x, head.centers.kernel])
    assert np.isfinite(loss.numpy())
    assert np.all(np.isfinite(g_x.numpy())) and np.all(np.isfinite(g_w.numpy()))


def test_magface_margin_gradient_reaches_the_magnitude():
    """The margin is not detached (official MagFace), AdaFace's is (norms detached)."""
    kernel = np.eye(3, 4, dtype=np.float32)
    x = tf.constant([[30.0, 20.0, 0.0, 5.0]])
    for name, moves in (("magface", True), ("adaface", False)):
        head = build(name, kernel)
        with tf.GradientTape() as tape:
            tape.watch(x)
            target = head(x, tf.constant([0]), training=False)[0, 0]
        g = tape.gradient(target, x).numpy()[0]
        radial = float(g @ x.numpy()[0] / np.linalg.norm(x.numpy()))
        assert (abs(radial) > 1e-3) == moves, (name, radial)


def test_float32_under_mixed_precision():
    x, labels, kernel, _, _ = embedding_cases()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        for name in ADAPTIVE:
            head = build(name, kernel)
            logits = head(tf.cast(x, tf.float16), labels, training=True)
            assert logits.dtype == tf.float32 and np.all(np.isfinite(logits.numpy())), name
            assert all(v.dtype in ("float32", "int64") for v in head.weights), name
    finally:
        keras.config.set_dtype_policy(previous)


# ---------------------------------------------------------------------------------------
# Registry and serialization


def test_registry_and_kwargs():
    assert set(ADAPTIVE) <= set(list_heads())
    assert isinstance(create_head("magface", 3, lambda_g=20, easy_margin=True), MagFaceHead)
    assert create_head("curricularface", 3, margin=0.3, alpha=0.1).alpha == 0.1
    assert isinstance(create_head("curricularface", 3), CurricularFaceHead)
    ada = create_head("adaface", 3, margin=0.5, h=0.2, t_alpha=0.1, eps=1e-4)
    assert isinstance(ada, AdaFaceHead) and (ada.margin, ada.h) == (0.5, 0.2)
    sph = create_head("sphereface_annealed", 3, m1=2, beta=10, beta_min=1, gamma=1, power=2)
    assert isinstance(sph, AnnealedSphereFaceHead) and sph.m1 == 2.0
    defaults = {
        "magface": dict(scale=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0),
        "curricularface": dict(scale=64.0, margin=0.5, alpha=0.01),
        "adaface": dict(scale=64.0, margin=0.4, h=0.333, t_alpha=0.01, eps=1e-3),
        "sphereface_annealed": dict(
            scale=64.0, m1=4.0, beta=1000.0, beta_min=5.0, gamma=0.12, power=1.0, beta_freeze=0
        ),
    }
    for name, want in defaults.items():
        config = create_head(name, 3).get_config()
        assert {k: config[k] for k in want} == want, name
    with pytest.raises(ValueError, match="Unrecognized keyword"):
        create_head("adaface", 3, m2=0.5)
    with pytest.raises(ValueError, match="l_a < u_a"):
        create_head("magface", 3, l_a=120)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_round_trip_keeps_config_weights_and_state(name, tmp_path):
    emb_in = keras.Input((12,), name="embedding")
    lab_in = keras.Input((), dtype="int32", name="label")
    x, labels, kernel, _, _ = embedding_cases()
    head = create_head(name, kernel.shape[0], scale=32.0)
    model = keras.Model([emb_in, lab_in], head(emb_in, lab_in))
    for _ in range(3):  # move the state away from its initial value
        head(x * 0.7, labels, training=True)
    want = model.predict([x, labels], verbose=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict([x, labels], verbose=0), want)
    new_head = loaded.layers[-1]
    assert type(new_head) is type(head) and new_head.get_config() == head.get_config()
    for v in STATE[name]:
        assert getattr(new_head, v).numpy() == getattr(head, v).numpy()
    np.testing.assert_array_equal(new_head(x).numpy(), head(x).numpy())
    np.testing.assert_array_equal(
        new_head(x, labels, training=True).numpy(), head(x, labels, training=True).numpy()
    )
    clone = type(head).from_config(head.get_config())
    assert clone.get_config() == head.get_config()


# ---------------------------------------------------------------------------------------
# MirroredStrategy (fresh process) and training


@pytest.mark.slow
def test_mirrored_strategy_state_equals_single_device():
    from checks import run_check

    result = run_check("adaptive_heads_check.py")
    assert set(result) == set(ADAPTIVE)
    for name, r in result.items():
        assert r["replicas_equal"], (name, r)
        assert all(len(vals) == 2 for vals in r["state_replicas"]), (name, r)
        assert r["state_diff"] <= 1e-5 * max([1.0, *map(abs, r["state_ref"])]), (name, r)
        assert r["logits_diff"] <= 64 * 1e-5, (name, r)
    assert result["magface"]["aux_keys"] == ["magface_g"]
    assert result["magface"]["aux_diff"] <= 1e-5
    assert result["sphereface_annealed"]["state_ref"] == [2.0]
    assert result["curricularface"]["state_ref"][0] != 0.0
    assert result["adaface"]["state_ref"] != [20.0, 100.0]


@pytest.mark.parametrize("name", ADAPTIVE)
def test_short_training_run_lowers_the_loss(name):
    rng = np.random.default_rng(11)
    classes, dim, per_class = 8, 16, 8
    centres = rng.standard_normal((classes, dim)) * 3.0
    y = np.repeat(np.arange(classes), per_class).astype(np.int32)
    x = (centres[y] + rng.standard_normal((len(y), dim))).astype(np.float32)
    keras.utils.set_random_seed(3)
    backbone = keras.layers.Dense(32, kernel_initializer=keras.initializers.RandomNormal(0, 2.0))
    head = create_head(name, classes)
    backbone.build((None, dim))
    head.build((None, 32))
    variables = backbone.trainable_variables + head.trainable_variables
    optimizer = keras.optimizers.Adam(0.02)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            emb = backbone(xb)
            logits = head(emb, yb, training=True)
            loss = keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)
            for extra in getattr(head, "auxiliary_losses", lambda *_: {})(emb, yb).values():
                loss = loss + extra
            loss = tf.reduce_mean(loss)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    losses = [float(step(x, y)) for _ in range(30)]
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses
    accuracy = np.mean(np.argmax(head(backbone(x)).numpy(), axis=1) == y)
    assert accuracy > 0.9, (accuracy, losses)
