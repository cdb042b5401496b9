"""VarGFaceNet (Yan et al., ICCV-W 2019, arXiv:1910.04985), the LFR-2019 deepglint-light winner.

Every spatial convolution is a *variable group* convolution: a fixed number of channels per
group (``group_channels``, the paper's S = 8), so ``groups = channels / 8`` grows with the width
instead of being fixed. Structure (checked against the authors' MXNet symbol,
zma-c-137/VarGFaceNet ``VarGFaceNet.py``, also in insightface ``recognition/symbol``):

* a *variable group separable conv* is a 3x3 grouped conv ``C -> C * factor`` with ``C / 8``
  groups, BN, PReLU, then a 1x1 conv to the output width and BN (PReLU optional);
* head: conv3x3/1 to 32 * w channels, BN, PReLU, then one normal block of stride 2 with a
  separable-conv shortcut and ``factor = 1`` (112 -> 56);
* normal block: two separable convs (``factor = 2``), squeeze-excitation (ratio 4, biased 1x1
  convs, PReLU), identity shortcut, PReLU after the addition;
* down-sampling block: two parallel stride-2 separable convs summed (PReLU), a third separable
  conv, a stride-2 separable-conv shortcut, PReLU after the addition;
* three stages of (3, 7, 4) units at widths (64, 128, 256) * w (each stage starts with the
  down-sampling block), w = 1.25;
* embedding: 1x1 conv to 1024, BN, PReLU; 7x7 variable group conv (1024 channels, 128 groups),
  BN; 1x1 conv to 512, BN, PReLU; fully connected to the embedding (with bias); BN.

Differences from the MXNet symbol, all conventions of this package: BatchNorm epsilon 1e-5
(MXNet 2e-5), torch-style padding helpers, He-normal initialisation. insightface's shipped config
trains it without SE (``net_se = 0``) and with the last BN's scale fixed at 1 (output ``J``);
``se=False`` gives the former, the paper's and authors' model (SE, trainable scale) is the default.
"""

from __future__ import annotations

import keras

from facerec_tf.models import blocks
from facerec_tf.models.backbone import INPUT_SHAPE, Backbone, input_dtype

# Base widths of the head and of the three stages (times ``width_multiplier``); each stage
# starts with a stride-2 down-sampling block.
HEAD_WIDTH = 32
STAGE_WIDTHS = (64, 128, 256)


def varg_separable_conv(
    x, out_channels, name, factor=2, strides=1, group_channels=8, pw_activation=True, dtype=None
):
    """Variable group 3x3 conv (``C -> C * factor``, ``C / group_channels`` groups), BN, PReLU,
    then 1x1 conv to ``out_channels`` and BN (+ PReLU when ``pw_activation``)."""
    channels = x.shape[-1]
    if channels % group_channels:
        raise ValueError(
            f"{name}: {channels} channels are not a multiple of group_channels={group_channels}"
        )
    x = blocks.conv(
        x,
        channels * factor,
        3,
        name=f"{name}_gconv",
        strides=strides,
        padding=1,
        groups=channels // group_channels,
        dtype=dtype,
    )
    x = blocks.batch_norm(x, f"{name}_gconv_bn", dtype=dtype)
    x = blocks.prelu(x, f"{name}_gconv_prelu", dtype=dtype)
    x = blocks.conv(x, out_channels, 1, name=f"{name}_pconv", dtype=dtype)
    x = blocks.batch_norm(x, f"{name}_pconv_bn", dtype=dtype)
    if pw_activation:
        x = blocks.prelu(x, f"{name}_pconv_prelu", dtype=dtype)
    return x


