"""VarGFaceNet and the Facenet backbones: parameter counts against hand formulas, variable group
structure, L2 normalisation, shapes at 160 and 112 px, gradients, mixed precision."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.models import (
    FacenetBackbone,
    VarGFaceNetBackbone,
    count_parameters,
    create_backbone,
    flops,
)
from facerec_tf.models.blocks import GroupedConv2D

# ---------------------------------------------------------------- hand formulas
# Counted like torch's sum(p.numel()): BN contributes gamma + beta (2 per channel), PReLU one
# slope per channel, convolutions k*k*(in/groups)*out (+ out with bias).

S = 8  # VarGFaceNet channels per group


def varg_sep(cin, cout, factor=2, pw_act=True):
    """Variable group 3x3 conv cin -> cin*factor (cin/8 groups) + BN + PReLU, 1x1 + BN (+PReLU)."""
    mid = cin * factor
    return 9 * S * mid + 3 * mid + mid * cout + 2 * cout + (cout if pw_act else 0)


def varg_se(c, ratio=4):
    """Biased 1x1 convs c -> c/4 -> c with a PReLU between."""
    r = c // ratio
    return c * r + r + r + r * c + c


def varg_normal(c, factor=2, shortcut=False, se=True):
    sep = varg_sep(c, c, factor) + varg_sep(c, c, factor, pw_act=False)
    return sep + (varg_sep(c, c, factor, False) if shortcut else 0) + (varg_se(c) if se else 0) + c


def varg_down(cin, cout):
    # shortcut + 2 branches (linear), PReLU, third separable conv (linear), PReLU
    return 3 * varg_sep(cin, cout, 2, False) + cout + varg_sep(cout, cout, 2, False) + cout


def vargfacenet_parameters(embedding=512, se=True, units=(3, 7, 4)):
    """The authors' MXNet symbol (zma-c-137/VarGFaceNet VarGFaceNet.py, multiplier 1.25)."""
    c = [40, 80, 160, 320]  # (32, 64, 128, 256) * 1.25
    n = 27 * c[0] + 3 * c[0]  # head conv3x3, BN, PReLU
    n += varg_normal(c[0], factor=1, shortcut=True, se=se)  # stride-2 head block
    for i, u in enumerate(units):
        n += varg_down(c[i], c[i + 1]) + (u - 1) * varg_normal(c[i + 1], se=se)
    n += c[3] * 1024 + 3 * 1024  # 1x1 to 1024, BN, PReLU
    n += 7 * 7 * S * 1024 + 2 * 1024  # 7x7 variable group conv (128 groups), BN
    n += 1024 * 512 + 3 * 512  # 1x1 to 512, BN, PReLU
    return n + 512 * embedding + embedding + 2 * embedding  # FC with bias, BN


def facenet_mobilenet_parameters(embedding=128):
    """bubbliiiing nets/mobilenet.py without its classifier, then bottleneck (no bias) + BN."""
    n, cin = 27 * 32 + 2 * 32, 32
    for cout in (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024):
        n += 9 * cin + 2 * cin + cin * cout + 2 * cout  # depthwise + BN, pointwise + BN
        cin = cout
    return n + 1024 * embedding + 2 * embedding


def cbn(cin, cout, kh, kw=None):
    return kh * (kw or kh) * cin * cout + 2 * cout


def facenet_inception_resnetv1_parameters(embedding=128):
    """bubbliiiing nets/inception_resnetv1.py (= timesler facenet-pytorch) up to block8."""
    stem = (
        cbn(3, 32, 3) + cbn(32, 32, 3) + cbn(32, 64, 3) + cbn(64, 80, 1) + cbn(80, 192, 3)
    ) + cbn(192, 256, 3)
    b35 = cbn(256, 32, 1) * 3 + cbn(32, 32, 3) * 3 + 96 * 256 + 256
    mixed_6a = cbn(256, 384, 3) + cbn(256, 192, 1) + cbn(192, 192, 3) + cbn(192, 256, 3)
    b17 = cbn(896, 128, 1) * 2 + cbn(128, 128, 1, 7) + cbn(128, 128, 7, 1) + 256 * 896 + 896
    mixed_7a = cbn(896, 256, 1) * 3 + cbn(256, 384, 3) + cbn(256, 256, 3) * 3
    b8 = cbn(1792, 192, 1) * 2 + cbn(192, 192, 1, 3) + cbn(192, 192, 3, 1) + 384 * 1792 + 1792
    features = stem + 5 * b35 + mixed_6a + 10 * b17 + mixed_7a + 6 * b8
    return features + 1792 * embedding + 2 * embedding


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            keras.utils.set_random_seed(0)
            cache[key] = create_backbone(name, **kwargs)
        return cache[key]

    yield get
    cache.clear()
    keras.backend.clear_session()


