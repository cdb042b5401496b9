"""Backbones: insightface parameter parity, FLOPs, shapes, serialization, determinism."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from facerec_tf.models import count_parameters, create_backbone, flops, list_backbones

# arcface_torch, embedding 512: sum(p.numel() for p in model.parameters()); BN statistics excluded.
TORCH_PARAMETERS = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
    "iresnet200": 118_833_920,
    "mobilefacenet": 2_059_520,
    "mobilefacenet_large": 6_314_880,  # get_mbf_large: scale 4, blocks (2, 8, 12, 4)
}
GFLOPS = {"iresnet18": 5.22, "iresnet50": 12.62, "iresnet100": 24.18}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            keras.utils.set_random_seed(0)
            cache[name] = create_backbone(name)
        return cache[name]

    yield get
    cache.clear()
    keras.backend.clear_session()


@pytest.mark.parametrize("name", sorted(TORCH_PARAMETERS))
def test_parameter_parity_with_arcface_torch(name, built):
    counts = count_parameters(built(name))
    assert counts["total"] == TORCH_PARAMETERS[name]
    frozen = 512 if name.startswith("iresnet") else 0  # the last BN's scale is fixed at 1
    assert counts["trainable"] == TORCH_PARAMETERS[name] - frozen


@pytest.mark.parametrize("name", sorted(GFLOPS))
def test_flops(name, built):
    assert flops(built(name)) / 1e9 == pytest.approx(GFLOPS[name], abs=0.005)


def test_prelu_is_per_channel_and_bn_matches_torch(built):
    model = built("iresnet18")
    prelus = [layer for layer in model.layers if isinstance(layer, keras.layers.PReLU)]
    assert prelus and all(p.alpha.shape == (1, 1, p.alpha.shape[-1]) for p in prelus)
    np.testing.assert_array_equal(prelus[0].alpha.numpy(), 0.25)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert {bn.epsilon for bn in bns} == {1e-5} and {bn.momentum for bn in bns} == {0.9}
    features = model.get_layer("features")
    assert not features.gamma.trainable and features.beta.trainable


def test_ir_se_adds_squeeze_excitation(built):
    plain, se = (
        count_parameters(built("iresnet50"))["total"],
        count_parameters(built("ir_se50"))["total"],
    )
    # per unit: C*C/16 twice (no bias); units [3,4,14,3] with widths 64..512
    extra = sum(n * 2 * c * (c // 16) for n, c in zip((3, 4, 14, 3), (64, 128, 256, 512)))
    assert se - plain == extra
    assert any("_se_" in layer.name for layer in built("ir_se50").layers)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50'.*iresnet50.*mobilefacenet"):
        create_backbone("resnet50")
    assert create_backbone("r18").name == "iresnet18"  # insightface alias


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_round_trips(name, tmp_path):
    keras.utils.set_random_seed(1)
    model = create_backbone(name, embedding_size=128, dropout=0.1)
    shape = tuple(model.input.shape[1:])  # 112x112, Facenet 160x160
    x = np.random.default_rng(0).uniform(0, 255, size=(2, *shape)).astype(np.float32)
    want = model(x, training=False).numpy()
    assert want.shape == (2, 128) and want.dtype == np.float32 and np.all(np.isfinite(want))
    np.testing.assert_array_equal(model(x, training=False).numpy(), want)  # deterministic
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # rebuilt through from_config(get_config())
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), want)


@pytest.mark.parametrize(
    "name", ["iresnet10", "mobilefacenet_small", "vargfacenet", "facenet_mobilenet"]
)
def test_float64_backbone_does_not_round_its_input(name):
    """dtype="float64": the images input is float64 too, so an input that float32 cannot hold
    (torch's (x - 127.5) / 127.5) reaches the stem unrounded; other policies keep float32."""
    keras.utils.set_random_seed(0)
    model = create_backbone(name, include_preprocessing=False, dtype="float64")
    assert model.input.dtype == "float64"
    shape = tuple(model.input.shape[1:])
    x = (np.random.default_rng(0).integers(0, 256, size=(2, *shape)) - 127.5) / 127.5
    rounded = x.astype(np.float32).astype(np.float64)
    assert not np.array_equal(x, rounded)
    got = model(x, training=False).numpy()
    assert not np.array_equal(got, model(rounded, training=False).numpy())
    for dtype in (None, "float32", "mixed_bfloat16"):
        assert create_backbone(name, dtype=dtype).input.dtype == "float32"


def test_output_shapes_and_options():
    model = create_backbone("iresnet18", embedding_size=256, input_shape=(112, 112, 3))
    assert model.output.shape == (None, 256) and model.input.shape == (None, 112, 112, 3)
    assert model.get_layer("head_fc").kernel.shape == (512 * 7 * 7, 256)
    raw = create_backbone("iresnet18", include_preprocessing=False)
    assert all(not isinstance(layer, keras.layers.Rescaling) for layer in raw.layers)
    with pytest.raises(ValueError, match="depth must be one of"):
        from facerec_tf.models import IResNetBackbone

        IResNetBackbone(depth=42)


def test_preprocessing_is_insightface_normalisation():
    model = create_backbone("iresnet18")
    layer = model.get_layer("preprocess")
    np.testing.assert_allclose(
        layer(tf.constant([0.0, 127.5, 255.0])).numpy(), [-127.5 / 128, 0.0, 127.5 / 128]
    )


def test_strided_convs_pad_like_torch():
    """A stride-2 3x3 conv must see pixel (0, 0) at the centre of its first window, like torch
    ``padding=1``; Keras ``same`` would put it at the corner of the window."""
    model = create_backbone("iresnet18", include_preprocessing=False)
    conv = model.get_layer("stage1_unit1_conv2")
    pad = model.get_layer("stage1_unit1_conv2_pad")
    assert conv.padding == "valid" and pad.padding == ((1, 1), (1, 1))
    x = np.zeros((1, 6, 6, 64), np.float32)
    x[0, 0, 0, 0] = 1.0
    kernel = np.zeros(conv.kernel.shape, np.float32)
    kernel[1, 1, 0, 0] = 1.0  # centre tap only
    conv.kernel.assign(kernel)
    y = conv(pad(x)).numpy()
    assert y.shape == (1, 3, 3, 64) and y[0, 0, 0, 0] == 1.0


def test_yale_faces_embed(yale_dir):
    """Real faces: embed all Yale photographs (grey GIF, centre-cropped to 112x112)."""
    files = sorted(p for p in yale_dir.iterdir() if p.name.startswith("subject"))
    assert len(files) >= 160
    images, contents = [], []
    for path in files:
        contents.append(path.read_bytes())
        frame = tf.io.decode_gif(tf.io.read_file(str(path)))[0]  # [243, 320, 3] grey as RGB
        crop = tf.image.crop_to_bounding_box(frame, 31, 60, 200, 200)
        images.append(tf.image.resize(tf.cast(crop, tf.float32), (112, 112)).numpy())
    images = np.stack(images)
    keras.utils.set_random_seed(0)
    model = create_backbone("mobilefacenet")
    emb = model.predict(images, batch_size=64, verbose=0)
    assert emb.shape == (len(files), 512) and np.all(np.isfinite(emb))
    unit = tf.math.l2_normalize(emb, axis=1).numpy()
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    # The set holds byte-identical files (e.g. subject02.normal == subject02.noglasses): equal
    # files must give equal embeddings and different photographs different ones.
    assert len({e.tobytes() for e in emb}) == len(set(contents)) < len(files)


def test_grouped_conv_equals_keras_grouped_conv():
    """The depthwise-and-sum grouped convolution is Conv2D(groups=G) with re-laid-out weights."""
    from facerec_tf.models.blocks import GroupedConv2D

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 9, 8)).astype(np.float32)
    ours = GroupedConv2D(12, 3, groups=4, strides=2, padding="valid")
    ref = keras.layers.Conv2D(12, 3, strides=2, groups=4, use_bias=False)
    ours.build(x.shape)
    ref.build(x.shape)
    kernel = ours.kernel.numpy()  # [3, 3, 8, 3]: input channel g*2+k -> output j of group g
    ref_kernel = np.zeros(ref.kernel.shape, np.float32)  # [3, 3, 2, 12]
    for g in range(4):
        for k in range(2):
            for j in range(3):
                ref_kernel[:, :, k, g * 3 + j] = kernel[:, :, g * 2 + k, j]
    ref.kernel.assign(ref_kernel)
    np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), atol=1e-5)
    assert ours.compute_output_shape(x.shape) == ref(x).shape
