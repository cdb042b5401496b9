"""Facenet backbones (Schroff et al. 2015) as in bubbliiiing/facenet-pytorch and
davidsandberg/facenet: MobileNetV1 or Inception-ResNetV1 features, then global average
pooling, dropout, a dense bottleneck without bias, BatchNorm and (optionally) L2 normalisation.

* MobileNetV1 (bubbliiiing ``nets/mobilenet.py``, classifier removed): conv3x3/2 to 32, then 13
  depthwise-separable units (3x3 depthwise, BN, ReLU6, 1x1, BN, ReLU6), 1024 channels at /32.
  BatchNorm epsilon 1e-5 (torch default).
* Inception-ResNetV1 (``nets/inception_resnetv1.py``, the timesler/davidsandberg layout): stem
  (valid convs, max pool), 5 x Block35 (scale 0.17), Mixed_6a, 10 x Block17 (scale 0.10),
  Mixed_7a, 5 x Block8 (scale 0.20) and a last Block8 without ReLU, 1792 channels at /32 - 6
  (3x3 for 160x160, 2x2 for 112x112). Conv + BN (epsilon 1e-3, the TF value) + ReLU; the 1x1
  "up" convolution of each residual block has a bias.

The head's BatchNorm has epsilon 1e-3 as in the reference. Defaults follow the reference:
160x160 input, embedding 128, dropout 0.5 (``dropout_keep_prob=0.5``), L2-normalised output.
The input is RGB in [0, 255] mapped to ``(x - 127.5) / 128`` inside the model like every backbone
here (the reference divides by 255, which only matters for its pretrained weights).

``l2_normalize``: Facenet's triplet loss wants unit embeddings. Margin heads (ArcFace, CosFace,
...) normalise the embedding themselves, so the flag makes no difference to them; heads that
read the embedding's norm (MagFace, AdaFace) need ``l2_normalize=False``.
"""

from __future__ import annotations

import keras

from facerec_tf.models import blocks
from facerec_tf.models.backbone import Backbone, input_dtype

FACENET_INPUT_SHAPE = (160, 160, 3)

# MobileNetV1 depthwise-separable units after the stem: (output channels, stride).
MOBILENET_V1_UNITS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)

# Inception-ResNetV1 residual stages: (number of blocks, residual scale).
INCEPTION_RESNET_V1_REPEATS = {"block35": (5, 0.17), "block17": (10, 0.10), "block8": (5, 0.20)}

INCEPTION_BN_EPSILON = 1e-3


# --------------------------------------------------------------------------- MobileNetV1


def relu6_bn(x, name, dtype=None):
    x = blocks.batch_norm(x, f"{name}_bn", dtype=dtype)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6", dtype=dtype)(x)


def mobilenet_v1_unit(x, filters, strides, name, dtype=None):
    """3x3 depthwise (torch padding 1), BN, ReLU6, 1x1 conv, BN, ReLU6."""
    x = blocks.depthwise_conv(x, 3, name=f"{name}_dw", strides=strides, padding=1, dtype=dtype)
    x = relu6_bn(x, f"{name}_dw", dtype=dtype)
    x = blocks.conv(x, filters, 1, name=f"{name}_pw", dtype=dtype)
    return relu6_bn(x, f"{name}_pw", dtype=dtype)


def mobilenet_v1_features(x, dtype=None):
    x = blocks.conv(x, 32, 3, name="stem_conv", strides=2, padding=1, dtype=dtype)
    x = relu6_bn(x, "stem", dtype=dtype)
    for i, (filters, strides) in enumerate(MOBILENET_V1_UNITS, 1):
        x = mobilenet_v1_unit(x, filters, strides, f"unit{i}", dtype=dtype)
    return x


# --------------------------------------------------------------------- Inception-ResNetV1


def basic_conv(x, filters, kernel_size, name, strides=1, padding="valid", dtype=None):
    """Conv (no bias) + BN (epsilon 1e-3) + ReLU. ``same`` only at stride 1, where Keras pads
    symmetrically like torch's ``padding=k // 2``."""
    if padding == "same" and strides != 1:
        raise ValueError("'same' padding is only torch-compatible at stride 1")
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer=blocks.conv_initializer(),
        name=f"{name}_conv",
        dtype=dtype,
    )(x)
    x = blocks.BatchNormalization(
        epsilon=INCEPTION_BN_EPSILON, momentum=blocks.BN_MOMENTUM, name=f"{name}_bn", dtype=dtype
    )(x)
    return keras.layers.ReLU(name=f"{name}_relu", dtype=dtype)(x)