def images(shape, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(batch, *shape)).astype(np.float32)


def trainable_count(layers):
    return sum(int(np.prod(w.shape)) for layer in layers for w in layer.trainable_weights)


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "name, kwargs, expected, literal",
    [
        # literals: the formulas above; the Facenet ones also equal sum(p.numel()) of a torch
        # rebuild of bubbliiiing's nets/*.py (checked once, outputs equal to 1e-7)
        ("vargfacenet", {}, vargfacenet_parameters(), 5_198_292),
        (
            "vargfacenet",
            {"se": False, "embedding_size": 128},
            vargfacenet_parameters(128, False),
            4_759_752,
        ),
        ("facenet_mobilenet", {}, facenet_mobilenet_parameters(), 3_338_304),
        ("facenet_inception_resnetv1", {}, facenet_inception_resnetv1_parameters(), 22_793_728),
    ],
)
def test_parameter_counts(name, kwargs, expected, literal, built):
    assert expected == literal
    counts = count_parameters(built(name, **kwargs))
    assert counts == {"total": literal, "trainable": literal}


def test_vargfacenet_flops_match_the_authors_figure(built):
    # zma-c-137/VarGFaceNet README: 1022M FLOPs at 112x112 (ours: 2 x multiply-adds, 1025M)
    assert flops(built("vargfacenet")) == pytest.approx(1022e6, rel=5e-3)


# ---------------------------------------------------------------- VarGFaceNet structure


def test_vargfacenet_variable_groups_have_eight_channels(built):
    model = built("vargfacenet")
    grouped = [layer for layer in model.layers if isinstance(layer, GroupedConv2D)]
    # head block 3 + down-sampling blocks 3 x 4 + normal blocks (2 + 6 + 3) x 2 + embedding 1
    assert len(grouped) == 3 + 12 + 22 + 1
    for layer in grouped:
        cin = layer.input.shape[-1]
        assert layer.groups == cin // S and cin % S == 0, layer.name
        factor = 1 if layer.name.startswith(("head", "embed")) else 2
        assert layer.filters == factor * cin, layer.name
        assert layer.kernel.shape[-2:] == (cin, factor * S), layer.name
    embed = model.get_layer("embed_gconv")
    assert (embed.kernel_size, embed.groups, embed.filters) == (7, 128, 1024)
    assert embed.output.shape == (None, 1, 1, 1024)


def test_vargfacenet_group_conv_does_not_mix_groups(built):
    layer = built("vargfacenet").get_layer("stage3_unit2_sep1_gconv")  # 160 -> 320, 20 groups
    x = np.zeros((1, 5, 5, 160), np.float32)
    x[0, 2, 2, 3 * S + 5] = 1.0  # one input channel of group 3
    y = np.abs(layer(x).numpy()).sum(axis=(0, 1, 2))
    assert np.all(y[3 * 16 : 4 * 16] > 0)  # group 3's 16 outputs see it
    assert np.all(np.delete(y, np.s_[3 * 16 : 4 * 16]) == 0)  # no other group does


def test_vargfacenet_block_parameters(built):
    model = built("vargfacenet")

    def block(prefix):
        return [layer for layer in model.layers if layer.name.startswith(prefix)]

    assert trainable_count(block("stage3_unit2_")) == varg_normal(160)
    assert trainable_count(block("stage3_unit1_")) == varg_down(80, 160)
    assert trainable_count(block("head_block_")) == varg_normal(40, factor=1, shortcut=True)
    se = block("stage4_unit3_se_")
    assert trainable_count(se) == varg_se(320) and any(
        isinstance(layer, keras.layers.PReLU) for layer in se
    )


# ---------------------------------------------------------------- shapes and normalisation


