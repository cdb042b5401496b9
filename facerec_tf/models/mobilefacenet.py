"""MobileFaceNet as in arcface_torch's ``mbf`` (``backbones/mobilefacenet.py``).

Stem conv3x3/2, a grouped conv3x3, then inverted-residual "DepthWise" units (1x1 expand with
PReLU, 3x3 depthwise with PReLU, 1x1 linear projection, identity shortcut inside a stage),
a 1x1 conv to 512 and the GDC head: 7x7 depthwise linear conv, flatten, dense without bias,
BatchNorm. ``scale=2`` and blocks ``(1, 4, 6, 2)`` are arcface_torch's defaults.
"""

from __future__ import annotations

import keras

from facerec_tf.models import blocks
from facerec_tf.models.backbone import INPUT_SHAPE, Backbone, input_dtype


def conv_block(
    x, filters, kernel_size, name, strides=1, padding=0, groups=1, linear=False, dtype=None
):
    """Conv (no bias) + BN (+ PReLU unless ``linear``); depthwise when groups == channels."""
    if groups > 1 and groups == x.shape[-1] == filters:
        x = blocks.depthwise_conv(
            x, kernel_size, name=f"{name}_conv", strides=strides, padding=padding, dtype=dtype
        )
    else:
        x = blocks.conv(
            x,
            filters,
            kernel_size,
            name=f"{name}_conv",
            strides=strides,
            padding=padding,
            groups=groups,
            dtype=dtype,
        )
    x = blocks.batch_norm(x, f"{name}_bn", dtype=dtype)
    if not linear:
        x = blocks.prelu(x, f"{name}_prelu", dtype=dtype)
    return x


def depthwise_unit(x, filters, expansion, name, strides=2, residual=False, dtype=None):
    """arcface_torch ``DepthWise``: 1x1 to ``expansion`` channels, 3x3 depthwise, 1x1 linear."""
    shortcut = x
    y = conv_block(x, expansion, 1, f"{name}_expand", dtype=dtype)
    y = conv_block(
        y, expansion, 3, f"{name}_dw", strides=strides, padding=1, groups=expansion, dtype=dtype
    )
    y = conv_block(y, filters, 1, f"{name}_project", linear=True, dtype=dtype)
    if residual:
        y = keras.layers.Add(name=f"{name}_add", dtype=dtype)([y, shortcut])
    return y


def residual_stage(x, num_units, expansion, name, dtype=None):
    for i in range(num_units):
        x = depthwise_unit(
            x, x.shape[-1], expansion, f"{name}_unit{i + 1}", strides=1, residual=True, dtype=dtype
        )
    return x


@keras.saving.register_keras_serializable(package="facerec_tf")
class MobileFaceNetBackbone(Backbone):
    """MobileFaceNet (arcface_torch ``mbf``) with the GDC embedding head.

    Args:
        embedding_size: output dimension.
        stage_units: residual units per stage, arcface_torch's ``blocks=(1, 4, 6, 2)``.
        width_scale: channel multiplier, arcface_torch's ``scale=2``.
        dropout: dropout before the GDC dense layer (0 in arcface_torch).
        input_shape, include_preprocessing, dtype: as in :class:`IResNetBackbone`.
    """

    def __init__(
        self,
        embedding_size=512,
        stage_units=(1, 4, 6, 2),
        width_scale=2,
        dropout=0.0,
        input_shape=INPUT_SHAPE,
        include_preprocessing=True,
        dtype=None,
        name="mobilefacenet",
        **kwargs,
    ):
        stage_units = tuple(int(u) for u in stage_units)
        input_shape = tuple(input_shape)
        c64, c128 = 64 * width_scale, 128 * width_scale
        images = keras.Input(shape=input_shape, name="images", dtype=input_dtype(dtype))
        x = blocks.preprocessing(images, dtype=dtype) if include_preprocessing else images
        x = conv_block(x, c64, 3, "stem", strides=2, padding=1, dtype=dtype)
        if stage_units[0] == 1:
            x = conv_block(x, c64, 3, "stem_dw", padding=1, groups=64, dtype=dtype)
        else:
            x = residual_stage(x, stage_units[0], 128, "stage1", dtype=dtype)
        x = depthwise_unit(x, c64, 128, "down2", dtype=dtype)
        x = residual_stage(x, stage_units[1], 128, "stage2", dtype=dtype)
        x = depthwise_unit(x, c128, 256, "down3", dtype=dtype)
        x = residual_stage(x, stage_units[2], 256, "stage3", dtype=dtype)
        x = depthwise_unit(x, c128, 512, "down4", dtype=dtype)
        x = residual_stage(x, stage_units[3], 256, "stage4", dtype=dtype)
        x = conv_block(x, 512, 1, "conv_sep", dtype=dtype)
        # GDC head
        x = conv_block(x, 512, x.shape[1], "gdc", groups=512, linear=True, dtype=dtype)
        x = keras.layers.Flatten(name="gdc_flatten", dtype=dtype)(x)
        x = keras.layers.Dropout(dropout, name="gdc_dropout", dtype=dtype)(x)
        x = keras.layers.Dense(embedding_size, use_bias=False, name="gdc_fc", dtype=dtype)(x)
        embedding = blocks.BatchNormalization(
            epsilon=blocks.BN_EPSILON, momentum=blocks.BN_MOMENTUM, name="features", dtype="float32"
        )(x)
        super().__init__(inputs=images, outputs=embedding, name=name, **kwargs)
        self._remember_config(
            embedding_size=embedding_size,
            stage_units=stage_units,
            width_scale=width_scale,
            dropout=dropout,
            input_shape=input_shape,
            include_preprocessing=include_preprocessing,
            dtype=dtype,
        )
