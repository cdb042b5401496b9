"""Base class for every backbone: a functional ``keras.Model`` built in ``__init__``."""

from __future__ import annotations

import keras

INPUT_SHAPE = (112, 112, 3)


class Backbone(keras.Model):
    """A functional model whose ``get_config`` is its constructor arguments.

    Subclasses build their graph in ``__init__``, call ``super().__init__(inputs=..,
    outputs=.., name=..)`` and then ``self._remember_config(**args)`` with exactly the
    keyword arguments of their own ``__init__``; ``from_config`` then rebuilds the same graph.

    Every backbone takes ``images``: float RGB in [0, 255], NHWC, 112x112 by default, and
    returns the (not L2-normalised) embedding in float32 whatever the dtype policy.
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


def backbone_input(images, include_preprocessing: bool):
    """What a backbone takes from the pipeline's uint8 RGB: the images as they are, or, for a
    backbone built with ``include_preprocessing=False``, float32 ``(x - 127.5) / 128`` (the
    normalisation the other backbones apply inside)."""
    if include_preprocessing:
        return images
    import tensorflow as tf

    return (tf.cast(images, tf.float32) - 127.5) / 128.0
