"""IResNet (insightface's L_Resnet_E_IR / ``iresnet``) and its squeeze-excitation variant IR-SE.

Layout (arcface_torch ``backbones/iresnet.py``):

* stem: conv3x3/64 stride 1, BN, PReLU;
* four stages of widths 64/128/256/512; the first unit of each stage has stride 2 and a
  1x1 conv + BN shortcut; a unit is BN, conv3x3, BN, PReLU, conv3x3 (stride here), BN,
  optional SE, plus the shortcut;
* head "E": BN, dropout, flatten 512x7x7, dense 512 (with bias), BN whose scale is frozen at 1.

Depth variants are rows of :data:`IRESNET_STAGES`; ``se=True`` gives IR-SE.
"""

from __future__ import annotations

import keras

from facerec_tf.models import blocks
from facerec_tf.models.backbone import INPUT_SHAPE, Backbone, input_dtype

IRESNET_STAGES = {
    10: (1, 1, 1, 1),  # not in arcface_torch: a quick CPU depth for smoke runs and tests
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def ir_unit(x, filters, stride, name, se_ratio=0, dtype=None):
    """One improved-residual unit (``IBasicBlock``), optionally with squeeze-excitation."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = blocks.conv(
            x, filters, 1, strides=stride, name=f"{name}_shortcut_conv", dtype=dtype
        )
        shortcut = blocks.batch_norm(shortcut, f"{name}_shortcut_bn", dtype=dtype)
    y = blocks.batch_norm(x, f"{name}_bn1", dtype=dtype)
    y = blocks.conv(y, filters, 3, padding=1, name=f"{name}_conv1", dtype=dtype)
    y = blocks.batch_norm(y, f"{name}_bn2", dtype=dtype)
    y = blocks.prelu(y, f"{name}_prelu", dtype=dtype)
    y = blocks.conv(y, filters, 3, strides=stride, padding=1, name=f"{name}_conv2", dtype=dtype)
    y = blocks.batch_norm(y, f"{name}_bn3", dtype=dtype)
    if se_ratio:
        y = blocks.squeeze_excite(y, se_ratio, f"{name}_se", dtype=dtype)
    return keras.layers.Add(name=f"{name}_add", dtype=dtype)([y, shortcut])


def embedding_head_e(x, embedding_size, dropout, name="head", dtype=None):
    """insightface's output layer "E": BN, dropout, flatten, dense, BN with frozen scale."""
    x = blocks.batch_norm(x, f"{name}_bn", dtype=dtype)
    x = keras.layers.Dropout(dropout, name=f"{name}_dropout", dtype=dtype)(x)
    x = keras.layers.Flatten(name=f"{name}_flatten", dtype=dtype)(x)
    x = keras.layers.Dense(embedding_size, name=f"{name}_fc", dtype=dtype)(x)
    # The embedding BN runs in float32 so the model output is float32 under mixed precision.
    features = blocks.BatchNormalization(
        epsilon=blocks.BN_EPSILON, momentum=blocks.BN_MOMENTUM, name="features", dtype="float32"
    )
    out = features(x)
    features.gamma.trainable = False  # arcface_torch: features.weight fixed at 1.0
    return out


@keras.saving.register_keras_serializable(package="facerec_tf")
class IResNetBackbone(Backbone):
    """IResNet / IR-SE face-embedding backbone.

    Args:
        depth: one of the keys of :data:`IRESNET_STAGES` (10, 18, 34, 50, 100, 200).
        se: add a squeeze-excitation unit (ratio ``se_ratio``) to every residual unit.
        embedding_size: output dimension (512 in insightface).
        dropout: dropout rate before the flatten of head "E" (arcface_torch uses 0).
        se_ratio: channel reduction of the SE unit.
        input_shape: HWC input; the head's dense layer depends on it (7x7 for 112x112).
        include_preprocessing: when True (default) the input is RGB in [0, 255] and the
            model applies ``(x - 127.5) / 128`` itself.
        dtype: a dtype policy name for every layer, or None for the global policy.
    """

    def __init__(
        self,
        depth=50,
        se=False,
        embedding_size=512,
        dropout=0.0,
        se_ratio=16,
        input_shape=INPUT_SHAPE,
        include_preprocessing=True,
        dtype=None,
        name=None,
        **kwargs,
    ):
        if depth not in IRESNET_STAGES:
            raise ValueError(
                f"IResNet depth must be one of {sorted(IRESNET_STAGES)}, got {depth!r}"
            )
        input_shape = tuple(input_shape)
        images = keras.Input(shape=input_shape, name="images", dtype=input_dtype(dtype))
        x = blocks.preprocessing(images, dtype=dtype) if include_preprocessing else images
        x = blocks.conv(x, 64, 3, padding=1, name="stem_conv", dtype=dtype)
        x = blocks.batch_norm(x, "stem_bn", dtype=dtype)
        x = blocks.prelu(x, "stem_prelu", dtype=dtype)
        for stage, (num_units, width) in enumerate(zip(IRESNET_STAGES[depth], STAGE_WIDTHS), 1):
            for unit in range(num_units):
                x = ir_unit(
                    x,
                    width,
                    stride=2 if unit == 0 else 1,
                    name=f"stage{stage}_unit{unit + 1}",
                    se_ratio=se_ratio if se else 0,
                    dtype=dtype,
                )
        embedding = embedding_head_e(x, embedding_size, dropout, dtype=dtype)
        default_name = f"{'ir_se' if se else 'iresnet'}{depth}"
        super().__init__(inputs=images, outputs=embedding, name=name or default_name, **kwargs)
        self._remember_config(
            depth=depth,
            se=se,
            embedding_size=embedding_size,
            dropout=dropout,
            se_ratio=se_ratio,
            input_shape=input_shape,
            include_preprocessing=include_preprocessing,
            dtype=dtype,
        )