def inception_residual(x, branches, scale, name, activation=True, dtype=None):
    """Concatenate ``branches``, biased 1x1 conv back to the input width, ``x + scale * up``."""
    y = keras.layers.Concatenate(name=f"{name}_concat", dtype=dtype)(branches)
    y = keras.layers.Conv2D(
        x.shape[-1],
        1,
        kernel_initializer=blocks.conv_initializer(),
        name=f"{name}_up",
        dtype=dtype,
    )(y)
    y = keras.layers.Rescaling(scale, name=f"{name}_scale", dtype=dtype)(y)
    y = keras.layers.Add(name=f"{name}_add", dtype=dtype)([x, y])
    if activation:
        y = keras.layers.ReLU(name=f"{name}_relu", dtype=dtype)(y)
    return y


def block35(x, scale, name, dtype=None):
    """35x35 grid block (at 299 px): 1x1/32 | 1x1/32, 3x3/32 | 1x1/32, 3x3/32, 3x3/32."""
    b0 = basic_conv(x, 32, 1, f"{name}_b0", dtype=dtype)
    b1 = basic_conv(x, 32, 1, f"{name}_b1a", dtype=dtype)
    b1 = basic_conv(b1, 32, 3, f"{name}_b1b", padding="same", dtype=dtype)
    b2 = basic_conv(x, 32, 1, f"{name}_b2a", dtype=dtype)
    b2 = basic_conv(b2, 32, 3, f"{name}_b2b", padding="same", dtype=dtype)
    b2 = basic_conv(b2, 32, 3, f"{name}_b2c", padding="same", dtype=dtype)
    return inception_residual(x, [b0, b1, b2], scale, name, dtype=dtype)


def block17(x, scale, name, dtype=None):
    """17x17 grid block: 1x1/128 | 1x1/128, 1x7/128, 7x1/128."""
    b0 = basic_conv(x, 128, 1, f"{name}_b0", dtype=dtype)
    b1 = basic_conv(x, 128, 1, f"{name}_b1a", dtype=dtype)
    b1 = basic_conv(b1, 128, (1, 7), f"{name}_b1b", padding="same", dtype=dtype)
    b1 = basic_conv(b1, 128, (7, 1), f"{name}_b1c", padding="same", dtype=dtype)
    return inception_residual(x, [b0, b1], scale, name, dtype=dtype)


def block8(x, scale, name, activation=True, dtype=None):
    """8x8 grid block: 1x1/192 | 1x1/192, 1x3/192, 3x1/192."""
    b0 = basic_conv(x, 192, 1, f"{name}_b0", dtype=dtype)
    b1 = basic_conv(x, 192, 1, f"{name}_b1a", dtype=dtype)
    b1 = basic_conv(b1, 192, (1, 3), f"{name}_b1b", padding="same", dtype=dtype)
    b1 = basic_conv(b1, 192, (3, 1), f"{name}_b1c", padding="same", dtype=dtype)
    return inception_residual(x, [b0, b1], scale, name, activation=activation, dtype=dtype)


def reduction_a(x, name="mixed_6a", dtype=None):
    """Mixed_6a: 3x3/2 conv 384 | 1x1/192, 3x3/192, 3x3/2 256 | 3x3/2 max pool -> 896."""
    b0 = basic_conv(x, 384, 3, f"{name}_b0", strides=2, dtype=dtype)
    b1 = basic_conv(x, 192, 1, f"{name}_b1a", dtype=dtype)
    b1 = basic_conv(b1, 192, 3, f"{name}_b1b", padding="same", dtype=dtype)
    b1 = basic_conv(b1, 256, 3, f"{name}_b1c", strides=2, dtype=dtype)
    b2 = keras.layers.MaxPooling2D(3, strides=2, name=f"{name}_pool", dtype=dtype)(x)
    return keras.layers.Concatenate(name=f"{name}_concat", dtype=dtype)([b0, b1, b2])


def reduction_b(x, name="mixed_7a", dtype=None):
    """Mixed_7a: three conv branches (1x1/256 then 3x3/2 384, 256, and 3x3, 3x3/2 256) and a
    3x3/2 max pool -> 1792."""
    b0 = basic_conv(x, 256, 1, f"{name}_b0a", dtype=dtype)
    b0 = basic_conv(b0, 384, 3, f"{name}_b0b", strides=2, dtype=dtype)
    b1 = basic_conv(x, 256, 1, f"{name}_b1a", dtype=dtype)
    b1 = basic_conv(b1, 256, 3, f"{name}_b1b", strides=2, dtype=dtype)
    b2 = basic_conv(x, 256, 1, f"{name}_b2a", dtype=dtype)
    b2 = basic_conv(b2, 256, 3, f"{name}_b2b", padding="same", dtype=dtype)
    b2 = basic_conv(b2, 256, 3, f"{name}_b2c", strides=2, dtype=dtype)
    b3 = keras.layers.MaxPooling2D(3, strides=2, name=f"{name}_pool", dtype=dtype)(x)
    return keras.layers.Concatenate(name=f"{name}_concat", dtype=dtype)([b0, b1, b2, b3])