def test_output_shapes(built):
    varg = built("vargfacenet")
    assert varg.input.shape == (None, 112, 112, 3) and varg.output.shape == (None, 512)
    assert varg.embedding_size == 512
    norms = np.linalg.norm(varg(images((112, 112, 3)), training=False).numpy(), axis=1)
    assert np.all(np.abs(norms - 1) > 0.1)  # raw embedding, not normalised

    cases = [  # (name, input size, last feature layer, its grid); IRv1 at 112: see below
        ("facenet_mobilenet", 160, "unit13_pw_relu6", 5),
        ("facenet_mobilenet", 112, "unit13_pw_relu6", 4),
        ("facenet_inception_resnetv1", 160, "block8_6_add", 3),
    ]
    for name, size, last, grid in cases:
        kwargs = {} if size == 160 else {"input_shape": (size, size, 3), "embedding_size": 64}
        model = built(name, **kwargs)
        assert model.input.shape == (None, size, size, 3)
        channels = 1024 if name == "facenet_mobilenet" else 1792
        assert model.get_layer(last).output.shape == (None, grid, grid, channels)
        out = model(images((size, size, 3)), training=False).numpy()
        assert out.shape == (2, 128 if size == 160 else 64) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_l2_normalize_flag(built):
    normed = built("facenet_mobilenet")
    raw = create_backbone("facenet_mobilenet", l2_normalize=False)
    raw.set_weights(normed.get_weights())
    x = images((160, 160, 3), batch=3)
    a, b = normed(x, training=False).numpy(), raw(x, training=False).numpy()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.all(np.abs(np.linalg.norm(b, axis=1) - 1) > 0.1)
    np.testing.assert_allclose(a, b / np.linalg.norm(b, axis=1, keepdims=True), atol=1e-6)
    assert raw.get_config()["l2_normalize"] is False
    assert not any(isinstance(layer, keras.layers.UnitNormalization) for layer in raw.layers)


# ---------------------------------------------------------------- training and precision


@pytest.mark.parametrize(
    "name, size",
    [("vargfacenet", 64), ("facenet_mobilenet", 112), ("facenet_inception_resnetv1", 96)],
)
def test_gradient_step_is_finite(name, size):
    keras.utils.set_random_seed(2)
    model = create_backbone(name, input_shape=(size, size, 3), embedding_size=32)
    x = tf.constant(images((size, size, 3), seed=1))
    target = tf.constant(np.random.default_rng(2).normal(size=(2, 32)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - target))
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) and all(g is not None for g in grads)
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    first_conv = next(g for g, v in zip(grads, model.trainable_variables) if "kernel" in v.path)
    assert np.any(first_conv.numpy() != 0)  # the signal reaches the stem
    keras.optimizers.SGD(0.01).apply_gradients(zip(grads, model.trainable_variables))
    after = model(x, training=False).numpy()
    assert np.all(np.isfinite(after))


@pytest.mark.parametrize(
    "name, kwargs, last, grid",
    [
        ("vargfacenet", {}, "embed_gconv", 1),
        ("facenet_mobilenet", {}, "unit13_pw_relu6", 5),
        # also the 112x112 input of Inception-ResNetV1 (2x2 last grid)
        ("facenet_inception_resnetv1", {"input_shape": (112, 112, 3)}, "block8_6_add", 2),
    ],
)
def test_mixed_float16_gives_float32_output(name, kwargs, last, grid):
    model = create_backbone(name, dtype="mixed_float16", **kwargs)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "float16" for layer in convs)
    assert model.get_layer(last).output.shape[1:3] == (grid, grid)
    out = model(images(tuple(model.input.shape[1:])), training=False)
    assert out.dtype == tf.float32 and out.shape == (2, model.embedding_size)
    assert np.all(np.isfinite(out.numpy()))
    if name.startswith("facenet"):
        np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=1), 1.0, atol=1e-3)


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"features must be one of.*inception_resnetv1"):
        FacenetBackbone(features="vgg16")
    with pytest.raises(ValueError, match="not a multiple of group_channels=16"):
        VarGFaceNetBackbone(group_channels=16)  # 40 head channels
    with pytest.raises(ValueError, match="stage_units must be 3"):
        VarGFaceNetBackbone(stage_units=(3, 7))