def se_unit(x, ratio, name, dtype=None):
    """VarGFaceNet's squeeze-excitation: GAP, biased 1x1 conv C/ratio, PReLU, biased 1x1 conv C,
    sigmoid, rescale (unlike :func:`blocks.squeeze_excite`: biases and PReLU)."""
    channels = x.shape[-1]
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool", dtype=dtype)(x)
    s = blocks.conv(s, channels // ratio, 1, name=f"{name}_reduce", use_bias=True, dtype=dtype)
    s = blocks.prelu(s, f"{name}_prelu", dtype=dtype)
    s = blocks.conv(s, channels, 1, name=f"{name}_expand", use_bias=True, dtype=dtype)
    s = keras.layers.Activation("sigmoid", name=f"{name}_sigmoid", dtype=dtype)(s)
    return keras.layers.Multiply(name=f"{name}_scale", dtype=dtype)([x, s])


def normal_block(x, name, factor=2, strides=1, group_channels=8, se_ratio=4, se=True, dtype=None):
    """The paper's normal block: two separable convs, SE, shortcut, PReLU after the sum.

    The shortcut is the identity, or (strides 2, the head block) a linear separable conv.
    """
    channels = x.shape[-1]
    kw = dict(factor=factor, group_channels=group_channels, dtype=dtype)
    shortcut = x
    if strides != 1:
        shortcut = varg_separable_conv(
            x, channels, f"{name}_shortcut", strides=strides, pw_activation=False, **kw
        )
    y = varg_separable_conv(x, channels, f"{name}_sep1", strides=strides, **kw)
    y = varg_separable_conv(y, channels, f"{name}_sep2", pw_activation=False, **kw)
    if se:
        y = se_unit(y, se_ratio, f"{name}_se", dtype=dtype)
    y = keras.layers.Add(name=f"{name}_add", dtype=dtype)([y, shortcut])
    return blocks.prelu(y, f"{name}_prelu", dtype=dtype)


def downsample_block(x, out_channels, name, factor=2, group_channels=8, dtype=None):
    """The paper's down-sampling block: two stride-2 separable-conv branches summed, PReLU,
    a separable conv, plus a stride-2 separable-conv shortcut, PReLU after the sum."""
    kw = dict(factor=factor, group_channels=group_channels, dtype=dtype)
    shortcut = varg_separable_conv(
        x, out_channels, f"{name}_shortcut", strides=2, pw_activation=False, **kw
    )
    b1 = varg_separable_conv(
        x, out_channels, f"{name}_branch1", strides=2, pw_activation=False, **kw
    )
    b2 = varg_separable_conv(
        x, out_channels, f"{name}_branch2", strides=2, pw_activation=False, **kw
    )
    y = keras.layers.Add(name=f"{name}_merge", dtype=dtype)([b1, b2])
    y = blocks.prelu(y, f"{name}_merge_prelu", dtype=dtype)
    y = varg_separable_conv(y, out_channels, f"{name}_sep", pw_activation=False, **kw)
    y = keras.layers.Add(name=f"{name}_add", dtype=dtype)([y, shortcut])
    return blocks.prelu(y, f"{name}_prelu", dtype=dtype)


def embedding_block(
    x, embedding_size, last_channels, group_channels, dropout, name="embed", dtype=None
):
    """1x1 conv to ``last_channels``, full-map variable group conv, 1x1 conv to half, FC, BN."""
    x = blocks.conv(x, last_channels, 1, name=f"{name}_expand", dtype=dtype)
    x = blocks.batch_norm(x, f"{name}_expand_bn", dtype=dtype)
    x = blocks.prelu(x, f"{name}_expand_prelu", dtype=dtype)
    height, width = x.shape[1], x.shape[2]
    if height != width:
        raise ValueError(f"VarGFaceNet needs a square feature map, got {height}x{width}")
    x = blocks.conv(
        x,
        last_channels,
        height,  # 7x7 for 112x112 input
        name=f"{name}_gconv",
        groups=last_channels // group_channels,
        dtype=dtype,
    )
    x = blocks.batch_norm(x, f"{name}_gconv_bn", dtype=dtype)
    x = blocks.conv(x, last_channels // 2, 1, name=f"{name}_pconv", dtype=dtype)
    x = blocks.batch_norm(x, f"{name}_pconv_bn", dtype=dtype)
    x = blocks.prelu(x, f"{name}_pconv_prelu", dtype=dtype)
    x = keras.layers.Flatten(name=f"{name}_flatten", dtype=dtype)(x)
    x = keras.layers.Dropout(dropout, name=f"{name}_dropout", dtype=dtype)(x)
    x = keras.layers.Dense(embedding_size, name=f"{name}_fc", dtype=dtype)(x)
    # float32 so that the output is float32 under mixed precision
    return blocks.BatchNormalization(
        epsilon=blocks.BN_EPSILON, momentum=blocks.BN_MOMENTUM, name="features", dtype="float32"
    )(x)


@keras.saving.register_keras_serializable(package="facerec_tf")
class VarGFaceNetBackbone(Backbone):
    """VarGFaceNet face-embedding backbone; returns the raw (not L2-normalised) embedding.

    Args:
        embedding_size: output dimension (512 in the paper).
        width_multiplier: channel multiplier of the head and the stages (1.25 in the paper).
        stage_units: units of the three stages, ``(3, 7, 4)``.
        group_channels: channels per group of every variable group conv (the paper's S = 8).
        se: squeeze-excitation in the normal blocks (paper and authors' code: yes;
            insightface's ``vargfacenet`` config: no).
        last_channels: width of the embedding block's 1x1 expansion and grouped conv (1024).
        dropout: dropout before the embedding FC layer (0 in the paper).
        input_shape, include_preprocessing, dtype: as in :class:`IResNetBackbone`.
    """

    def __init__(
        self,
        embedding_size=512,
        width_multiplier=1.25,
        stage_units=(3, 7, 4),
        group_channels=8,
        se=True,
        last_channels=1024,
        dropout=0.0,
        input_shape=INPUT_SHAPE,
        include_preprocessing=True,
        dtype=None,
        name="vargfacenet",
        **kwargs,
    ):
        stage_units = tuple(int(u) for u in stage_units)
        if len(stage_units) != len(STAGE_WIDTHS) or min(stage_units) < 1:
            raise ValueError(f"stage_units must be 3 positive integers, got {stage_units}")
        input_shape = tuple(input_shape)
        gkw = dict(group_channels=group_channels, dtype=dtype)
        images = keras.Input(shape=input_shape, name="images", dtype=input_dtype(dtype))
        x = blocks.preprocessing(images, dtype=dtype) if include_preprocessing else images
        # head block: full-resolution conv, then a stride-2 normal block (factor 1)
        x = blocks.conv(
            x, int(HEAD_WIDTH * width_multiplier), 3, padding=1, name="head_conv", dtype=dtype
        )
        x = blocks.batch_norm(x, "head_bn", dtype=dtype)
        x = blocks.prelu(x, "head_prelu", dtype=dtype)
        x = normal_block(x, "head_block", factor=1, strides=2, se=se, **gkw)
        for stage, (width, units) in enumerate(zip(STAGE_WIDTHS, stage_units), 2):
            x = downsample_block(x, int(width * width_multiplier), f"stage{stage}_unit1", **gkw)
            for unit in range(2, units + 1):
                x = normal_block(x, f"stage{stage}_unit{unit}", se=se, **gkw)
        embedding = embedding_block(
            x, embedding_size, last_channels, group_channels, dropout, dtype=dtype
        )
        super().__init__(inputs=images, outputs=embedding, name=name, **kwargs)
        self._remember_config(
            embedding_size=embedding_size,
            width_multiplier=width_multiplier,
            stage_units=stage_units,
            group_channels=group_channels,
            se=se,
            last_channels=last_channels,
            dropout=dropout,
            input_shape=input_shape,
            include_preprocessing=include_preprocessing,
            dtype=dtype,
        )
