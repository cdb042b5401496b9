"""Base class for every backbone: a functional ``keras.Model`` built in ``__init__``."""

from __future__ import annotations

import keras

INPUT_SHAPE = (112, 112, 3)


class Backbone(keras.Model):
    """A functional model whose ``get_config`` is its constructor arguments.

    Subclasses build their graph in ``__init__``, call ``super().__init__(inputs=..,
    outputs=.., name=..)`` and then ``self._remember_config(**args)`` with exactly the
    keyword arguments of their own ``__init__``; ``from_config`` then rebuilds the same graph.

    Every backbone takes ``images``: float RGB in [0, 255], NHWC, 112x112 by default (a
    float32 input, float64 under a float64 policy: see :func:`input_dtype`), and returns the
    (not L2-normalised) embedding in float32 whatever the dtype policy.
    """

    def _remember_config(self, **config):
        self._backbone_config = dict(config)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **self._backbone_config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)

    @property
    def embedding_size(self) -> int:
        return int(self.outputs[0].shape[-1])


def input_dtype(dtype) -> str | None:
    """The dtype of a backbone's ``images`` input for its ``dtype`` argument (a policy name or
    object; ``None`` is the global policy): float64 under a float64 policy, so that a float64
    backbone does not round its input to float32 on the way in, else ``None`` (Keras' float32
    input; mixed-precision layers cast after it)."""
    policy = keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
    return "float64" if policy.compute_dtype == "float64" else None


def backbone_input(images, include_preprocessing: bool):
    """What a backbone takes from the pipeline's uint8 RGB: the images as they are, or, for a
    backbone built with ``include_preprocessing=False``, float32 ``(x - 127.5) / 128`` (the
    normalisation the other backbones apply inside)."""
    if include_preprocessing:
        return images
    import tensorflow as tf

    return (tf.cast(images, tf.float32) - 127.5) / 128.0