def inception_resnet_v1_features(x, dtype=None):
    x = basic_conv(x, 32, 3, "conv1a", strides=2, dtype=dtype)
    x = basic_conv(x, 32, 3, "conv2a", dtype=dtype)
    x = basic_conv(x, 64, 3, "conv2b", padding="same", dtype=dtype)
    x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool3a", dtype=dtype)(x)
    x = basic_conv(x, 80, 1, "conv3b", dtype=dtype)
    x = basic_conv(x, 192, 3, "conv4a", dtype=dtype)
    x = basic_conv(x, 256, 3, "conv4b", strides=2, dtype=dtype)
    repeats, scale = INCEPTION_RESNET_V1_REPEATS["block35"]
    for i in range(1, repeats + 1):
        x = block35(x, scale, f"block35_{i}", dtype=dtype)
    x = reduction_a(x, dtype=dtype)
    repeats, scale = INCEPTION_RESNET_V1_REPEATS["block17"]
    for i in range(1, repeats + 1):
        x = block17(x, scale, f"block17_{i}", dtype=dtype)
    x = reduction_b(x, dtype=dtype)
    repeats, scale = INCEPTION_RESNET_V1_REPEATS["block8"]
    for i in range(1, repeats + 1):
        x = block8(x, scale, f"block8_{i}", dtype=dtype)
    return block8(x, 1.0, f"block8_{repeats + 1}", activation=False, dtype=dtype)


# feature extractor name -> (builder, output channels)
FACENET_FEATURES = {
    "mobilenet": (mobilenet_v1_features, 1024),
    "inception_resnetv1": (inception_resnet_v1_features, 1792),
}


@keras.saving.register_keras_serializable(package="facerec_tf")
class FacenetBackbone(Backbone):
    """Facenet: MobileNetV1 or Inception-ResNetV1 features, GAP, dropout, dense bottleneck
    (no bias), BatchNorm, optional L2 normalisation.

    Unlike the other backbones the output is **L2-normalised by default** (``l2_normalize=True``,
    as Facenet). Margin heads (ArcFace, CosFace, ...) normalise the embedding anyway, so the
    flag does not change their logits; MagFace/AdaFace-style heads use the embedding norm and
    need ``l2_normalize=False``.

    Args:
        features: ``"mobilenet"`` (1024 channels) or ``"inception_resnetv1"`` (1792).
        embedding_size: bottleneck width (128 in Facenet).
        dropout: dropout rate before the bottleneck (0.5: the reference's keep probability 0.5).
        l2_normalize: divide the output by its L2 norm.
        input_shape: HWC input, 160x160 by default; 112x112 works too (global pooling).
        include_preprocessing, dtype: as in :class:`IResNetBackbone`.
    """

    def __init__(
        self,
        features="mobilenet",
        embedding_size=128,
        dropout=0.5,
        l2_normalize=True,
        input_shape=FACENET_INPUT_SHAPE,
        include_preprocessing=True,
        dtype=None,
        name=None,
        **kwargs,
    ):
        if features not in FACENET_FEATURES:
            raise ValueError(
                f"Facenet features must be one of {sorted(FACENET_FEATURES)}, got {features!r}"
            )
        input_shape = tuple(input_shape)
        build_features, _ = FACENET_FEATURES[features]
        images = keras.Input(shape=input_shape, name="images", dtype=input_dtype(dtype))
        x = blocks.preprocessing(images, dtype=dtype) if include_preprocessing else images
        x = build_features(x, dtype=dtype)
        x = keras.layers.GlobalAveragePooling2D(name="head_pool", dtype=dtype)(x)
        x = keras.layers.Dropout(dropout, name="head_dropout", dtype=dtype)(x)
        x = keras.layers.Dense(embedding_size, use_bias=False, name="bottleneck", dtype=dtype)(x)
        # float32 from here on so that the output is float32 under mixed precision
        x = blocks.BatchNormalization(
            epsilon=INCEPTION_BN_EPSILON,
            momentum=blocks.BN_MOMENTUM,
            name="features",
            dtype="float32",
        )(x)
        if l2_normalize:
            # x / max(||x||, 1e-12), torch F.normalize
            x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize", dtype="float32")(x)
        super().__init__(inputs=images, outputs=x, name=name or f"facenet_{features}", **kwargs)
        self._remember_config(
            features=features,
            embedding_size=embedding_size,
            dropout=dropout,
            l2_normalize=l2_normalize,
            input_shape=input_shape,
            include_preprocessing=include_preprocessing,
            dtype=dtype,
        )
