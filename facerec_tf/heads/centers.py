"""The class-centre matrix, its own component so that Partial FC can shard and sample it."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="facerec_tf")
class ClassCenters(keras.layers.Layer):
    """``num_classes`` learnable centres of dimension ``D``, stored ``[num_classes, D]``.

    The layout is arcface_torch's (one row per class), so a row block is one shard of
    classes. Calling the layer returns the cosine between each L2-normalised embedding and
    each L2-normalised centre, ``[batch, num_classes]`` in float32; there is no bias.

    Args:
        num_classes: number of identities (rows).
        initializer: centre initialiser; arcface_torch draws N(0, 0.01).
    """

    def __init__(self, num_classes, initializer=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.initializer = keras.initializers.get(
            initializer or keras.initializers.RandomNormal(stddev=0.01)
        )

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.num_classes, int(input_shape[-1])),
            initializer=self.initializer,
        )

    def normalized(self):
        """The L2-normalised centres, ``[num_classes, D]``."""
        return tf.math.l2_normalize(tf.cast(self.kernel, self.compute_dtype), axis=1)

    def call(self, embeddings):
        x = tf.math.l2_normalize(tf.cast(embeddings, self.compute_dtype), axis=1)
        return tf.matmul(x, self.normalized(), transpose_b=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            initializer=keras.initializers.serialize(self.initializer),
        )
        return config
